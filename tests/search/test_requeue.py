"""The requeue path's safety net: an interrupted trial whose copy never got queued."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from search.study.requeue import INTERRUPTED, queue_copy, queue_missing_copies
from search.study.storage import get_storage


def _study(tmp_path) -> optuna.Study:
    storage = get_storage(f"sqlite:///{tmp_path / 'study.db'}")
    return optuna.create_study(study_name="s", storage=storage, direction="maximize")


def _failed(study: optuna.Study, reason: str | None) -> int:
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
    if reason is not None:
        trial.set_user_attr(INTERRUPTED, reason)
    study.tell(trial, state=TrialState.FAIL)
    return trial.number


def test_only_interrupted_trials_without_a_copy_get_one_once_the_grace_period_is_over(tmp_path):
    study = _study(tmp_path)
    orphan = _failed(study, "preempted (SIGTERM)")
    ctrl_c = _failed(study, None)  # Ctrl-C or an error: failed for good, no copy
    copied = _failed(study, "worker 0 (pid 1) killed by SIGKILL")
    queue_copy(study, study.get_trials()[copied])

    # Within the grace period the interrupting side may still be queueing the copy.
    assert queue_missing_copies(study, grace_s=3600) == []
    assert queue_missing_copies(study, grace_s=0) == [orphan]
    waiting = [t for t in study.get_trials() if t.state == TrialState.WAITING]
    assert [t.system_attrs["failed_trial"] for t in waiting] == [copied, orphan]
    assert waiting[1].params == study.get_trials()[orphan].params
    assert ctrl_c not in {t.system_attrs["failed_trial"] for t in waiting}
    # Idempotent: the next worker to look finds the copy and queues nothing.
    assert queue_missing_copies(study, grace_s=0) == []
