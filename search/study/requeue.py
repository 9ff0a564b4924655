"""The one way a trial interrupted from outside comes back, whatever interrupted it.

Optuna cannot move a trial from RUNNING back to WAITING. So a trial whose worker was killed
(``search run`` saw the process die), preempted (SIGTERM from Slurm or Kubernetes) or went
silent (a stale heartbeat, found by whichever worker polls next) ends FAIL, and a copy with the
same parameters is queued. The copy is made by the storage's heartbeat-stale callback
(Optuna's ``RetryHeartbeatStaleTrialCallback``): it keeps the user attributes, so the copy's
``origin_trial`` names the resume file the killed trial wrote after its last finished epoch
(:mod:`search.trial.objective`), and the intermediate values, so pruning sees one history.
A FAIL trial that has such a copy is a requeue, not a failure: ``search status`` and the
failure counts tell them apart.
"""

from __future__ import annotations

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages._heartbeat import BaseHeartbeat  # private: optuna<6 in pyproject.toml
from optuna.trial import FrozenTrial, TrialState

from search.study.storage import retrying

# User attribute: why a trial was ended from outside ("killed by SIGKILL", "preempted", ...).
# The copy inherits it, so it also says why the copy exists.
INTERRUPTED = "interrupted"


def requeue(study: optuna.Study, trial: FrozenTrial, reason: str) -> bool:
    """End the RUNNING ``trial`` as FAIL with ``reason`` and queue its resuming copy.

    Returns False when the trial had finished meanwhile (nothing to do). Safe to call from a
    process other than the trial's worker: everything goes through the storage.
    """
    storage = study._storage
    try:
        retrying(storage.set_trial_user_attr, trial._trial_id, INTERRUPTED, reason)
    except RuntimeError:  # finished between our read and this write
        return False
    try:
        retrying(storage.set_trial_state_values, trial._trial_id, TrialState.FAIL)
    except UpdateFinishedTrialError:
        # Finished meanwhile: by its worker, or failed as stale by another worker, whose
        # heartbeat callback queued the copy already (a second copy would overrun the budget).
        return False
    queue_copy(study, retrying(storage.get_trial, trial._trial_id))
    return True


def queue_copy(study: optuna.Study, failed: FrozenTrial) -> None:
    """Queue the resuming copy of a trial that already ended FAIL with its reason recorded
    (a preempted worker records the reason itself, then Optuna fails the trial)."""
    storage = study._storage
    # Studies are opened on get_storage's RDB storage, which Optuna wraps in a cache; both
    # keep heartbeats (Optuna's own fail_stale_trials narrows the same way).
    assert isinstance(storage, BaseHeartbeat), type(storage)
    callback = storage.get_heartbeat_stale_trial_callback()
    if callback is not None:  # the same copy a stale heartbeat gets; max_retry applies
        retrying(callback, study, failed)


def requeued_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of the FAIL trials that have a queued, running or finished copy.

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
