"""One factory for the study's storage: Optuna's RDBStorage, with heartbeats and retries on.

SQLite is the embedded default; PostgreSQL and MySQL/MariaDB let workers on many machines
share one study. URLs are normalised to the drivers we ship (``psycopg`` and ``PyMySQL``),
connections are pre-pinged so a restarted server is reconnected to transparently, and an
unreachable database becomes one :class:`~search.errors.StorageError` line.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import sqlalchemy
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DisconnectionError, OperationalError, SQLAlchemyError

from search.errors import StorageError

_DRIVERS = {"postgresql": "postgresql+psycopg", "postgres": "postgresql+psycopg",
            "mysql": "mysql+pymysql", "mariadb": "mysql+pymysql"}


@dataclass(frozen=True)
class HeartbeatConfig:
    """How often a running trial proves it is alive, and when it is declared dead."""

    interval_s: int = 10
    grace_s: int = 30
    max_retry: int = 3


def normalize_url(url: str) -> str:
    """Pick the shipped driver for bare ``postgresql://`` and ``mysql://`` URLs."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise StorageError(f"storage URL {url!r} is not a URL (expected e.g. sqlite:///study.db)")
    return f"{_DRIVERS.get(scheme, scheme)}://{rest}"


def redact(url: str) -> str:
    """The URL with its password hidden, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return re.sub(r":[^:@/]+@", ":***@", url)


def engine_kwargs(url: str) -> dict:
    """Connection settings per backend: long lock waits for SQLite, pre-ping elsewhere."""
    if url.startswith("sqlite"):
        # Several worker processes write one file; wait for the lock instead of failing.
        return {"connect_args": {"timeout": 60}}
    connect = {"connect_timeout": 10}
    return {"pool_pre_ping": True, "pool_recycle": 300, "connect_args": connect}


def get_storage(
    url: str, *, heartbeat: HeartbeatConfig | None = None
) -> optuna.storages.RDBStorage:
    """Open (and if needed create) the RDB storage at ``url``.

    Args:
        url: SQLAlchemy URL; ``postgresql://`` and ``mysql://`` get our drivers.
        heartbeat: Heartbeat settings; ``None`` uses :class:`HeartbeatConfig` defaults.

    Raises:
        StorageError: The database cannot be reached or opened.
    """
    heartbeat = heartbeat or HeartbeatConfig()
    full_url = normalize_url(url)
    if full_url.startswith("sqlite:///"):
        _ensure_sqlite_folder(full_url)
    try:
        return optuna.storages.RDBStorage(
            full_url,
            engine_kwargs=engine_kwargs(full_url),
            heartbeat_interval=heartbeat.interval_s,
            grace_period=heartbeat.grace_s,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=heartbeat.max_retry, inherit_intermediate_values=True
            ),
        )
    except (SQLAlchemyError, ArgumentError, ImportError, ValueError) as error:
        raise StorageError(f"cannot open storage {redact(url)}: {short_reason(error)}") from None


def short_reason(error: BaseException) -> str:
    """The first line of a driver error, without SQLAlchemy's background links."""
    text = str(getattr(error, "orig", None) or error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    return re.sub(r"\s*\(Background on this error.*$", "", first)[:300]


def check_reachable(url: str) -> None:
    """Connect once and fail fast with one line when the database is unreachable."""
    full_url = normalize_url(url)
    if full_url.startswith("sqlite"):
        return
    try:
        engine = sqlalchemy.create_engine(full_url, **engine_kwargs(full_url))
        with engine.connect():
            pass
        engine.dispose()
    except (SQLAlchemyError, ImportError) as error:
        raise StorageError(f"cannot reach storage {redact(url)}: {short_reason(error)}") from None


def _ensure_sqlite_folder(url: str) -> None:
    path = url.removeprefix("sqlite:///")
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)


def retrying(call, *args, attempts: int = 6, first_wait_s: float = 0.5, **kwargs):
    """Run one storage call, retrying transient database errors with exponential back-off.

    A server restart or a dropped connection while a trial trains must not throw the
    trial's work away; pre-ping reconnects, and this waits long enough for it to succeed.
    """
    wait = first_wait_s
    for attempt in range(attempts):
        try:
            return call(*args, **kwargs)
        except (optuna.exceptions.StorageInternalError, OperationalError, DisconnectionError):
            if attempt == attempts - 1:
                raise
            time.sleep(wait)
            wait = min(wait * 2, 10.0)
    return None
