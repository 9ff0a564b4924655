"""The one requeue path keeps the budget exact: one copy per interrupted trial, never a gap.

These are the two races the chaos test (tests/db/test_chaos.py) ran into, played out step by
step on a real storage so that each interleaving happens every time.
"""

from __future__ import annotations

import time

import optuna
from optuna.trial import TrialState

from search.config import HeartbeatConfig
from search.study.budget import budget_state, top_up
from search.study.requeue import INTERRUPTED, queue_copy, requeue, requeued_numbers
from search.study.storage import get_storage

BEATS = HeartbeatConfig(interval_s=1, grace_s=1)
# Until the trial's one heartbeat is stale: SQLite and MariaDB keep whole seconds, so a beat
# at 10.1 s reads "10" and the time 1.5 s later "11", which is within a 1 s grace.
STALE_AFTER_S = BEATS.grace_s + 2.5


def running_trial(storage_url: str, name: str) -> tuple[optuna.Study, optuna.trial.FrozenTrial]:
    """A study of budget 1 whose only trial is RUNNING with an epoch reported and a beat."""
    study = optuna.create_study(study_name=name, storage=get_storage(storage_url, heartbeat=BEATS))
    study.enqueue_trial({"x": 1.0})
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 2)})
    trial.report(0.5, 0)
    study._storage.record_heartbeat(trial._trial_id)
    return study, study.get_trials()[0]


def states(study: optuna.Study) -> list[TrialState]:
    return [t.state for t in study.get_trials()]


def test_a_trial_requeued_by_two_processes_gets_one_copy(storage_url):
    """``search run``'s supervisor and another worker's stale-heartbeat sweep both notice the
    same dead trial; a retried copy whose insert did land is asked for twice."""
    study, trial = running_trial(storage_url, "twice")
    time.sleep(STALE_AFTER_S)  # the killed worker's heartbeat is stale by now
    assert requeue(study, trial, "killed by SIGKILL")
    optuna.storages.fail_stale_trials(study)  # the other worker's sweep comes second
    queue_copy(study, study.get_trials()[0])  # a retry after a lost acknowledgement
    assert states(study) == [TrialState.FAIL, TrialState.WAITING]
    copy = study.get_trials()[1]
    assert copy.system_attrs["retry_history"] == [0] and copy.intermediate_values == {0: 0.5}
    assert copy.user_attrs[INTERRUPTED] == "killed by SIGKILL"

    study, trial = running_trial(storage_url, "sweep-first")
    time.sleep(STALE_AFTER_S)
    optuna.storages.fail_stale_trials(study)  # the sweep comes first this time
    assert not requeue(study, trial, "killed by SIGKILL")
    assert states(study) == [TrialState.FAIL, TrialState.WAITING]
    assert requeued_numbers(study.get_trials()) == {0}


def test_a_top_up_during_a_requeue_never_adds_a_trial(storage_url):
    """Another worker tops the budget up while the requeue is half done (say, a database
    restart delayed its second step): the copy must already count, or the budget overruns."""
    study, trial = running_trial(storage_url, "gap")
    storage = study._storage
    create, finish = storage.create_new_trial, storage.set_trial_state_values
    seen: list[int] = []

    def topping_up(call):
        def wrapped(*args, **kwargs):
            if not seen or seen[-1] >= 0:  # not while the top-up itself writes
                seen.append(-1)
                seen[-1] = top_up(study, 1)
            return call(*args, **kwargs)
        return wrapped

    storage.create_new_trial = topping_up(create)
    storage.set_trial_state_values = topping_up(finish)
    try:
        assert requeue(study, trial, "killed by SIGKILL")
    finally:
        storage.create_new_trial, storage.set_trial_state_values = create, finish
    assert seen == [0, 0]  # a top-up before each write of the requeue, and none queued
    assert states(study) == [TrialState.FAIL, TrialState.WAITING]
    assert budget_state(study, 1).live == 1
