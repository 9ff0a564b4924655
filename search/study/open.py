"""The one way to open a study: :func:`open_study`, for every command that needs one.

``search run`` opens it to create or continue it, a worker to join it (with its own sampler
and the study's pruner), ``search status``/``dashboard``/``export`` to read it. Reading never
creates anything: a missing SQLite file or study is one clear line instead of an empty study.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import optuna
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from search.config import HeartbeatConfig, StudyConfig
from search.errors import StorageError, UserError
from search.study.budget import StudyLock, queue_start_points
from search.study.proxy import GRACE_ATTR, START_POINTS_ATTR, is_proxy_url, open_proxy
from search.study.storage import (
    call_with_retries,
    check_reachable,
    get_storage,
    normalize_url,
    redact,
    retrying,
)

# What the search maximises, as optuna-dashboard labels it.
OBJECTIVE_NAME = "val macro F1"

Mode = Literal["read", "run", "join"]


def open_study(config: StudyConfig, storage_url: str, *, mode: Mode = "read",
               n_trials: int | None = None, worker_index: int = 0,
               wait_s: float = 0.0) -> optuna.Study:
    """Open the study of ``config`` in ``storage_url``.

    Args:
        config: The study file; names the study, its heartbeats, sampler and pruner.
        storage_url: Where the study lives.
        mode: ``"read"`` loads an existing study and creates nothing (status, dashboard,
            export). ``"run"`` creates the study or loads it and records the budget
            ``n_trials``, the study file and the artifact folder (``search run``, before any
            worker starts). ``"join"`` is a worker's: under the study lock, create the study
            if needed (recording the same attributes only if no one did), with this worker's
            sampler and the study's pruner, and queue the study file's start points once.
        n_trials: The budget to record (``run`` and ``join``).
        worker_index: Seeds a joining worker's sampler.
        wait_s: How long a database that refuses connections is waited for before the
            study is opened (see :func:`~search.study.storage.check_reachable`).

    Raises:
        StorageError: The storage is unreachable, or (``read``) holds no study yet.
        UserError: (``read``) The study is not in the storage.
    """
    if mode == "read":
        require_existing_storage(storage_url, config)
    check_reachable(storage_url, wait_s=wait_s)
    if mode == "read":
        try:
            return optuna.load_study(study_name=config.name, storage=_storage(storage_url))
        except KeyError:
            raise UserError(f"study {config.name!r} not found in the storage; "
                            f"run `search run --study {config.source}` first") from None
    budget = n_trials or config.study.n_trials
    if mode == "run":
        storage = _storage(storage_url, heartbeat=config.heartbeat)
        study = optuna.create_study(study_name=config.name, storage=storage,
                                    direction="maximize", load_if_exists=True)
        _name_objective(study)
        if is_proxy_url(storage_url):
            _record_start_points(study, config)
        _record(study, config, budget)
        return study
    if is_proxy_url(storage_url):
        return _join_through_proxy(config, storage_url, budget, worker_index)
    # Workers scaled by `docker compose` start together with no `search run` before them, so
    # the first one creates the study. Creation runs under the study lock: SQLite workers
    # would otherwise race on creating the tables, server workers on the study row.
    lock = StudyLock(storage_url, config.name)
    try:
        lock.acquire()
        storage = get_storage(storage_url, heartbeat=config.heartbeat)
        # Creating is not one of the storage's retried calls; here a retry is safe: a study
        # created before the acknowledgement was lost is loaded (load_if_exists).
        study = call_with_retries(optuna.create_study, study_name=config.name,
                                  storage=storage, direction="maximize", load_if_exists=True,
                                  sampler=make_sampler(config, worker_index),
                                  pruner=make_pruner(config),
                                  policy=storage.retry_policy, what=storage.description)
        if "n_trials" not in study.user_attrs:  # created here, not by `search run`
            _name_objective(study)
            _record(study, config, budget)
        queue_start_points(study, config.start_points(), budget)
    finally:
        lock.close()
    return study


def _join_through_proxy(config: StudyConfig, storage_url: str, n_trials: int,
                        worker_index: int) -> optuna.Study:
    """A worker's join behind the gRPC proxy, which has no study lock to offer.

    None is needed: creating a study that exists loads it, the attributes are the same
    whoever writes them, and the start points are only recorded here; the proxy's
    coordinator queues them, and the budget, under the lock (see :mod:`search.study.proxy`).
    """
    study = optuna.create_study(study_name=config.name,
                                storage=_storage(storage_url, heartbeat=config.heartbeat),
                                direction="maximize", load_if_exists=True,
                                sampler=make_sampler(config, worker_index),
                                pruner=make_pruner(config))
    _record_start_points(study, config)
    if "n_trials" not in study.user_attrs:
        _name_objective(study)
        _record(study, config, n_trials)
    return study


def _record_start_points(study: optuna.Study, config: StudyConfig) -> None:
    """Leave the start points for the proxy's coordinator to queue, before the budget: it
    tops the budget up as soon as it sees ``n_trials``, and a full budget takes no more."""
    points = config.start_points()
    if points and START_POINTS_ATTR not in study.user_attrs:
        study.set_user_attr(START_POINTS_ATTR, points)


def _storage(url: str, *, heartbeat: HeartbeatConfig | None = None) -> optuna.storages.BaseStorage:
    """The database's storage, or the client of a ``search proxy`` for ``grpc://``."""
    if is_proxy_url(url):
        return open_proxy(url, heartbeat=heartbeat)
    return get_storage(url, heartbeat=heartbeat)


def _record(study: optuna.Study, config: StudyConfig, n_trials: int) -> None:
    """Record the budget (a later ``search run --n-trials`` may change it), and once, when the
    study is new, its study file and artifact folder.

    ``artifacts_dir`` is resolved from the folder of the run that created the study and never
    rewritten: a run started from another folder writes to the same store (see
    :func:`with_study_artifacts_dir`), so no checkpoint is split off where export misses it.
    """
    study.set_user_attr("n_trials", n_trials)
    recorded = study.user_attrs
    if "study_file" not in recorded:
        study.set_user_attr("study_file", str(config.source))
    if "artifacts_dir" not in recorded:
        study.set_user_attr("artifacts_dir", str(config.artifacts_dir.resolve()))
    if GRACE_ATTR not in recorded:  # a `search proxy` reaps the study's trials with it
        study.set_user_attr(GRACE_ATTR, config.heartbeat.grace_s)


def make_sampler(config: StudyConfig, worker_index: int) -> optuna.samplers.BaseSampler:
    """TPE (or random) seeded per worker, so workers do not draw the same startup trials."""
    seed = config.study.seed + 1000 * worker_index
    if config.sampler.kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=config.sampler.n_startup_trials, multivariate=True,
        group=True, constant_liar=True)


def make_pruner(config: StudyConfig) -> optuna.pruners.BasePruner:
    """The study's pruner; epochs are the resource Hyperband allocates."""
    pruner = config.pruner
    min_resource, warmup_steps = pruner.first_step(config.train.epochs)
    if pruner.kind == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=min_resource, max_resource=config.train.epochs,
            reduction_factor=pruner.reduction_factor)
    if pruner.kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=min_resource, reduction_factor=pruner.reduction_factor)
    if pruner.kind == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=pruner.n_startup_trials, n_warmup_steps=warmup_steps)
    return optuna.pruners.NopPruner()


def require_existing_storage(storage_url: str, config: StudyConfig) -> None:
    """Fail unless the storage can hold the study already, i.e. is not about to be created.

    SQLAlchemy creates a missing SQLite file on connect, which would show an empty dashboard
    (or a confusing "study not found") for a mistyped path; we refuse instead.

    Raises:
        StorageError: The SQLite file does not exist, or the URL is in-memory SQLite.
    """
    url = normalize_url(storage_url)
    if not url.startswith("sqlite"):
        return  # server databases: open_study checks they answer
    try:
        database = make_url(url).database
    except ArgumentError as error:
        raise StorageError(f"storage URL {redact(storage_url)} is invalid: {error}") from None
    if not database or database == ":memory:":
        raise StorageError(f"storage {redact(storage_url)} is an in-memory SQLite database; "
                           "it holds no study once `search run` has exited")
    if not Path(database).is_file():
        raise StorageError(f"no SQLite database at {database}: run `search run --study "
                           f"{config.source}` first, or pass --storage")


def study_artifacts_dir(config: StudyConfig, study: optuna.Study) -> Path:
    """The artifact store to read: the study file's, else the one the study recorded.

    ``artifacts_dir`` in the study file is relative to where ``search`` runs; the study
    remembers the absolute folder, which finds the artifacts from any other directory. A
    copy of a study's folder (database and artifacts) reads its own copy.
    """
    if config.artifacts_dir.is_dir():
        return config.artifacts_dir
    recorded = study.user_attrs.get("artifacts_dir")
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    return config.artifacts_dir


def _name_objective(study: optuna.Study) -> None:
    """Show "val macro F1" instead of "Objective Value" in optuna-dashboard's plots."""
    if study.metric_names is None:  # written once; each worker's run need not rewrite it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retrying(study.set_metric_names, [OBJECTIVE_NAME])


def with_study_artifacts_dir(config: StudyConfig, study: optuna.Study) -> StudyConfig:
    """``config`` writing to the artifact folder the study recorded, from whatever folder.

    Checkpoints, confusion matrices and resume files of one study then live in one store.
    A worker on another machine needs that folder at the same path (a shared mount, or the
    same volume as in docker-compose.yml).
    """
    recorded = study.user_attrs.get("artifacts_dir")
    if not recorded or Path(recorded) == config.artifacts_dir.resolve():
        return config
    section = config.study.model_copy(update={"artifacts_dir": Path(recorded)})
    return config.model_copy(update={"study": section})
