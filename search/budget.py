"""The shared trial budget: exactly ``n_trials`` complete or pruned trials, whoever runs them.

The budget is a queue of WAITING trials in the study itself. Optuna's ``ask()`` pops a
waiting trial atomically, so workers never need to talk to each other. Two short critical
sections, "is there a slot left? then ask" and "top the queue up", run under a lock that
every worker can reach: a file lock next to a SQLite database, or the server's own
advisory lock (``pg_advisory_lock`` / ``GET_LOCK``) for PostgreSQL and MariaDB.
"""

from __future__ import annotations

import fcntl
import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import optuna
import sqlalchemy
from optuna.trial import TrialState

from search.storage import engine_kwargs, normalize_url

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
LIVE = (*COUNTED, TrialState.RUNNING, TrialState.WAITING)


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


def top_up(study: optuna.Study, n_trials: int) -> int:
    """Queue WAITING trials until complete + pruned + running + waiting == ``n_trials``.

    Failed trials do not use the budget, so a failure is replaced by a fresh trial here.
    Call under :class:`StudyLock`. Returns how many trials were queued.
    """
    missing = n_trials - budget_state(study, n_trials).live
    for _ in range(max(0, missing)):
        # Empty params: the sampler chooses every parameter when the trial is popped.
        study.enqueue_trial({})
    return max(0, missing)


class StudyLock:
    """A lock named after the study, shared by every worker that can reach the storage."""

    def __init__(self, storage_url: str, study_name: str) -> None:
        self._url = normalize_url(storage_url)
        self._name = study_name
        self._file = None
        self._connection: sqlalchemy.Connection | None = None
        self._engine: sqlalchemy.Engine | None = None

    def acquire(self) -> None:
        if self._url.startswith("sqlite"):
            self._acquire_file()
        else:
            self._acquire_server()

    def release(self) -> None:
        """Release the lock; safe to call when it is not held."""
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        if self._connection is not None:
            try:
                self._connection.execute(*self._server_sql(unlock=True))
            finally:
                self._connection.close()
                self._connection = None

    def __enter__(self) -> StudyLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _acquire_file(self) -> None:
        db_path = self._url.removeprefix("sqlite:///") or "memory"
        lock_path = Path(f"{db_path}.{_slug(self._name)}.lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(lock_path, "a+")  # noqa: SIM115 - held across calls
        fcntl.flock(self._file, fcntl.LOCK_EX)

    def _acquire_server(self) -> None:
        if self._engine is None:
            self._engine = sqlalchemy.create_engine(self._url, **engine_kwargs(self._url))
        self._connection = self._engine.connect()
        self._connection.execute(*self._server_sql(unlock=False))
        self._connection.commit()

    def _server_sql(self, *, unlock: bool) -> tuple:
        key = _slug(self._name)
        if self._url.startswith("postgresql"):
            number = int(hashlib.sha1(key.encode()).hexdigest()[:15], 16)
            verb = "pg_advisory_unlock" if unlock else "pg_advisory_lock"
            return (sqlalchemy.text(f"SELECT {verb}(:key)"), {"key": number})
        if unlock:
            return (sqlalchemy.text("SELECT RELEASE_LOCK(:key)"), {"key": key})
        return (sqlalchemy.text("SELECT GET_LOCK(:key, 600)"), {"key": key})

    def close(self) -> None:
        self.release()
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


def _slug(name: str) -> str:
    return "fusion-search-" + hashlib.sha1(name.encode()).hexdigest()[:16]
