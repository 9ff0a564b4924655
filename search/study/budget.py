"""The shared trial budget: exactly ``n_trials`` complete or pruned trials, whoever runs them.

The budget is a queue of WAITING trials in the study itself. Optuna's ``ask()`` pops a
waiting trial atomically, so workers never need to talk to each other. Two short critical
sections, "is there a slot left? then ask" and "top the queue up", run under a lock that
every worker can reach: a file lock next to a SQLite database, or the server's own
advisory lock (``pg_try_advisory_lock`` / ``GET_LOCK``) for PostgreSQL and MariaDB. Either is
waited for at most ``LOCK_WAIT_S``; a holder stuck longer is an error that names the lock.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import filelock
import optuna
import sqlalchemy
import tenacity
from optuna.trial import TrialState

from search.errors import StorageError
from search.study.storage import (
    RetryPolicy,
    call_with_retries,
    engine_kwargs,
    is_transient,
    normalize_url,
    redact,
)

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
LIVE = (*COUNTED, TrialState.RUNNING, TrialState.WAITING)
# A critical section lasts one ask(); ten minutes of waiting means a stuck holder.
LOCK_WAIT_S = 600.0
# Polling a held server lock: the first retry soon, then at most once a second.
LOCK_POLL_FIRST_S, LOCK_POLL_MAX_S = 0.05, 1.0


@dataclass(frozen=True)
class BudgetState:
    """Trial counts of a study against its budget."""

    n_trials: int
    counts: dict[TrialState, int]

    @property
    def done(self) -> int:
        return sum(self.counts.get(state, 0) for state in COUNTED)

    @property
    def live(self) -> int:
        return sum(self.counts.get(state, 0) for state in LIVE)

    @property
    def spent(self) -> bool:
        return self.done >= self.n_trials

    @property
    def waiting(self) -> int:
        return self.counts.get(TrialState.WAITING, 0)

    @property
    def running(self) -> int:
        return self.counts.get(TrialState.RUNNING, 0)


def budget_state(study: optuna.Study, n_trials: int) -> BudgetState:
    """Count the study's trials by state."""
    trials = study.get_trials(deepcopy=False)
    return BudgetState(n_trials, dict(Counter(t.state for t in trials)))


def top_up(study: optuna.Study, n_trials: int, *, retry: RetryPolicy | None = None) -> int:
    """Queue WAITING trials until complete + pruned + running + waiting == ``n_trials``.

    Failed trials do not use the budget, so a failure is replaced by a fresh trial here.
    Call under :class:`StudyLock`. Returns how many trials were queued.
    """
    queued = 0
    while call_with_retries(_queue_one, study, n_trials, policy=retry or RetryPolicy(),
                            what="the study's storage"):
        queued += 1
    return queued


def queue_start_points(study: optuna.Study, points: list[dict], n_trials: int) -> int:
    """Queue the study file's start points (``[sampler] start_with``) as WAITING trials.

    A worker queues them when it loads the study, before it first tops the budget up, so in
    a new study they run first. A point already in the study, queued, run or finished, is
    not queued again (Optuna's ``skip_if_exists``): a second ``search run`` or a late worker
    never repeats one, and a retried call cannot queue it twice. The budget caps how many
    go in. Call under :class:`StudyLock`.
    """
    queued = 0
    for params in points:
        if budget_state(study, n_trials).live >= n_trials:
            break
        before = len(study.get_trials(deepcopy=False))
        call_with_retries(study.enqueue_trial, params, skip_if_exists=True,
                          policy=RetryPolicy(), what="the study's storage")
        queued += len(study.get_trials(deepcopy=False)) > before
    return queued


def _queue_one(study: optuna.Study, n_trials: int) -> bool:
    """Queue one trial if the budget has room; recounting first makes a retry safe.

    Creating a trial is not idempotent: if the connection drops after the insert committed,
    the retry counts that trial and does not queue a second one.
    """
    if budget_state(study, n_trials).live >= n_trials:
        return False
    # Empty params: the sampler chooses every parameter when the trial is popped.
    study.enqueue_trial({})
    return True


class StudyLock:
    """A lock named after the study, shared by every worker that can reach the storage.

    On a server the lock lives as long as its connection: if the server restarts, the lock
    is gone with it. Acquiring waits out such an outage; releasing a lock whose connection
    died is a no-op.
    """

    def __init__(self, storage_url: str, study_name: str, *,
                 retry: RetryPolicy | None = None, wait_s: float = LOCK_WAIT_S) -> None:
        self._url = normalize_url(storage_url)
        self._name = study_name
        self._retry = retry or RetryPolicy()
        self._wait_s = wait_s
        self._file: filelock.FileLock | None = None
        self._connection: sqlalchemy.Connection | None = None
        self._engine: sqlalchemy.Engine | None = None

    def acquire(self) -> None:
        if self._url.startswith("sqlite"):
            self._acquire_file()
        else:
            call_with_retries(self._acquire_server, policy=self._retry,
                              what=f"the study lock's storage {redact(self._url)}")

    def release(self) -> None:
        """Release the lock; safe to call when it is not held."""
        if self._file is not None:
            self._file.release()
            self._file = None
        if self._connection is not None:
            connection, self._connection = self._connection, None
            try:
                connection.execute(*self._server_sql(unlock=True))
                connection.close()
            except Exception as error:
                if not is_transient(error):
                    raise
                # The server dropped the session, and the lock with it.
                connection.invalidate()

    def _acquire_file(self) -> None:
        db_path = self._url.removeprefix("sqlite:///") or "memory"
        lock_path = Path(f"{db_path}.{_slug(self._name)}.lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(lock_path)
        try:
            lock.acquire(timeout=self._wait_s)
        except filelock.Timeout:
            raise StorageError(
                f"study {self._name!r}: the study lock {lock_path} is still held by another "
                f"process after {self._wait_s:.0f} s; is a worker stuck holding it?") from None
        self._file = lock

    def _acquire_server(self) -> None:
        """Poll the server's try-lock until it is ours, for at most ``wait_s``.

        ``pg_advisory_lock`` would wait for ever behind a hung holder, silently stalling
        every worker; polling ``pg_try_advisory_lock`` (``GET_LOCK(key, 0)`` on MariaDB)
        bounds the wait, and a Ctrl-C lands between two polls.

        Raises:
            StorageError: Another session held the lock for the whole wait.
        """
        if self._engine is None:
            self._engine = sqlalchemy.create_engine(self._url, **engine_kwargs(self._url))
        connection = self._engine.connect()
        poll = tenacity.Retrying(
            retry=tenacity.retry_if_result(lambda got: not got),
            stop=tenacity.stop_before_delay(self._wait_s),
            wait=tenacity.wait_exponential(multiplier=LOCK_POLL_FIRST_S, max=LOCK_POLL_MAX_S),
            retry_error_callback=lambda state: False,
        )
        try:
            got = poll(self._try_lock, connection)
        except BaseException:
            connection.invalidate()
            raise
        if not got:
            connection.close()
            database = sqlalchemy.engine.make_url(self._url).database
            raise StorageError(
                f"study {self._name!r}: the study lock {self._lock_name()} in database "
                f"{database!r} ({redact(self._url)}) is still held by another session after "
                f"{self._wait_s:.0f} s; is a worker stuck holding it? (PostgreSQL: "
                "pg_locks with locktype 'advisory'; MariaDB: IS_USED_LOCK)")
        self._connection = connection

    def _try_lock(self, connection: sqlalchemy.Connection) -> bool:
        got = connection.execute(*self._server_sql(unlock=False)).scalar()
        connection.commit()
        return bool(got)

    def _lock_name(self) -> str:
        key = _slug(self._name)
        if self._url.startswith("postgresql"):
            return f"{key} (advisory lock key {_advisory_key(key)})"
        return key

    def _server_sql(self, *, unlock: bool) -> tuple:
        key = _slug(self._name)
        if self._url.startswith("postgresql"):
            verb = "pg_advisory_unlock" if unlock else "pg_try_advisory_lock"
            return (sqlalchemy.text(f"SELECT {verb}(:key)"), {"key": _advisory_key(key)})
        if unlock:
            return (sqlalchemy.text("SELECT RELEASE_LOCK(:key)"), {"key": key})
        return (sqlalchemy.text("SELECT GET_LOCK(:key, 0)"), {"key": key})

    def close(self) -> None:
        """Release the lock and close its connections."""
        self.release()
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


def _slug(name: str) -> str:
    return "fusion-search-" + hashlib.sha1(name.encode()).hexdigest()[:16]


def _advisory_key(slug: str) -> int:
    """PostgreSQL's advisory locks take a bigint; 15 hex digits fit in one."""
    return int(hashlib.sha1(slug.encode()).hexdigest()[:15], 16)
