"""One factory for the study's storage: Optuna's RDBStorage, with heartbeats and retries on.

SQLite is the embedded default; PostgreSQL and MySQL/MariaDB let workers on many machines
share one study. URLs are normalised to the drivers we ship (``psycopg`` and ``PyMySQL``),
connections are pre-pinged so a restarted server is reconnected to transparently, storage
calls wait out a database that went away for a while (:class:`ResilientRDBStorage`), and an
unreachable database becomes one :class:`~search.errors.StorageError` line.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import re
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy
import tenacity
from optuna.exceptions import StorageInternalError, UpdateFinishedTrialError
from optuna.storages import RDBStorage
from optuna.storages._rdb import models  # private: pinned to optuna 5 in pyproject.toml
from optuna.trial import TrialState
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    DisconnectionError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from search.config import HeartbeatConfig
from search.errors import StorageError

_DRIVERS = {"postgresql": "postgresql+psycopg", "postgres": "postgresql+psycopg",
            "mysql": "mysql+pymysql", "mariadb": "mysql+pymysql"}
# Errors of a connection rather than of a statement: refused, dropped, timed out, locked.
_TRANSIENT = (OperationalError, InterfaceError, DisconnectionError, PoolTimeoutError)

# The trial system attribute a worker behind the gRPC proxy beats with (Optuna's proxy has no
# heartbeat call); the proxy's storage records a heartbeat instead of storing it.
BEAT_KEY = "fs:heartbeat"

logger = logging.getLogger("search.study.storage")
T = TypeVar("T")
# Set by Ctrl-C (see interruptible): from then on a failing storage call is not retried.
_INTERRUPTED = threading.Event()


@dataclass(frozen=True)
class RetryPolicy:
    """How long a storage call waits for a database that went away (a restart, a failover)."""

    total_s: float = 60.0
    first_wait_s: float = 0.25
    max_wait_s: float = 5.0


WORKER_WAIT_S = RetryPolicy().total_s
"""``--wait-for-storage`` of the workers ``search run`` and the launchers start: a worker
(re)started during a database restart waits for it as long as its storage calls would."""


class StorageLostError(StorageError, StorageInternalError):
    """The database stayed unreachable for a whole :class:`RetryPolicy`.

    Both a :class:`~search.errors.StorageError` (the CLI prints one line, exit code 2) and
    Optuna's ``StorageInternalError`` (what Optuna's own callers expect from a storage).
    """


def normalize_url(url: str) -> str:
    """Pick the shipped driver for bare ``postgresql://`` and ``mysql://`` URLs."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise StorageError(f"storage URL {scrub(url)!r} is not a URL "
                           "(expected e.g. sqlite:///study.db)")
    return f"{_DRIVERS.get(scheme, scheme)}://{rest}"


def redact(url: str) -> str:
    """The URL with its password hidden, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return scrub(url)


def scrub(text: str) -> str:
    """``text`` with the password of every ``user:password@`` in it replaced by ``***``.

    For text that is not a well-formed URL: an unparsable ``--storage`` value, or a driver
    message that quotes the URL it was given.
    """
    return re.sub(r"([\w.~%+-]*:)[^@\s/'\"]*@", r"\1***@", text)


def engine_kwargs(url: str) -> dict:
    """Connection settings per backend: long lock waits for SQLite, pre-ping elsewhere."""
    if url.startswith("sqlite"):
        # Several worker processes write one file; wait for the lock instead of failing.
        return {"connect_args": {"timeout": 60}}
    connect = {"connect_timeout": 10}
    return {"pool_pre_ping": True, "pool_recycle": 300, "connect_args": connect}


def short_reason(error: BaseException) -> str:
    """The first line of a driver error, without SQLAlchemy's background links."""
    if isinstance(error, StorageInternalError) and error.__cause__ is not None:
        error = error.__cause__  # Optuna's own message only says "during the commit"
    text = str(getattr(error, "orig", None) or error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    return scrub(re.sub(r"\s*\(Background on this error.*$", "", first))[:300]


def is_transient(error: BaseException) -> bool:
    """Whether waiting and trying again may help: the connection failed, not the statement."""
    if isinstance(error, StorageLostError):
        return False  # already waited for a whole retry policy
    if isinstance(error, StorageInternalError) and error.__cause__ is not None:
        error = error.__cause__  # RDBStorage wraps every SQLAlchemy error in its own
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return True
    if isinstance(error, DBAPIError) and type(error.orig).__module__ == "sqlite3":
        # SQLite has no connection to lose; only a lock held by another process passes.
        return any(word in str(error.orig) for word in ("locked", "busy"))
    return isinstance(error, _TRANSIENT)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """While inside, Ctrl-C (SIGINT) also ends every storage retry at once.

    Without it, a Ctrl-C while the database is down raises in one call, and then every
    clean-up that touches the storage (Optuna failing the running trial, ``search run``
    failing its workers' trials) would wait out its own :class:`RetryPolicy`. Once
    interrupted, a failing storage call raises ``KeyboardInterrupt`` instead of retrying.
    Only the main thread can install a signal handler; elsewhere this does nothing. Use it
    around a whole command (``search run``, ``search worker``): an interrupt that leaves it
    is taken to end the process.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum: int, frame: Any) -> None:
        _INTERRUPTED.set()
        signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    except KeyboardInterrupt:
        # The process is about to exit. Its last garbage collection would walk every object
        # torch, scipy and Optuna created, seconds on a busy machine; frozen, they are skipped.
        gc.freeze()
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
        _INTERRUPTED.clear()


def _give_up(what: str, policy: RetryPolicy | None) -> Callable[[tenacity.RetryCallState], Any]:
    """What a retry loop raises when it stops: the interrupt, or one storage error line."""

    def give_up(state: tenacity.RetryCallState) -> Any:
        error = state.outcome.exception() if state.outcome else None
        if _INTERRUPTED.is_set():
            raise KeyboardInterrupt from error
        if policy is None or error is None:
            return state.outcome.result() if state.outcome else None  # re-raises the error
        raise StorageLostError(f"lost the connection to {what} for {policy.total_s:.0f} s: "
                               f"{short_reason(error)}") from error

    return give_up


def call_with_retries(call: Callable[..., T], /, *args: Any, policy: RetryPolicy,
                      what: str = "storage", **kwargs: Any) -> T:
    """Run ``call``, retrying transient database errors with exponential back-off.

    Raises:
        StorageLostError: The database stayed unreachable for ``policy.total_s``.
        KeyboardInterrupt: Ctrl-C came during the outage (see :func:`interruptible`).
    """

    def log_wait(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        logger.warning("%s unreachable (%s); retrying in %.1f s",
                       what, short_reason(error) if error else "?", wait)

    retryer = tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_transient),
        # Never start a wait that would end past the policy's total.
        stop=(tenacity.stop_before_delay(policy.total_s)
              | tenacity.stop_when_event_set(_INTERRUPTED)),
        wait=tenacity.wait_exponential(multiplier=policy.first_wait_s, max=policy.max_wait_s),
        before_sleep=log_wait,
        retry_error_callback=_give_up(what, policy),
    )
    return retryer(call, *args, **kwargs)


def retrying(call: Callable[..., T], *args: Any, attempts: int = 6, first_wait_s: float = 0.5,
             **kwargs: Any) -> T:
    """Run one storage call, retrying transient database errors with exponential back-off.

    Storages from :func:`get_storage` already retry each call for a whole
    :class:`RetryPolicy`; this outer loop covers other storages and never retries a call
    that already exhausted its policy (:class:`StorageLostError`). After ``attempts`` tries
    the last error is raised as it is.
    """
    retryer = tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_transient),
        stop=tenacity.stop_after_attempt(attempts) | tenacity.stop_when_event_set(_INTERRUPTED),
        wait=tenacity.wait_exponential(multiplier=first_wait_s, max=10.0),
        retry_error_callback=_give_up("storage", None),
    )
    return retryer(call, *args, **kwargs)


def _failed_ping_is_a_disconnect(context: ExceptionContext) -> None:
    """A pooled connection that cannot answer the pre-ping is dead, whatever the driver says.

    psycopg reports a socket the server closed in the middle of a statement as "can't change
    'autocommit' now: connection in transaction status ACTIVE", a ProgrammingError that
    SQLAlchemy does not count as a disconnect, so the pool would keep handing out the dead
    connection. Marked as a disconnect, the pool drops it and connects afresh.
    """
    if context.is_pre_ping:
        context.is_disconnect = True


def _retried(method: Callable[..., T]) -> Callable[..., T]:
    """Wrap an idempotent RDBStorage method so it waits out a database outage."""

    @functools.wraps(method)
    def wrapper(self: ResilientRDBStorage, *args: Any, **kwargs: Any) -> T:
        return call_with_retries(method, self, *args, policy=self.retry_policy,
                                 what=self.description, **kwargs)

    return wrapper


class ResilientRDBStorage(RDBStorage):
    """Optuna's RDBStorage whose calls wait out a database restart instead of failing a trial.

    Reads and idempotent writes (attributes, intermediate values, parameters, states) are
    retried with back-off, and pre-ping reconnects once the server is back. Creating a
    study or a trial is not retried here: a retry after a lost acknowledgement would
    create it twice (:func:`search.study.budget.top_up` recounts before it re-queues instead).

    The heartbeat never raises: an exception would end Optuna's heartbeat thread for the
    rest of the trial, and other workers would fail the trial as stale while it still trains.
    """

    def __init__(self, url: str, *, retry: RetryPolicy | None = None, **kwargs: Any) -> None:
        self.retry_policy = retry or RetryPolicy()
        self.description = redact(url)
        super().__init__(url, **kwargs)
        sqlalchemy.event.listen(self.engine, "handle_error", _failed_ping_is_a_disconnect)

    get_study_id_from_name = _retried(RDBStorage.get_study_id_from_name)
    get_study_name_from_id = _retried(RDBStorage.get_study_name_from_id)
    get_study_directions = _retried(RDBStorage.get_study_directions)
    get_study_user_attrs = _retried(RDBStorage.get_study_user_attrs)
    get_study_system_attrs = _retried(RDBStorage.get_study_system_attrs)
    set_study_user_attr = _retried(RDBStorage.set_study_user_attr)
    set_study_system_attr = _retried(RDBStorage.set_study_system_attr)
    get_all_studies = _retried(RDBStorage.get_all_studies)
    get_trial = _retried(RDBStorage.get_trial)
    _get_trials = _retried(RDBStorage._get_trials)  # get_all_trials reads through it
    get_trial_id_from_study_id_trial_number = _retried(
        RDBStorage.get_trial_id_from_study_id_trial_number)
    get_trial_param = _retried(RDBStorage.get_trial_param)
    _get_best_trial_id = _retried(RDBStorage._get_best_trial_id)
    _set_trial_param = _retried(RDBStorage._set_trial_param)
    set_trial_intermediate_value = _retried(RDBStorage.set_trial_intermediate_value)
    set_trial_user_attr = _retried(RDBStorage.set_trial_user_attr)
    _set_trial_system_attr = _retried(RDBStorage.set_trial_system_attr)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        """Set the attribute, or record a heartbeat relayed through the gRPC proxy."""
        if key == BEAT_KEY:
            self.record_heartbeat(trial_id)  # see search.study.proxy
            return
        self._set_trial_system_attr(trial_id, key, value)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        """Optuna's stale trials, plus RUNNING trials that never recorded a heartbeat.

        Optuna only counts a trial stale once its last heartbeat is old, and skips a trial
        with no heartbeat row at all. Such a trial exists when the worker that popped it
        never ran it: the WAITING -> RUNNING commit went through but its acknowledgement was
        lost, so the retry saw the trial taken and ``ask()`` moved on to the next one. Nobody
        would ever finish it, and the budget would wait for it for ever.
        """
        stale = call_with_retries(RDBStorage._get_stale_trial_ids, self, study_id,
                                  policy=self.retry_policy, what=self.description)
        never_beat = call_with_retries(self._never_beaten_trial_ids, study_id,
                                       policy=self.retry_policy, what=self.description)
        return stale + [trial_id for trial_id in never_beat if trial_id not in stale]

    def _never_beaten_trial_ids(self, study_id: int) -> list[int]:
        """RUNNING trials of ``study_id`` started over a grace period ago that never beat.

        A worker records its first heartbeat right after ``ask()``, so a grace period without
        one means no worker runs the trial. ``datetime_start`` is stored in UTC by the popping
        worker's clock, so this compares it with ours (as Optuna's own timestamps do).
        """
        grace_s = self.grace_period or 2 * (self.heartbeat_interval or 60)
        cutoff = datetime.now(UTC).replace(tzinfo=None) - timedelta(seconds=grace_s)
        trial = models.TrialModel.__table__.c
        beat = models.TrialHeartbeatModel.__table__.c
        query = (sqlalchemy.select(trial.trial_id)
                 .select_from(models.TrialModel.__table__.outerjoin(
                     models.TrialHeartbeatModel.__table__, beat.trial_id == trial.trial_id))
                 .where(trial.study_id == study_id, trial.state == TrialState.RUNNING,
                        beat.trial_id.is_(None), trial.datetime_start < cutoff))
        with self.engine.connect() as connection:
            return list(connection.execute(query).scalars())

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Sequence[float] | None = None) -> bool:
        """Finish (or start) a trial; a retry after a lost acknowledgement is not an error."""
        attempts = 0

        def attempt() -> bool:
            nonlocal attempts
            attempts += 1
            try:
                return RDBStorage.set_trial_state_values(self, trial_id, state, values)
            except UpdateFinishedTrialError:
                # The first try may have committed before the connection dropped.
                if attempts > 1 and self._has_state(trial_id, state, values):
                    return True
                raise

        return call_with_retries(attempt, policy=self.retry_policy, what=self.description)

    def record_heartbeat(self, trial_id: int) -> None:
        """Beat once; a failure is logged, and the next beat comes one interval later."""
        try:
            RDBStorage.record_heartbeat(self, trial_id)
        except Exception as error:  # the heartbeat thread must outlive any database error
            logger.warning("heartbeat of trial id %d not recorded (%s); next try in %s s",
                           trial_id, short_reason(error), self.heartbeat_interval)

    def _has_state(self, trial_id: int, state: TrialState,
                   values: Sequence[float] | None) -> bool:
        trial = RDBStorage.get_trial(self, trial_id)
        return trial.state == state and (values is None or trial.values == list(values))


def get_storage(url: str, *, heartbeat: HeartbeatConfig | None = None,
                retry: RetryPolicy | None = None) -> ResilientRDBStorage:
    """Open (and if needed create) the RDB storage at ``url``.

    Args:
        url: SQLAlchemy URL; ``postgresql://`` and ``mysql://`` get our drivers.
        heartbeat: Heartbeat settings; ``None`` uses :class:`HeartbeatConfig` defaults.
        retry: How long calls wait for a database that went away; ``None`` uses
            :class:`RetryPolicy` defaults.

    Raises:
        StorageError: The database cannot be reached or opened.
    """
    # Here, not at the top: requeue builds on this module's retries.
    from search.study.requeue import CopyOnce

    heartbeat = heartbeat or HeartbeatConfig()
    retry = retry or RetryPolicy()
    full_url = normalize_url(url)
    if full_url.startswith("sqlite:///"):
        _ensure_sqlite_folder(full_url)
    try:
        # Opening creates or checks the tables, i.e. talks to the database: a worker that
        # (re)starts during an outage waits it out like any other storage call.
        return call_with_retries(
            ResilientRDBStorage,
            full_url,
            retry=retry,
            engine_kwargs=engine_kwargs(full_url),
            heartbeat_interval=heartbeat.interval_s,
            grace_period=heartbeat.grace_s,
            heartbeat_stale_trial_callback=CopyOnce(
                max_retry=heartbeat.max_retry, inherit_intermediate_values=True
            ),
            policy=retry, what=redact(url),
        )
    except StorageLostError:
        raise
    except (SQLAlchemyError, StorageInternalError, ImportError, ValueError) as error:
        raise StorageError(f"cannot open storage {redact(url)}: {short_reason(error)}") from None


def check_reachable(url: str, *, wait_s: float = 0.0) -> None:
    """Connect once and fail fast with one line when the database is unreachable.

    Args:
        url: The storage URL.
        wait_s: How long a refused or dropped connection is retried first. 0 for a command
            a person typed (a wrong port should say so at once); a worker that ``search
            run`` restarts during a database restart waits for it instead.

    Raises:
        StorageError: Unknown scheme or driver, refused connection, wrong credentials or
            missing database; the message names the URL (without its password).
    """
    full_url = normalize_url(url)
    if full_url.startswith("sqlite"):
        return
    if full_url.startswith("grpc://"):
        from search.study.proxy import open_proxy  # imports this module

        open_proxy(url).close()
        return

    def connect() -> None:
        engine = sqlalchemy.create_engine(full_url, **engine_kwargs(full_url))
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()

    try:
        if wait_s > 0:
            call_with_retries(connect, policy=RetryPolicy(total_s=wait_s), what=redact(url))
        else:
            connect()
    except (SQLAlchemyError, ImportError, ValueError) as error:
        raise StorageError(f"cannot reach storage {redact(url)}: {short_reason(error)}") from None


def _ensure_sqlite_folder(url: str) -> None:
    path = url.removeprefix("sqlite:///")
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
