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

from search.artifacts import create_artifact_store
from search.budget import StudyLock, budget_state, top_up
from search.config import StudyConfig
from search.data import prepare_data
from search.errors import UserError
from search.objective import Objective, pick_device
from search.storage import get_storage

POLL_S = 2.0
logger = logging.getLogger("search.worker")


@dataclass(frozen=True)
class WorkerOptions:
    """How this worker runs; everything else comes from the study file."""

    storage_url: str
    n_trials: int
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
    if pruner.kind == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=pruner.min_resource, max_resource=config.train.epochs,
            reduction_factor=pruner.reduction_factor)
    if pruner.kind == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=pruner.n_startup_trials, n_warmup_steps=pruner.n_warmup_steps)
    return optuna.pruners.NopPruner()


def load_study(config: StudyConfig, storage, worker_index: int = 0) -> optuna.Study:
    """Load the study with this worker's sampler and the study's pruner."""
    try:
        return optuna.load_study(study_name=config.name, storage=storage,
                                 sampler=make_sampler(config, worker_index),
                                 pruner=make_pruner(config))
    except KeyError:
        raise UserError(f"study {config.name!r} does not exist in the storage; "
                        f"start it with `search run --study {config.source}`") from None


def run_worker(config: StudyConfig, options: WorkerOptions) -> int:
    """Run trials until ``options.n_trials`` are complete or pruned; returns trials run here."""
    if options.threads:
        torch.set_num_threads(options.threads)
    storage = get_storage(options.storage_url, heartbeat=config.heartbeat)
    study = load_study(config, storage, options.worker_index)
    data = prepare_data(config)
    lock = StudyLock(options.storage_url, config.name)
    objective = Objective(data, artifact_store=create_artifact_store(config.artifacts_dir),
                          device=pick_device(config.train.device), on_trial_start=lock.release)
    deadline = time.monotonic() + options.timeout_s if options.timeout_s else None
    ran = 0
    try:
        while deadline is None or time.monotonic() < deadline:
            if not _claim_slot(study, lock, options.n_trials):
                if budget_state(study, options.n_trials).spent:
                    break
                # Every remaining slot runs elsewhere; one may still fail and come back.
                optuna.storages.fail_stale_trials(study)
                time.sleep(POLL_S)
                continue
            try:
                study.optimize(objective, n_trials=1, catch=(Exception,))
            finally:
                lock.release()
            ran += 1
            _check_failures(study, options.n_trials)
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
