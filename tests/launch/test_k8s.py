"""`search k8s`: the manifests validate offline against the Kubernetes API schema (strict:
unknown fields fail), and say what README promises."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from typer.main import get_command
from typer.testing import CliRunner

from search.cli import app
from search.launch import k8s
from tests.db.conftest import tiny_study

ROOT = Path(__file__).parents[2]
# backoffLimitPerIndex is stable (GA) from Kubernetes 1.33; check that and the newest schema.
VERSIONS = ["1.33.0", kubernetes_validate.latest_version()]
IMAGE = "registry.example.com/fusion-search:1.0"


def render(study_file: Path, *args: str) -> list[dict]:
    result = CliRunner().invoke(app, ["k8s", "--study", str(study_file), "--image", IMAGE,
                                      *args])
    assert result.exit_code == 0, result.output
    return list(yaml.safe_load_all(result.stdout))


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


@pytest.fixture
def study_file(workdir):
    return tiny_study(workdir, n_trials=2)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("extra", [[], ["--with-postgres", "--with-dashboard"],
                                   ["--gpus-per-worker", "0", "--with-dashboard"]])
def test_every_manifest_validates_against_the_kubernetes_schema(study_file, version, extra):
    docs = render(study_file, "--workers", "4", *extra)
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_strict_schema_check_rejects_a_wrong_manifest(study_file):
    job = by_kind(render(study_file, "--workers", "2"), "Job")[0]
    job["spec"]["parallelism"] = "four"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, VERSIONS[-1], strict=True)
    job["spec"]["parallelism"] = 4
    job["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1  # not a field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, VERSIONS[-1], strict=True)


def test_workers_are_an_indexed_job_with_one_gpu_each_and_the_url_from_a_secret(study_file):
    docs = render(study_file, "--workers", "4")
    assert {d["kind"] for d in docs} == {"Job", "PersistentVolumeClaim"}
    job = by_kind(docs, "Job")[0]["spec"]
    assert job["completionMode"] == "Indexed"
    assert job["parallelism"] == job["completions"] == 4
    assert job["backoffLimitPerIndex"] == k8s.BACKOFF_LIMIT_PER_INDEX
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # required by backoffLimitPerIndex
    (worker,) = pod["containers"]
    assert worker["resources"]["limits"] == {"nvidia.com/gpu": 1}
    env = {e["name"]: e for e in worker["env"]}
    secret = env["SEARCH_STORAGE"]["valueFrom"]["secretKeyRef"]
    assert secret == {"name": "search-tiny-storage", "key": "url"}
    assert "job-completion-index" in env["WORKER_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    # The real CLI accepts what the pod runs (Kubernetes expands $(WORKER_INDEX) first).
    words = [w.replace("$(WORKER_INDEX)", "3") for w in worker["command"]]
    context = parse_cli(words)
    assert context.params["worker_index"] == 3 and context.params["study"] == str(study_file)
    # Workers and dashboard share the artifacts: every claim is ReadWriteMany.
    for claim in by_kind(docs, "PersistentVolumeClaim"):
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_postgres_and_dashboard_are_optional_and_wired_together(study_file):
    docs = render(study_file, "--workers", "2", "--with-postgres", "--with-dashboard")
    (database,) = by_kind(docs, "StatefulSet")
    services = {s["metadata"]["name"]: s["spec"] for s in by_kind(docs, "Service")}
    assert database["spec"]["serviceName"] in services
    postgres_env = {e["name"]: e for e in database["spec"]["template"]["spec"]
                    ["containers"][0]["env"]}
    assert "secretKeyRef" in postgres_env["POSTGRES_PASSWORD"]["valueFrom"]
    # Workers wait for the database the secret's URL names.
    job_pod = by_kind(docs, "Job")[0]["spec"]["template"]["spec"]
    assert database["metadata"]["name"] in " ".join(job_pod["initContainers"][0]["command"])
    (dashboard,) = by_kind(docs, "Deployment")
    service = services[dashboard["metadata"]["name"]]
    assert service["type"] == "ClusterIP"
    assert service["selector"] == dashboard["spec"]["template"]["metadata"]["labels"]
    context = parse_cli(dashboard["spec"]["template"]["spec"]["containers"][0]["command"])
    assert context.params["host"] == "0.0.0.0"
    assert service["ports"][0]["targetPort"] == context.params["port"]
    assert not by_kind(render(study_file, "--workers", "2"), "Deployment")


def test_no_password_reaches_the_manifests(study_file, monkeypatch):
    monkeypatch.setenv("SEARCH_STORAGE", "postgresql://search:s3cret-pw@db:5432/search")
    result = CliRunner().invoke(app, ["k8s", "--study", str(study_file), "--workers", "2",
                                      "--image", IMAGE, "--with-postgres"])
    assert result.exit_code == 0
    assert "s3cret-pw" not in result.output
    assert "kubectl create secret generic search-tiny-storage" in result.output


def test_cpu_workers_ask_for_no_gpu(study_file):
    job = by_kind(render(study_file, "--workers", "2", "--gpus-per-worker", "0"), "Job")[0]
    assert "resources" not in job["spec"]["template"]["spec"]["containers"][0]


def test_a_bad_image_name_is_one_line(study_file):
    result = CliRunner().invoke(app, ["k8s", "--study", str(study_file), "--workers", "2",
                                      "--image", "img; rm -rf /"])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "--image" in result.output


def test_paths_and_user_match_the_dockerfile():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(rf"^WORKDIR {k8s.APP_DIR}$", dockerfile, re.M)
    assert f"--uid {k8s.APP_UID} " in dockerfile


def parse_cli(words: list[str]):
    """Parse ``search ...`` with the real CLI, without running the command."""
    assert words[0] == "search"
    name, *args = words[1:]
    return get_command(app).commands[name].make_context(name, args)
