"""One worker: joins the study and runs trials until the shared budget is spent.

Workers coordinate only through the study in the database (see :mod:`search.study.budget`).
``search run`` starts one per GPU; ``search worker`` starts one by hand on any machine.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass

import optuna
import torch
from optuna.trial import TrialState

from search.config import StudyConfig
from search.data.prepared import prepare_data
from search.errors import Preempted, UserError
from search.launch.placement import slurm_attrs
from search.study.budget import StudyLock, budget_state, top_up
from search.study.open import open_study, with_study_artifacts_dir
from search.study.proxy import NoWaitingTrial, is_proxy_url
from search.study.storage import StorageLostError, interruptible, retrying
from search.trial.artifacts import create_artifact_store
from search.trial.objective import Objective, check_pretrained, pick_device
from search.trial.prefetch import keep_freed_host_memory

POLL_S = 2.0
logger = logging.getLogger("search.study.worker")


@dataclass(frozen=True)
class WorkerOptions:
    """How this worker runs; everything else comes from the study file."""

    storage_url: str
    n_trials: int | None = None  # None: the budget stored in the study (`search run` sets it)
    worker_index: int = 0
    threads: int | None = None
    timeout_s: float | None = None
    # How long a database that refuses connections is waited for at start; 0 fails at once.
    wait_for_storage_s: float = 0.0


def run_worker(config: StudyConfig, options: WorkerOptions) -> int:
    """Run trials until the budget is complete or pruned; returns the trials run here.

    The budget is ``options.n_trials`` when given, else the one the study holds (set by
    ``search run --n-trials``), so a worker started by hand elsewhere shares it exactly.
    """
    with interruptible():
        return _run_worker(config, options)


def _run_worker(config: StudyConfig, options: WorkerOptions) -> int:
    if options.threads:
        torch.set_num_threads(options.threads)
    device = pick_device(config.train.device)  # before touching the storage
    check_pretrained(config)  # and fetch ImageNet weights before a trial needs them
    study = open_study(config, options.storage_url, mode="join",
                       n_trials=options.n_trials or config.study.n_trials,
                       worker_index=options.worker_index,
                       wait_s=options.wait_for_storage_s)
    n_trials = options.n_trials or study.user_attrs["n_trials"]
    config = with_study_artifacts_dir(config, study)
    data = prepare_data(config)
    keep_freed_host_memory()  # each batch reuses the last one's memory (see its docstring)
    # Behind the gRPC proxy there is no lock to take: the proxy queues the budget, this
    # worker only pops (see search.study.proxy).
    lock = None if is_proxy_url(options.storage_url) else StudyLock(options.storage_url,
                                                                    config.name)
    objective = Objective(data, artifact_store=create_artifact_store(config.artifacts_dir),
                          device=device, on_trial_start=lock.release if lock else _nothing)
    deadline = time.monotonic() + options.timeout_s if options.timeout_s else None
    ran = 0
    started: list[int] = []
    previous = _raise_on_sigterm()
    try:
        while deadline is None or time.monotonic() < deadline:
            if not _claim_slot(study, lock, n_trials):
                if budget_state(study, n_trials).spent:
                    break
                # Every remaining slot runs elsewhere; one may still fail and come back
                # (_claim_slot sweeps stale trials on every call).
                time.sleep(POLL_S)
                continue
            started.clear()
            try:
                study.optimize(_noting_trial(objective, started), n_trials=1,
                               catch=(Exception,))
            except NoWaitingTrial:
                continue  # another worker popped the last waiting trial first
            except Exception as error:
                if isinstance(error, StorageLostError) or not _taken_over(study, started):
                    raise
            finally:
                if lock is not None:
                    lock.release()
            ran += 1
            _check_failures(study, n_trials)
    finally:
        if lock is not None:
            lock.close()
        # After a preemption SIGTERM stays ignored: the process exits 75 next, not -15.
        if previous is not None and signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
            signal.signal(signal.SIGTERM, previous)
    return ran


def _raise_on_sigterm():
    """Turn SIGTERM into :class:`Preempted` in the main thread; returns the old handler.

    Python runs the handler between bytecodes of the main thread, so a training step is left
    as soon as the current PyTorch call returns: within a few seconds, inside the grace period
    Slurm (``--signal``) and Kubernetes (``terminationGracePeriodSeconds``) give.
    """
    if threading.current_thread() is not threading.main_thread():
        return None  # signals reach only the main thread (tests run workers in threads)

    def preempt(signum: int, frame: object) -> None:
        # Once is enough: a second SIGTERM (scancel signals the batch shell, which forwards
        # it, and the worker itself) must not cut short the requeue of the running trial.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Preempted(f"{signal.Signals(signum).name}; the running trial resumes elsewhere")

    return signal.signal(signal.SIGTERM, preempt)


def _nothing() -> None:
    pass


def _claim_slot(study: optuna.Study, lock: StudyLock | None, n_trials: int) -> bool:
    """Take the lock if a WAITING trial is ready for us (queueing one if the budget allows).

    The lock stays held until the objective starts, i.e. until ``ask()`` has popped the
    waiting trial, so two workers never race for the last slot. Without a
    lock (behind the proxy) a worker only looks for a trial to pop; ``ask()`` refuses to
    make one if another worker popped it first.
    """
    if lock is None:
        state = budget_state(study, n_trials)
        return not state.spent and state.waiting > 0
    lock.acquire()
    # Under the lock: a failed stale trial's copy is queued before anyone counts the budget.
    optuna.storages.fail_stale_trials(study)
    state = budget_state(study, n_trials)
    if state.spent or (state.waiting == 0 and top_up(study, n_trials) == 0):
        lock.release()
        return False
    return True


def _noting_trial(objective: Objective, started: list[int]):
    """The objective, noting the number of the trial it runs into ``started``.

    Under Slurm it also records the job and task running the trial (``search status``
    shows them); a heartbeat retry overwrites the ids it copied from the dead task's trial.
    """
    placement = slurm_attrs()

    def run(trial: optuna.Trial) -> float:
        started.append(trial.number)
        for key, value in placement.items():
            retrying(trial.set_user_attr, key, value)
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
