"""Optuna's gRPC storage proxy: one process holds the database, hundreds of workers talk to it.

``search proxy --storage postgresql://...`` serves the storage with Optuna's
``run_grpc_proxy_server``; workers given ``--storage grpc://host:port`` open Optuna's
``GrpcStorageProxy`` instead of a database connection pool of their own.

Optuna's proxy carries no heartbeats (``GrpcStorageProxy`` is a plain ``BaseStorage``) and our
study lock (:class:`~search.study.budget.StudyLock`) needs a SQL connection of its own, which
a worker behind the proxy does not have. So the proxy process is the study's coordinator:

* Budget: workers behind the proxy never create a trial; they only pop WAITING ones
  (:class:`ProxyStorage` refuses ``ask()``'s fresh trial with :class:`NoWaitingTrial`, and
  popping is the storage's atomic WAITING -> RUNNING update). The coordinator tops the queue
  up under the study lock, as a direct worker would, so exactly ``n_trials`` finish however
  many workers pop, behind the proxy or directly on the database.
* Liveness: a worker's Optuna heartbeat thread still beats; :class:`ProxyStorage` sends each
  beat as the trial system attribute :data:`BEAT_KEY`, which the proxy's storage turns into a
  real heartbeat row (:meth:`~search.study.storage.ResilientRDBStorage.set_trial_system_attr`).
* Dead workers: the coordinator fails stale trials with Optuna's ``fail_stale_trials`` on the
  real storage; its retry callback queues the copy that resumes from the last epoch, exactly
  as on a direct database (:mod:`search.study.requeue`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.storages import BaseStorage, GrpcStorageProxy
from optuna.storages._heartbeat import BaseHeartbeat  # private: optuna<6 in pyproject.toml
from optuna.trial import FrozenTrial

from search.config import HeartbeatConfig
from search.errors import StorageError, UserError
from search.study.budget import StudyLock, budget_state, queue_start_points, top_up
from search.study.requeue import CopyOnce
from search.study.storage import (
    BEAT_KEY,
    ResilientRDBStorage,
    get_storage,
    redact,
    short_reason,
)

SCHEME = "grpc://"
DEFAULT_PORT = 13000
# How often the coordinator looks at every study: as often as a direct worker polls.
TEND_S = 2.0
# Study user attributes the coordinator reads (written when a study is created).
GRACE_ATTR = "heartbeat_grace_s"
START_POINTS_ATTR = "start_points"

logger = logging.getLogger("search.study.proxy")


class NoWaitingTrial(RuntimeError):
    """``ask()`` found no WAITING trial to pop; behind the proxy a worker never makes one."""


def is_proxy_url(url: str) -> bool:
    return url.startswith(SCHEME)


def parse_proxy_url(url: str) -> tuple[str, int]:
    """``grpc://host:port`` (port defaults to 13000) -> (host, port).

    Raises:
        StorageError: Not a host and a port.
    """
    rest = url.removeprefix(SCHEME).rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep:
        host, port = rest, str(DEFAULT_PORT)
    if not host or "/" in host or "@" in host or not port.isdigit() \
            or not 0 < int(port) < 65536:
        raise StorageError(f"storage URL {url!r} is not grpc://HOST:PORT")
    return host.strip("[]"), int(port)


class ProxyStorage(GrpcStorageProxy, BaseHeartbeat):
    """Optuna's gRPC client, with heartbeats relayed to the proxy and no fresh trials.

    Stale trials are found by the proxy's coordinator (it reads the heartbeat rows), so
    :meth:`_get_stale_trial_ids` finds none here. The stale-trial callback is the one
    :func:`~search.study.storage.get_storage` sets: a preempted worker queues its trial's
    resuming copy through it (:func:`~search.study.requeue.mark_and_copy`).
    """

    def __init__(self, url: str, *, heartbeat: HeartbeatConfig | None = None) -> None:
        host, port = parse_proxy_url(url)
        self._heartbeat = heartbeat or HeartbeatConfig()
        self.description = url
        super().__init__(host=host, port=port)

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        if template_trial is None:  # ask() found nothing to pop; the coordinator queues
            raise NoWaitingTrial("no WAITING trial to pop")
        return super().create_new_trial(study_id, template_trial)

    def record_heartbeat(self, trial_id: int) -> None:
        """Beat once through the proxy; a failure is logged, the next beat comes anyway."""
        try:
            self.set_trial_system_attr(trial_id, BEAT_KEY, True)
        except Exception as error:  # the heartbeat thread must outlive a proxy restart
            logger.warning("heartbeat of trial id %d not relayed (%s)", trial_id,
                           short_reason(error))

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        return []  # the proxy's coordinator fails stale trials (see the module docstring)

    def get_heartbeat_interval(self) -> int | None:
        return self._heartbeat.interval_s

    def get_heartbeat_stale_trial_callback(self) -> Any:
        return CopyOnce(max_retry=self._heartbeat.max_retry, inherit_intermediate_values=True)


def open_proxy(url: str, *, heartbeat: HeartbeatConfig | None = None,
               wait_s: float = 10.0) -> ProxyStorage:
    """Connect to a running ``search proxy``.

    Raises:
        StorageError: Nothing answers at ``url`` within ``wait_s``.
    """
    storage = ProxyStorage(url, heartbeat=heartbeat)
    try:
        storage.wait_server_ready(timeout=wait_s)
    except ConnectionError:
        storage.close()
        raise StorageError(f"no storage proxy answers at {url} (is `search proxy` running "
                           "there?)") from None
    return storage


# gRPC threads: as many as SQLAlchemy's default pool holds connections (5 + 10 overflow), so a
# call never waits for a connection; further calls queue in gRPC for a millisecond or so.
THREADS = 15


def serve(storage_url: str, *, host: str, port: int, threads: int = THREADS,
          ready: threading.Event | None = None) -> None:
    """Serve ``storage_url`` on ``host:port`` and coordinate its studies until interrupted.

    Raises:
        UserError: ``storage_url`` is itself a proxy.
        StorageError: The database is unreachable, or the port cannot be bound.
    """
    if is_proxy_url(storage_url):
        raise UserError("search proxy serves a database (postgresql://, mysql://, sqlite://), "
                        f"not another proxy ({storage_url})")
    from concurrent.futures import ThreadPoolExecutor

    from optuna.storages._grpc.server import make_server  # private: the public
    # run_grpc_proxy_server cannot report a port it failed to bind, nor stop from a thread.

    rdb = get_storage(storage_url)
    # Optuna's cache in front of the RDB storage, as run_grpc_proxy_server's docs advise.
    storage = optuna.storages.get_storage(rdb)
    try:  # gRPC binds the port here, and says so with a RuntimeError
        server = make_server(storage, host, port, ThreadPoolExecutor(max_workers=threads))
        server.start()
    except RuntimeError as error:
        raise StorageError(f"search proxy cannot listen on {host}:{port}: {error}") from None
    stop = threading.Event()
    coordinator = threading.Thread(target=coordinate, args=(storage, rdb, storage_url, stop),
                                   name="coordinator", daemon=True)
    coordinator.start()
    logger.info("serving %s on grpc://%s:%d; workers take --storage grpc://%s:%d "
                "(Ctrl-C stops)", redact(storage_url), host, port, host, port)
    if ready is not None:
        ready.set()
    try:
        server.wait_for_termination()
    finally:
        stop.set()
        server.stop(grace=2).wait()
        coordinator.join(timeout=10)


def coordinate(storage: BaseStorage, rdb: ResilientRDBStorage, storage_url: str,
               stop: threading.Event, every_s: float = TEND_S) -> None:
    """Tend every study of ours in the storage until ``stop`` is set; never raises."""
    locks: dict[str, StudyLock] = {}
    try:
        while not stop.wait(every_s):
            try:
                for frozen in storage.get_all_studies():
                    n_trials = frozen.user_attrs.get("n_trials")
                    if isinstance(n_trials, int):  # recorded by run/worker: a study of ours
                        lock = locks.setdefault(frozen.study_name,
                                                StudyLock(storage_url, frozen.study_name))
                        tend(optuna.load_study(study_name=frozen.study_name, storage=storage),
                             rdb, lock, n_trials)
            except Exception as error:  # an outage must not end the coordinator
                logger.warning("coordinator: %s; trying again in %.0f s", short_reason(error),
                               every_s)
    finally:
        for lock in locks.values():
            lock.close()


def tend(study: optuna.Study, rdb: ResilientRDBStorage, lock: StudyLock, n_trials: int) -> None:
    """One round of what direct workers do between trials: fail stale trials (their copies
    are queued by the retry callback), queue the start points, top up."""
    state = budget_state(study, n_trials)
    if state.spent and state.running == 0:
        return
    grace_s = study.user_attrs.get(GRACE_ATTR, HeartbeatConfig().grace_s)
    # The study's own grace period; only this thread reads it (the gRPC threads never ask
    # for stale trials), so setting it per study is safe.
    rdb.grace_period = grace_s
    lock.acquire()
    try:
        # Under the lock, like a direct worker's sweep: a top-up never sees a failed trial
        # whose copy is not queued yet.
        optuna.storages.fail_stale_trials(study)
        points: Sequence[dict] = study.user_attrs.get(START_POINTS_ATTR, ())
        queue_start_points(study, list(points), n_trials)
        top_up(study, n_trials)
    finally:
        lock.release()
