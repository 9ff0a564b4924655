"""The one way a trial interrupted from outside comes back, whatever interrupted it.

Optuna cannot move a trial from RUNNING back to WAITING. So a trial whose worker was killed
(``search run`` saw the process die), preempted (SIGTERM from Slurm or Kubernetes) or went
silent (a stale heartbeat, found by whichever worker polls next) ends FAIL, and a copy with the
same parameters is queued. The copy is made by Optuna's ``RetryHeartbeatStaleTrialCallback``
(as :class:`CopyOnce`, the storage's heartbeat-stale callback): it keeps the user attributes, so
the copy's ``origin_trial`` names the resume file the killed trial wrote after its last finished
epoch (:mod:`search.trial.objective`), and the intermediate values, so pruning sees one history.
A FAIL trial that has such a copy is a requeue, not a failure: ``search status`` and the
failure counts tell them apart.

Two rules keep the budget exact while workers top it up concurrently (the chaos test found
both):

* A trial gets at most one copy. Several processes can notice the same dead trial (``search
  run``'s supervisor and another worker's stale-heartbeat sweep), and a copy created just before
  a dropped connection is retried; :class:`CopyOnce` looks for an existing copy first.
* The copy is queued *before* the trial is failed. The other order leaves a moment in which
  the trial counts neither as running nor as waiting, and a worker topping up the budget in that
  moment (say, right after a database restart delayed the copy) queues a fresh trial on top.
"""

from __future__ import annotations

import logging

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat  # private: optuna<6 in pyproject.toml
from optuna.trial import FrozenTrial, TrialState

from search.study.storage import retrying

# User attribute: why a trial was ended from outside ("killed by SIGKILL", "preempted", ...).
# The copy inherits it, so it also says why the copy exists.
INTERRUPTED = "interrupted"
logger = logging.getLogger("search.study.requeue")


class CopyOnce(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry callback, made idempotent: no second copy of a trial that has one.

    Retried through database outages here, since Optuna's ``fail_stale_trials`` calls it once:
    a copy lost to a dropped connection would lose the trial.
    """

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        retrying(self._copy_once, study, trial)

    def _copy_once(self, study: optuna.Study, trial: FrozenTrial) -> None:
        # Re-checked on every attempt: an insert whose acknowledgement was lost did land.
        if trial.number in requeued_numbers(study.get_trials(deepcopy=False)):
            logger.info("trial %d already has its resuming copy", trial.number)
            return
        super().__call__(study, trial)


def requeue(study: optuna.Study, trial: FrozenTrial, reason: str) -> bool:
    """Queue the resuming copy of the RUNNING ``trial``, then end it FAIL with ``reason``.

    Returns False when the trial had finished meanwhile (nothing to do). Safe to call from a
    process other than the trial's worker: everything goes through the storage.
    """
    if not mark_and_copy(study, trial._trial_id, reason):
        return False
    try:
        retrying(study._storage.set_trial_state_values, trial._trial_id, TrialState.FAIL)
    except UpdateFinishedTrialError:
        pass  # failed meanwhile by a stale-heartbeat sweep, which found our copy and kept it
    return True


def mark_and_copy(study: optuna.Study, trial_id: int, reason: str) -> bool:
    """Record why the RUNNING trial ``trial_id`` stops and queue its resuming copy.

    The trial is left RUNNING: its caller fails it next (:func:`requeue`, or Optuna itself
    for a preempted trial, whose worker calls this on the way out). Returns False when the
    trial had already finished.
    """
    storage = study._storage
    try:
        retrying(storage.set_trial_user_attr, trial_id, INTERRUPTED, reason)
    except UpdateFinishedTrialError:  # finished since the caller looked (a RuntimeError)
        return False
    queue_copy(study, retrying(storage.get_trial, trial_id))
    return True


def queue_copy(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue the resuming copy of ``trial`` (RUNNING or FAIL) unless it has one."""
    storage = study._storage
    # Studies are opened on get_storage's RDB storage, which Optuna wraps in a cache, or on
    # the proxy's client; all keep heartbeats (Optuna's own fail_stale_trials narrows the same
    # way).
    assert isinstance(storage, BaseHeartbeat), type(storage)
    callback = storage.get_heartbeat_stale_trial_callback()
    if callback is not None:  # the same copy a stale heartbeat gets; max_retry applies
        callback(study, trial)


def requeued_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of the trials that have a queued, running or finished copy.

    Optuna's callback appends every failed predecessor to the copy's ``retry_history`` (its
    ``failed_trial`` keeps naming the first one), so a copy of a copy lists both.
    """
    return {number for t in trials for number in t.system_attrs.get("retry_history", ())}


def reason(trial: FrozenTrial) -> str:
    """Why a requeued trial ended, for ``search status``.

    A copy inherits its predecessor's reason and the objective blanks it when the copy starts
    (keeping it as ``resumed_after``), so an empty reason here means a stale heartbeat.
    """
    return trial.user_attrs.get(INTERRUPTED) or "its worker stopped sending heartbeats"
