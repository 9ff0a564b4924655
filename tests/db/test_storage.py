"""Storage contract: the same checks on SQLite, PostgreSQL and MariaDB, each in a fresh database."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time

import optuna
import pytest
import sqlalchemy
from optuna.exceptions import StorageInternalError
from optuna.trial import TrialState

from search.config import HeartbeatConfig
from search.config import read_study_file as load_config
from search.errors import StorageError
from search.study.budget import StudyLock, budget_state, queue_start_points, top_up
from search.study.open import open_study
from search.study.storage import (
    ResilientRDBStorage,
    RetryPolicy,
    StorageLostError,
    call_with_retries,
    check_reachable,
    get_storage,
    interruptible,
    is_transient,
    normalize_url,
    retrying,
)
from tests.db.conftest import tiny_study


@pytest.fixture
def storage(storage_url):
    opened = get_storage(storage_url)
    yield opened
    opened.engine.dispose()  # a server database cannot be dropped while we hold sessions


def test_a_trial_round_trips_attributes_values_and_state(storage):
    study = optuna.create_study(study_name="contract", storage=storage, direction="maximize")
    trial = study.ask()
    trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    trial.report(0.25, 0)
    trial.set_user_attr("timing", {"storage_s": 0.1, "total_s": 2.0})
    study.tell(trial, 0.5)
    frozen = optuna.load_study(study_name="contract", storage=storage).trials[0]
    assert isinstance(storage, ResilientRDBStorage)
    assert frozen.state == TrialState.COMPLETE and frozen.value == 0.5
    assert frozen.intermediate_values == {0: 0.25}
    assert frozen.user_attrs["timing"] == {"storage_s": 0.1, "total_s": 2.0}


def test_concurrent_workers_create_the_study_once(storage_url, workdir):
    config = load_config(str(tiny_study(workdir, n_trials=3)))
    studies, errors = [], []

    def join() -> None:
        try:
            studies.append(open_study(config, storage_url, mode="join", n_trials=3))
        except Exception as error:  # collected and reported below
            errors.append(error)

    threads = [threading.Thread(target=join) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert len({s._study_id for s in studies}) == 1
    summaries = optuna.get_all_study_summaries(storage=get_storage(storage_url))
    assert [s.study_name for s in summaries] == ["tiny"]
    assert studies[0].user_attrs["n_trials"] == 3
    for study in studies:
        study._storage._backend.engine.dispose()


def test_study_lock_excludes_a_second_holder(storage_url):
    first, second = StudyLock(storage_url, "locked"), StudyLock(storage_url, "locked")
    other_study = StudyLock(storage_url, "other")
    acquired = threading.Event()
    first.acquire()
    waiter = threading.Thread(target=lambda: (second.acquire(), acquired.set()))
    waiter.start()
    try:
        other_study.acquire()  # a different study's lock is independent
        other_study.release()
        assert not acquired.wait(1.0)
        first.release()
        assert acquired.wait(30)
    finally:
        first.close()
        waiter.join(timeout=30)
        second.close()
        other_study.close()


def test_top_up_queues_exactly_the_missing_trials(storage):
    study = optuna.create_study(study_name="budget", storage=storage)
    assert top_up(study, 3) == 3
    assert top_up(study, 3) == 0  # idempotent: a recount finds the queue full
    trial = study.ask()
    study.tell(trial, state=TrialState.FAIL)  # a failure gives its slot back
    assert top_up(study, 3) == 1
    state = budget_state(study, 3)
    assert state.waiting == 3 and state.live == 3 and not state.spent


def test_start_points_are_queued_first_once_and_within_the_budget(storage):
    study = optuna.create_study(study_name="start", storage=storage, direction="maximize")
    points = [{"fusion": "joint", "lr": 3e-3}, {"fusion": "early"}]
    assert queue_start_points(study, points, 1) == 1  # the budget has room for one
    assert queue_start_points(study, points, 3) == 1  # the first is queued already
    assert queue_start_points(study, points, 3) == 0
    assert top_up(study, 3) == 1
    first = study.ask()
    assert first.suggest_categorical("fusion", ["none", "early", "joint"]) == "joint"
    assert first.suggest_float("lr", 1e-3, 1e-2, log=True) == 3e-3
    study.tell(first, 0.5)
    assert queue_start_points(study, points, 4) == 0  # a finished point stays finished
    second = study.ask()
    assert second.suggest_categorical("fusion", ["none", "early", "joint"]) == "early"


def test_calls_survive_the_server_dropping_every_connection(server_url):
    storage = get_storage(server_url, heartbeat=None)
    study = optuna.create_study(study_name="dropped", storage=storage)
    trial = study.ask()
    trial.set_user_attr("before", 1)
    _kill_sessions(server_url)
    trial.set_user_attr("after", 2)  # pre-ping notices the dead connection and reconnects
    storage.record_heartbeat(trial._trial_id)
    _kill_sessions(server_url)
    study.tell(trial, 1.0)
    assert study.trials[0].user_attrs == {"before": 1, "after": 2}
    assert study.trials[0].state == TrialState.COMPLETE
    storage.engine.dispose()


def _kill_sessions(url: str) -> None:
    """End every other session on the test's database, as a server restart would."""
    engine = sqlalchemy.create_engine(normalize_url(url), isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        name = engine.url.database
        if engine.dialect.name == "postgresql":
            connection.execute(sqlalchemy.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :db AND pid <> pg_backend_pid()"), {"db": name})
        else:
            rows = connection.execute(sqlalchemy.text(
                "SELECT id FROM information_schema.processlist "
                "WHERE db = :db AND id <> CONNECTION_ID()"), {"db": name})
            for (session_id,) in list(rows):
                connection.execute(sqlalchemy.text(f"KILL {int(session_id)}"))
    engine.dispose()


def test_unreachable_server_is_one_line_naming_the_url_without_password():
    with pytest.raises(StorageError) as raised:
        check_reachable("postgresql://someone:secret@127.0.0.1:1/nothing")
    message = str(raised.value)
    assert "127.0.0.1:1" in message and "secret" not in message and "\n" not in message
    with pytest.raises(StorageError, match="not a URL"):
        check_reachable("localhost:5432")
    with pytest.raises(StorageError, match="cannot reach storage"):
        check_reachable("oracle://127.0.0.1/x")


def test_retries_wait_for_transient_errors_and_give_up_with_a_storage_error():
    calls = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed"))
        return "ok"

    policy = RetryPolicy(total_s=5, first_wait_s=0.01, max_wait_s=0.05)
    assert call_with_retries(flaky, policy=policy) == "ok" and len(calls) == 3

    def down() -> None:
        raise StorageInternalError("commit failed") from sqlalchemy.exc.OperationalError(
            "COMMIT", {}, Exception("connection refused"))

    with pytest.raises(StorageLostError, match="connection refused") as raised:
        call_with_retries(down, policy=RetryPolicy(total_s=0.2, first_wait_s=0.05))
    assert isinstance(raised.value, StorageError)  # the CLI prints it as one line
    assert not is_transient(raised.value)  # an outer retry loop does not start over

    def bad_statement() -> None:
        raise sqlalchemy.exc.ProgrammingError("SELECT nope", {}, Exception("syntax"))

    with pytest.raises(sqlalchemy.exc.ProgrammingError):
        call_with_retries(bad_statement, policy=policy)  # not retried


@pytest.mark.parametrize(("error", "transient"), [
    (sqlalchemy.exc.OperationalError("x", {}, Exception("server closed the connection")), True),
    (sqlalchemy.exc.InterfaceError("x", {}, Exception("connection already closed")), True),
    (sqlalchemy.exc.OperationalError("x", {}, sqlite3.OperationalError("database is locked")),
     True),
    (sqlalchemy.exc.OperationalError("x", {}, sqlite3.OperationalError("no such table: x")),
     False),
    (sqlalchemy.exc.IntegrityError("x", {}, Exception("duplicate key")), False),
    (ValueError("not a storage error"), False),
])
def test_only_connection_errors_are_transient(error, transient):
    assert is_transient(error) is transient
    wrapped = StorageInternalError("An exception is raised during the commit.")
    wrapped.__cause__ = error  # how RDBStorage reports every SQLAlchemy error
    assert is_transient(wrapped) is transient


def test_a_stuck_lock_holder_is_a_clear_error_after_a_bounded_wait(storage_url):
    holder = StudyLock(storage_url, "stuck")  # a second real connection, holding the lock
    waiter = StudyLock(storage_url, "stuck", wait_s=2)
    holder.acquire()
    try:
        started = time.monotonic()
        with pytest.raises(StorageError) as raised:
            waiter.acquire()
        waited = time.monotonic() - started
    finally:
        holder.close()
        waiter.close()
    assert 1.5 <= waited < 6, waited
    message = str(raised.value)
    database = sqlalchemy.engine.make_url(storage_url).database
    assert database in message and "study lock " in message and "fusion-search-" in message
    assert "is still held by another" in message and "after 2 s" in message
    assert "\n" not in message
    assert waiter._connection is None and waiter._file is None  # nothing held after giving up
    waiter.acquire()  # once the holder is gone, the lock is free again
    waiter.close()


def test_a_running_trial_that_never_beat_is_failed_and_retried(storage_url):
    """A WAITING -> RUNNING commit whose acknowledgement was lost leaves a trial RUNNING
    with no heartbeat row and no worker; the stale-trial sweep must fail and retry it."""
    storage = get_storage(storage_url, heartbeat=HeartbeatConfig(interval_s=1, grace_s=2))
    study = optuna.create_study(study_name="lost-ack", storage=storage)
    study.enqueue_trial({"x": 1.0})
    [waiting] = study.get_trials()
    # What a worker's pop committed before its connection dropped: nobody runs this trial.
    assert storage.set_trial_state_values(waiting._trial_id, TrialState.RUNNING)
    beating = study.ask()  # a trial that does beat, and must be left alone
    storage.record_heartbeat(beating._trial_id)
    optuna.storages.fail_stale_trials(study)
    assert study.get_trials()[0].state == TrialState.RUNNING  # within its grace period
    time.sleep(2.5)
    storage.record_heartbeat(beating._trial_id)
    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]
    assert trials[2].system_attrs["failed_trial"] == 0 and trials[2].params == {}
    storage.engine.dispose()


def test_an_interrupt_ends_storage_retries_at_once():
    attempts = []

    def unreachable() -> None:
        attempts.append(time.monotonic())
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("connection refused"))

    policy = RetryPolicy(total_s=60, first_wait_s=0.2, max_wait_s=0.2)
    timer = threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT))
    with interruptible():
        started = time.monotonic()
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            call_with_retries(unreachable, policy=policy)
        assert time.monotonic() - started < 1.5
        # Clean-up after Ctrl-C (failing the running trial...) tries once, waits for nothing.
        attempts.clear()
        with pytest.raises(KeyboardInterrupt):
            call_with_retries(unreachable, policy=policy)
        assert len(attempts) == 1
        with pytest.raises(KeyboardInterrupt):
            retrying(unreachable)
    # Outside, the next interrupt-free call retries as usual again.
    with pytest.raises(StorageLostError):
        call_with_retries(unreachable, policy=RetryPolicy(total_s=0.3, first_wait_s=0.05))


def test_opening_a_storage_waits_out_a_database_restart(own_postgres):
    """A worker that opens its storage as the server restarts waits, as other calls do."""
    own_postgres.stop("fast")
    opened: list = []
    thread = threading.Thread(target=lambda: opened.append(get_storage(
        own_postgres.url, retry=RetryPolicy(total_s=60, first_wait_s=0.1, max_wait_s=1))))
    thread.start()
    time.sleep(2)
    assert not opened and thread.is_alive()  # still waiting, not failed
    own_postgres.start()
    thread.join(timeout=60)
    [storage] = opened
    assert storage.get_all_studies() == []
    storage.engine.dispose()
