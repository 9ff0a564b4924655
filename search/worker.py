"""One worker: joins the study and runs trials until the shared budget is spent.

Workers coordinate only through the study in the database (see :mod:`search.budget`).
``search run`` starts one per GPU; ``search worker`` starts one by hand on any machine.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import optuna
import torch
from optuna.trial import TrialState

from search.artifacts import create_artifact_store
from search.budget import StudyLock, budget_state, queue_start_points, top_up
from search.config import StudyConfig
from search.data import prepare_data
from search.errors import UserError
from search.objective import Objective, pick_device
from search.storage import StorageLostError, check_reachable, get_storage

POLL_S = 2.0
logger = logging.getLogger("search.worker")


@dataclass(frozen=True)
class WorkerOptions:
    """How this worker runs; everything else comes from the study file."""

    storage_url: str
    n_trials: int | None = None  # None: the budget stored in the study (`search run` sets it)
    worker_index: int = 0
    threads: int | None = None
    timeout_s: float | None = None


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


def load_study(config: StudyConfig, storage_url: str, *, n_trials: int,
               worker_index: int = 0) -> optuna.Study:
    """Load the study with this worker's sampler and the study's pruner, creating it if needed.

    The study file's start points are queued here, under the lock, ahead of sampled trials
    (once: points already in the study are skipped).

    Workers scaled by ``docker compose`` start together with no ``search run`` before them,
    so the first one creates the study. Creation runs under the study lock: SQLite workers
    would otherwise race on creating the tables, server workers on the study row.
    """
    check_reachable(storage_url)
    lock = StudyLock(storage_url, config.name)
    try:
        lock.acquire()
        storage = get_storage(storage_url, heartbeat=config.heartbeat)
        study = optuna.create_study(study_name=config.name, storage=storage,
                                    direction="maximize", load_if_exists=True,
                                    sampler=make_sampler(config, worker_index),
                                    pruner=make_pruner(config))
        if "n_trials" not in study.user_attrs:  # created here, not by `search run`
            study.set_user_attr("n_trials", n_trials)
            study.set_user_attr("study_file", str(config.source))
            study.set_user_attr("artifacts_dir", str(config.artifacts_dir.resolve()))
        queue_start_points(study, config.start_points(), n_trials)
    finally:
        lock.close()
    return study


def run_worker(config: StudyConfig, options: WorkerOptions) -> int:
    """Run trials until the budget is complete or pruned; returns the trials run here.

    The budget is ``options.n_trials`` when given, else the one the study holds (set by
    ``search run --n-trials``), so a worker started by hand elsewhere shares it exactly.
    """
    if options.threads:
        torch.set_num_threads(options.threads)
    device = pick_device(config.train.device)  # before touching the storage
    study = load_study(config, options.storage_url,
                       n_trials=options.n_trials or config.study.n_trials,
                       worker_index=options.worker_index)
    n_trials = options.n_trials or study.user_attrs["n_trials"]
    data = prepare_data(config)
    lock = StudyLock(options.storage_url, config.name)
    objective = Objective(data, artifact_store=create_artifact_store(config.artifacts_dir),
                          device=device, on_trial_start=lock.release)
    deadline = time.monotonic() + options.timeout_s if options.timeout_s else None
    ran = 0
    try:
        while deadline is None or time.monotonic() < deadline:
            if not _claim_slot(study, lock, n_trials):
                if budget_state(study, n_trials).spent:
                    break
                # Every remaining slot runs elsewhere; one may still fail and come back.
                optuna.storages.fail_stale_trials(study)
                time.sleep(POLL_S)
                continue
            started: list[int] = []
            try:
                study.optimize(_noting_trial(objective, started), n_trials=1,
                               catch=(Exception,))
            except Exception as error:
                if isinstance(error, StorageLostError) or not _taken_over(study, started):
                    raise
            finally:
                lock.release()
            ran += 1
            _check_failures(study, n_trials)
    finally:
        lock.close()
    return ran


def _claim_slot(study: optuna.Study, lock: StudyLock, n_trials: int) -> bool:
    """Take the lock if a WAITING trial is ready for us (queueing one if the budget allows).

    The lock stays held until the objective starts, i.e. until ``ask()`` has popped the
    waiting trial, so two workers never race for the last slot.
    """
    lock.acquire()
    state = budget_state(study, n_trials)
    if state.spent or (state.waiting == 0 and top_up(study, n_trials) == 0):
        lock.release()
        return False
    return True


def _noting_trial(objective: Objective, started: list[int]):
    """The objective, noting the number of the trial it runs into ``started``."""

    def run(trial: optuna.Trial) -> float:
        started.append(trial.number)
        return objective(trial)

    return run


def _taken_over(study: optuna.Study, started: list[int]) -> bool:
    """Whether the trial just run was failed as stale by another worker meanwhile.

    A database outage longer than the heartbeat grace period lets another worker fail the
    trial and queue its retry; this copy's result can then no longer be told (Optuna raises).
    The retry resumes from the last epoch, so this worker logs it and goes on.
    """
    if not started:
        return False
    trial = study.get_trials(deepcopy=False)[started[-1]]
    if trial.state != TrialState.FAIL or "fail_reason" in trial.user_attrs:
        return False
    logger.warning("trial %d was failed as stale by another worker during a database outage; "
                   "its retry continues from the last epoch", trial.number)
    return True


def _check_failures(study: optuna.Study, n_trials: int) -> None:
    """Stop a study whose trials keep raising instead of looping forever.

    A few failures (say a backbone that runs out of memory) are expected and replaced;
    eight in a row, or four times the budget in all, mean something is broken.
    """
    trials = study.get_trials(deepcopy=False)
    raised = [t for t in trials if "fail_reason" in t.user_attrs]
    finished = [t for t in trials if t.state.is_finished()]
    streak = 0
    for trial in reversed(finished):
        if "fail_reason" not in trial.user_attrs:
            break
        streak += 1
    if streak >= 8 or len(raised) > 4 * n_trials:
        raise UserError(f"study {study.study_name!r}: {len(raised)} trials raised an error "
                        f"({streak} in a row); last: {raised[-1].user_attrs['fail_reason']} "
                        "(see `search status`)")
