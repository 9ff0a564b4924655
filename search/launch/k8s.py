"""``search k8s``: Kubernetes manifests for a study's workers (and, optionally, its database
and dashboard), as YAML for ``kubectl apply -f -``.

Workers are an Indexed Job: one pod per worker, each with one GPU and its completion index as
``--worker-index``; a pod that fails is retried up to ``backoffLimitPerIndex`` times, and one
evicted or preempted (condition ``DisruptionTarget``) is retried without counting. Its trial
resumes from the last epoch through the study's heartbeats, as with any dead worker. The
storage URL comes from a Secret that the user creates; no password is ever in the YAML.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

import yaml

from search.config import StudyConfig
from search.errors import UserError
from search.launch import STORAGE_ENV
from search.study.storage import WORKER_WAIT_S

# The Dockerfile's layout: the project in /app, run as uid 1000, runs/ and data/ as volumes.
APP_DIR = "/app"
APP_UID = 1000
BACKOFF_LIMIT_PER_INDEX = 3  # failed pods per worker before the Job gives up on that index
GRACE_S = 120  # SIGTERM -> SIGKILL: time for a worker to stop and save its trial
POSTGRES_IMAGE = "postgres:16"
DASHBOARD_PORT = 8080
VOLUMES = {"runs": "20Gi", "data": "20Gi"}  # shared by every pod: ReadWriteMany
POSTGRES_VOLUME = "10Gi"
_IMAGE = re.compile(r"^[\w./:@-]+$")


@dataclass(frozen=True)
class K8sOptions:
    """What to render; the study file gives the study's name."""

    study: str  # --study as the image sees it (studies/NAME.toml inside the image)
    workers: int
    image: str
    gpus_per_worker: int = 1
    with_postgres: bool = False
    with_dashboard: bool = False


def render_manifests(config: StudyConfig, options: K8sOptions) -> str:
    """The YAML stream: volumes, optional PostgreSQL, the worker Job, optional dashboard.

    Raises:
        UserError: The image name has spaces or shell syntax.
    """
    if not _IMAGE.match(options.image):
        raise UserError(f"--image {options.image!r}: expected an image reference "
                        "such as registry.example.com/fusion-search:1.0")
    names = Names(config.name)
    docs = [_volume_claim(names, volume, size) for volume, size in VOLUMES.items()]
    if options.with_postgres:
        docs += [_postgres_service(names), _postgres_statefulset(names)]
    docs.append(_worker_job(names, options))
    if options.with_dashboard:
        docs += [_dashboard_deployment(names, options), _dashboard_service(names)]
    return _header(names, options) + yaml.safe_dump_all(docs, sort_keys=False)


class Names:
    """Object names derived from the study's, valid DNS labels (lowercase, digits, '-')."""

    def __init__(self, study_name: str) -> None:
        slug = re.sub(r"[^a-z0-9-]+", "-", study_name.lower()).strip("-")[:40].strip("-")
        self.prefix = f"search-{slug or 'study'}"
        self.study = study_name
        self.secret = f"{self.prefix}-storage"
        self.postgres = f"{self.prefix}-postgres"
        self.dashboard = f"{self.prefix}-dashboard"
        self.job = f"{self.prefix}-workers"

    def labels(self, component: str) -> dict[str, str]:
        return {"app.kubernetes.io/name": "fusion-search",
                "app.kubernetes.io/instance": self.prefix,
                "app.kubernetes.io/component": component}

    def volume(self, volume: str) -> str:
        return f"{self.prefix}-{volume}"


def _header(names: Names, options: K8sOptions) -> str:
    url = (f"postgresql://search:PASSWORD@{names.postgres}:5432/search"
           if options.with_postgres else "postgresql://USER:PASSWORD@HOST:5432/DB")
    extra = " --from-literal=postgres-password=PASSWORD" if options.with_postgres else ""
    return (f"# Written by `search k8s` for study {names.study!r}. The storage URL comes from a\n"
            f"# Secret; create it first (the password never goes in this file):\n"
            f"#   kubectl create secret generic {names.secret} "
            f"--from-literal=url={shlex.quote(url)}{extra}\n"
            f"# The volumes {names.volume('runs')} and {names.volume('data')} are shared by "
            f"every pod (ReadWriteMany).\n")


def _volume_claim(names: Names, volume: str, size: str) -> dict:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": names.volume(volume), "labels": names.labels("storage")},
            "spec": {"accessModes": ["ReadWriteMany"],
                     "resources": {"requests": {"storage": size}}}}


def _search_container(names: Names, options: K8sOptions, name: str, command: list[str]) -> dict:
    """A container of the project's image, with the storage URL and the shared volumes."""
    return {
        "name": name,
        "image": options.image,
        "command": command,
        "env": [{"name": STORAGE_ENV, "valueFrom": {
            "secretKeyRef": {"name": names.secret, "key": "url"}}}],
        "volumeMounts": [{"name": volume, "mountPath": f"{APP_DIR}/{volume}"}
                         for volume in VOLUMES],
    }


def _pod_volumes(names: Names) -> list[dict]:
    return [{"name": volume, "persistentVolumeClaim": {"claimName": names.volume(volume)}}
            for volume in VOLUMES]


def _worker_job(names: Names, options: K8sOptions) -> dict:
    container = _search_container(names, options, "worker", [
        "search", "worker", "--study", options.study, "--worker-index", "$(WORKER_INDEX)",
        # A pod that starts while the database restarts waits instead of failing.
        "--wait-for-storage", str(WORKER_WAIT_S)])
    # The completion index seeds each worker's sampler (as the array task id does on Slurm).
    container["env"].insert(0, {"name": "WORKER_INDEX", "valueFrom": {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}})
    if options.gpus_per_worker:
        container["resources"] = {"limits": {"nvidia.com/gpu": options.gpus_per_worker}}
    pod: dict = {"restartPolicy": "Never",  # retries are the Job's, per index
                 "terminationGracePeriodSeconds": GRACE_S,
                 "securityContext": {"fsGroup": APP_UID},
                 "containers": [container], "volumes": _pod_volumes(names)}
    if options.with_postgres:
        pod["initContainers"] = [{
            "name": "wait-for-postgres", "image": POSTGRES_IMAGE,
            "command": ["sh", "-c", f"until pg_isready -h {names.postgres} -p 5432; "
                        "do sleep 2; done"]}]
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": names.job, "labels": names.labels("worker")},
        "spec": {
            "completionMode": "Indexed",
            "completions": options.workers,
            "parallelism": options.workers,
            "backoffLimitPerIndex": BACKOFF_LIMIT_PER_INDEX,
            # Eviction and preemption are no fault of the worker: retry without counting.
            "podFailurePolicy": {"rules": [{
                "action": "Ignore",
                "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]},
            "template": {"metadata": {"labels": names.labels("worker")}, "spec": pod},
        },
    }


def _postgres_service(names: Names) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": names.postgres, "labels": names.labels("database")},
            "spec": {"clusterIP": "None", "selector": names.labels("database"),
                     "ports": [{"name": "postgres", "port": 5432, "targetPort": 5432}]}}


def _postgres_statefulset(names: Names) -> dict:
    ready = ["pg_isready", "-U", "search", "-d", "search"]
    container = {
        "name": "postgres", "image": POSTGRES_IMAGE,
        "env": [{"name": "POSTGRES_USER", "value": "search"},
                {"name": "POSTGRES_DB", "value": "search"},
                {"name": "POSTGRES_PASSWORD", "valueFrom": {"secretKeyRef": {
                    "name": names.secret, "key": "postgres-password"}}},
                # A subfolder: the volume's root may hold lost+found, which initdb refuses.
                {"name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata"}],
        "ports": [{"name": "postgres", "containerPort": 5432}],
        "readinessProbe": {"exec": {"command": ready}, "periodSeconds": 5},
        "volumeMounts": [{"name": "pgdata", "mountPath": "/var/lib/postgresql/data"}],
    }
    return {
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": names.postgres, "labels": names.labels("database")},
        "spec": {
            "serviceName": names.postgres, "replicas": 1,
            "selector": {"matchLabels": names.labels("database")},
            "template": {"metadata": {"labels": names.labels("database")},
                         "spec": {"containers": [container]}},
            "volumeClaimTemplates": [{
                "metadata": {"name": "pgdata"},
                "spec": {"accessModes": ["ReadWriteOnce"],
                         "resources": {"requests": {"storage": POSTGRES_VOLUME}}}}],
        },
    }


def _dashboard_deployment(names: Names, options: K8sOptions) -> dict:
    container = _search_container(names, options, "dashboard", [
        "search", "dashboard", "--study", options.study,
        "--host", "0.0.0.0", "--port", str(DASHBOARD_PORT)])
    container["ports"] = [{"name": "http", "containerPort": DASHBOARD_PORT}]
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": names.dashboard, "labels": names.labels("dashboard")},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": names.labels("dashboard")},
            # Until the first worker has created the study the dashboard exits; the
            # Deployment restarts it.
            "template": {"metadata": {"labels": names.labels("dashboard")},
                         "spec": {"securityContext": {"fsGroup": APP_UID},
                                  "containers": [container], "volumes": _pod_volumes(names)}},
        },
    }


def _dashboard_service(names: Names) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": names.dashboard, "labels": names.labels("dashboard")},
            "spec": {"type": "ClusterIP", "selector": names.labels("dashboard"),
                     "ports": [{"name": "http", "port": DASHBOARD_PORT,
                                "targetPort": DASHBOARD_PORT}]}}
