"""Benchmark: storage overhead per trial on SQLite, PostgreSQL and MariaDB, with 1, 2, 4 workers.

Each worker is its own process and runs the real worker loop of ``search worker`` (claim a
slot under the study lock, ``study.optimize(n_trials=1)`` with heartbeats on the storage from
``search.study.storage.get_storage``), but the objective is synthetic: training is a sleep, and
around it the objective makes the storage calls a real trial makes -- three suggestions,
``report`` + ``should_prune`` per epoch, eleven user attributes and three small artifacts.
So the figures are storage time alone, not slowed by training competing for the CPU.

Every run uses a fresh database (``fs_bench_<random>``) that is dropped afterwards.

    .venv/bin/python -m bench.storage                  # about 6 minutes
    .venv/bin/python -m bench.storage --backends postgresql --workers 1,8 --trials 32

``--proxy`` compares, on PostgreSQL, many light workers (8, 32, 64 by default) connected
directly with the same workers behind ``search proxy`` (Optuna's gRPC storage proxy, run in
a process of its own): storage milliseconds per trial and the peak number of PostgreSQL
sessions on the bench database (``pg_stat_activity``, polled every 50 ms). Not trials per
second: with 64 processes on a couple of cores that measures CPU contention.

    .venv/bin/python -m bench.storage --proxy --trials-per-worker 2 --epoch-s 0.5
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

# This folder holds a file named storage.py: import the project's packages, not our scripts.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

import optuna  # noqa: E402
import sqlalchemy  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from search.config import HeartbeatConfig  # noqa: E402
from search.study.budget import StudyLock, budget_state, top_up  # noqa: E402
from search.study.proxy import NoWaitingTrial, ProxyStorage, serve  # noqa: E402
from search.study.storage import get_storage, normalize_url  # noqa: E402

# Heartbeats and the retry callback are flagged experimental; search relies on them on purpose.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

ADMIN_URLS = {"postgresql": "postgresql://postgres@127.0.0.1:5432/postgres",
              "mariadb": "mysql://root@127.0.0.1:3306/mysql"}
ARTIFACT_BYTES = {"checkpoint.pt": 200_000, "confusion_matrix.png": 20_000, "metrics.json": 2_000}


@dataclass(frozen=True)
class Settings:
    """One benchmark configuration, passed to every worker process."""

    url: str
    n_trials: int
    epochs: int
    epoch_s: float
    heartbeat_s: int
    artifacts_dir: str
    poll_s: float = 2.0  # search.study.worker.POLL_S: how often an idle worker looks again


@dataclass(frozen=True)
class TrialTiming:
    """Where one trial's wall time went (seconds)."""

    claim_s: float  # study lock + budget count (+ queueing)
    ask_tell_s: float  # ask (stale check, pop) + tell (state, values, best)
    in_trial_s: float  # reports, attributes, artifacts: what timing.storage_s + artifacts_s hold
    total_s: float


class SyntheticObjective:
    """The storage calls of :class:`search.trial.objective.Objective`, with a sleep for training."""

    def __init__(self, settings: Settings, lock: StudyLock | None) -> None:
        self.settings = settings
        self.lock = lock
        self.store = optuna.artifacts.FileSystemArtifactStore(settings.artifacts_dir)
        self.files = _artifact_files(Path(settings.artifacts_dir).parent)
        self.storage_s = 0.0
        self.run_s = 0.0

    def __call__(self, trial: optuna.Trial) -> float:
        if self.lock is not None:
            self.lock.release()  # the real objective releases the study lock once ask() is done
        started = time.perf_counter()
        self.storage_s = 0.0
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        trial.suggest_float("dropout", 0.0, 0.5)
        trial.suggest_categorical("optimizer", ["adam", "adamw", "sgd"])
        self._timed(trial.set_user_attr, "origin_trial", trial.number)
        self._attrs(trial, {"n_params": 4_010_000, "device": "cpu", "worker_pid": os.getpid(),
                            "model_spec": {"backbone": "b0", "fusion": "none", "dropout": 0.1}})
        f1 = 0.0
        for epoch in range(self.settings.epochs):
            time.sleep(self.settings.epoch_s)  # stands in for one epoch of training
            f1 = min(1.0, f1 + lr)
            self._timed(trial.report, f1, epoch)
            self._timed(trial.should_prune)  # NopPruner: no trial is cut short
        self._attrs(trial, {"per_class_f1": {"a": f1, "b": f1, "c": f1}, "accuracy": f1,
                            "images_per_s": 100.0, "seconds_per_epoch": self.settings.epoch_s,
                            "best_epoch": self.settings.epochs - 1,
                            "epochs_run": self.settings.epochs})
        for path in self.files:
            self._timed(optuna.artifacts.upload_artifact, artifact_store=self.store,
                        file_path=str(path), study_or_trial=trial)
        self._timed(trial.set_user_attr, "timing", {"storage_s": self.storage_s})
        self.run_s = time.perf_counter() - started
        return f1

    def _attrs(self, trial: optuna.Trial, attrs: dict) -> None:
        for key, value in attrs.items():
            self._timed(trial.set_user_attr, key, value)

    def _timed(self, call, *args, **kwargs) -> None:
        tick = time.perf_counter()
        call(*args, **kwargs)
        self.storage_s += time.perf_counter() - tick


def _artifact_files(folder: Path) -> list[Path]:
    files = []
    for name, size in ARTIFACT_BYTES.items():
        path = folder / f"{os.getpid()}-{name}"
        path.write_bytes(os.urandom(size))
        files.append(path)
    return files


def run_worker(settings: Settings, index: int, results: multiprocessing.Queue) -> None:
    """The loop of :func:`search.study.worker.run_worker`, timing every trial it runs."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = get_storage(settings.url, heartbeat=HeartbeatConfig(
        settings.heartbeat_s, 3 * settings.heartbeat_s))
    study = optuna.load_study(study_name="bench", storage=storage,
                              sampler=optuna.samplers.TPESampler(seed=index, n_startup_trials=4),
                              pruner=optuna.pruners.NopPruner())
    lock = StudyLock(settings.url, "bench")
    objective = SyntheticObjective(settings, lock)
    timings = []
    while True:
        started = time.perf_counter()
        lock.acquire()
        state = budget_state(study, settings.n_trials)
        if state.spent or (state.waiting == 0 and top_up(study, settings.n_trials) == 0):
            lock.release()
            if budget_state(study, settings.n_trials).spent:
                break
            time.sleep(settings.poll_s)  # the last slots run elsewhere
            continue
        claimed = time.perf_counter()
        study.optimize(objective, n_trials=1)
        done = time.perf_counter()
        timings.append(TrialTiming(
            claim_s=claimed - started, ask_tell_s=(done - claimed) - objective.run_s,
            in_trial_s=objective.storage_s, total_s=done - started))
    lock.close()
    storage.engine.dispose()
    results.put(timings)


def run_proxy_worker(settings: Settings, index: int, results: multiprocessing.Queue) -> None:
    """The loop of ``search worker`` behind ``search proxy``: no lock, pop a WAITING trial
    (the proxy queues the budget), heartbeats relayed through the proxy."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = ProxyStorage(settings.url, heartbeat=HeartbeatConfig(
        settings.heartbeat_s, 3 * settings.heartbeat_s))
    storage.wait_server_ready(timeout=60)
    study = optuna.load_study(study_name="bench", storage=storage,
                              sampler=optuna.samplers.TPESampler(seed=index, n_startup_trials=4),
                              pruner=optuna.pruners.NopPruner())
    objective = SyntheticObjective(settings, None)
    timings = []
    while True:
        started = time.perf_counter()
        state = budget_state(study, settings.n_trials)
        if state.spent:
            break
        if state.waiting == 0:
            time.sleep(settings.poll_s)  # the proxy tops the queue up; the last slots run elsewhere
            continue
        claimed = time.perf_counter()
        try:
            study.optimize(objective, n_trials=1)
        except NoWaitingTrial:
            continue  # another worker popped it first
        done = time.perf_counter()
        timings.append(TrialTiming(
            claim_s=claimed - started, ask_tell_s=(done - claimed) - objective.run_s,
            in_trial_s=objective.storage_s, total_s=done - started))
    storage.close()
    results.put(timings)


def run_proxy(database_url: str, port: int) -> None:
    """``search proxy`` in a process of its own."""
    logging.getLogger("search").setLevel(logging.ERROR)
    serve(database_url, host="127.0.0.1", port=port)


class SessionCounter:
    """The peak number of PostgreSQL sessions on one database, polled in a thread."""

    def __init__(self, admin: sqlalchemy.Engine, database: str) -> None:
        self.admin, self.database = admin, database
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> SessionCounter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        query = sqlalchemy.text("SELECT count(*) FROM pg_stat_activity WHERE datname = :db")
        with self.admin.connect() as connection:
            while not self._stop.wait(0.05):
                count = connection.execute(query, {"db": self.database}).scalar() or 0
                self.peak = max(self.peak, count)


def bench(settings: Settings, workers: int, *, proxy_port: int | None = None,
          sessions: SessionCounter | None = None) -> list[TrialTiming]:
    """Create the study, run ``workers`` processes on it, return every trial's timing.

    With ``proxy_port`` the workers talk to a proxy process serving ``settings.url``.
    """
    study = optuna.create_study(study_name="bench", storage=get_storage(settings.url),
                                direction="maximize")
    study.set_user_attr("n_trials", settings.n_trials)  # the proxy's coordinator reads it
    study._storage._backend.engine.dispose()
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    target, worker_settings = run_worker, settings
    proxy = None
    if proxy_port is not None:
        proxy = context.Process(target=run_proxy, args=(settings.url, proxy_port))
        proxy.start()
        target = run_proxy_worker
        worker_settings = dataclasses.replace(settings, url=f"grpc://127.0.0.1:{proxy_port}")
    processes = [context.Process(target=target, args=(worker_settings, i, results))
                 for i in range(workers)]
    try:
        with sessions or contextlib.nullcontext():
            timings = _collect(processes, results)
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.join()
    return timings


def _collect(processes: list, results: multiprocessing.Queue) -> list[TrialTiming]:
    """Start the workers and gather every trial's timing."""
    for process in processes:
        process.start()
    timings = [t for _ in processes for t in results.get(timeout=600)]
    for process in processes:
        process.join()
        if process.exitcode != 0:
            raise SystemExit(f"a benchmark worker failed (exit code {process.exitcode})")
    return timings


class Database:
    """A throw-away database: a file for SQLite, ``fs_bench_<random>`` on a server."""

    def __init__(self, backend: str, admin_url: str | None, folder: Path) -> None:
        self.backend = backend
        self.name = f"fs_bench_{secrets.token_hex(5)}"
        self.folder = folder
        self.admin = (None if backend == "sqlite" else sqlalchemy.create_engine(
            normalize_url(admin_url or ADMIN_URLS[backend]), isolation_level="AUTOCOMMIT"))

    def __enter__(self) -> str:
        if self.admin is None:
            return f"sqlite:///{self.folder / (self.name + '.db')}"
        with self.admin.connect() as connection:
            connection.execute(sqlalchemy.text(f"CREATE DATABASE {self.name}"))
        return make_url(self.admin.url).set(database=self.name).render_as_string(
            hide_password=False)

    def __exit__(self, *exc: object) -> None:
        if self.admin is None:
            return
        with self.admin.connect() as connection:
            force = " WITH (FORCE)" if self.backend == "postgresql" else ""
            connection.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {self.name}{force}"))
        self.admin.dispose()


def summarize(backend: str, workers: int, timings: list[TrialTiming]) -> list[str]:
    """One table row: mean milliseconds per trial, and storage's share of the trial time.

    Means, not medians: a worker's first trial (connecting, creating the schema cache) and
    waits for the study lock are part of what storage costs. The median is shown too.
    """
    def ms(values: list[float]) -> str:
        return f"{1000 * statistics.mean(values):.1f}"

    storage = [t.claim_s + t.ask_tell_s + t.in_trial_s for t in timings]
    total = [t.total_s for t in timings]
    return [backend, str(workers), str(len(timings)), ms([t.claim_s for t in timings]),
            ms([t.ask_tell_s for t in timings]), ms([t.in_trial_s for t in timings]),
            ms(storage), f"{1000 * statistics.median(storage):.1f}",
            f"{statistics.mean(total):.2f}", f"{100 * sum(storage) / sum(total):.1f}%"]


HEADER = ["backend", "workers", "trials", "claim ms", "ask+tell ms", "in-trial ms",
          "storage ms/trial", "median ms", "trial s", "storage share"]


PROXY_HEADER = ["storage", "workers", "trials", "claim ms", "ask+tell ms", "in-trial ms",
                "storage ms/trial", "median ms", "peak PG sessions"]


def proxy_rows(args: argparse.Namespace, counts: list[int]) -> list[list[str]]:
    """For each worker count: PostgreSQL direct, then through the proxy."""
    rows = []
    for workers in counts:
        for via_proxy in (False, True):
            with tempfile.TemporaryDirectory() as tmp, \
                    Database("postgresql", args.postgres, Path(tmp)) as url:
                (Path(tmp) / "artifacts").mkdir()
                settings = Settings(url, args.trials_per_worker * workers, args.epochs,
                                    args.epoch_s, args.heartbeat_s, str(Path(tmp) / "artifacts"),
                                    args.poll_s)
                database = make_url(url).database
                assert database is not None
                # Autocommit: within one transaction pg_stat_activity is a frozen snapshot.
                counter = SessionCounter(sqlalchemy.create_engine(
                    normalize_url(url), isolation_level="AUTOCOMMIT"), database)
                timings = bench(settings, workers, sessions=counter,
                                proxy_port=args.proxy_port if via_proxy else None)
                counter.admin.dispose()
            row = summarize("proxy" if via_proxy else "direct", workers, timings)[:8]
            rows.append([*row, str(counter.peak - 1)])  # less the counter's own session
            print("  done:", " ".join(rows[-1]), flush=True)
    return rows


def print_table(rows: list[list[str]], header: list[str] = HEADER) -> None:
    """A Markdown table, ready to paste into bench/README.md."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("| " + " | ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True))
              + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="sqlite,postgresql,mariadb")
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    parser.add_argument("--trials", type=int, default=12, help="trial budget per run")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--epoch-s", type=float, default=1.0,
                        help="seconds each synthetic epoch sleeps instead of training")
    parser.add_argument("--heartbeat-s", type=int, default=10,
                        help="heartbeat interval (the study-file default)")
    parser.add_argument("--postgres", help=f"admin URL (default {ADMIN_URLS['postgresql']})")
    parser.add_argument("--mysql", help=f"admin URL (default {ADMIN_URLS['mariadb']})")
    parser.add_argument("--poll-s", type=float, default=2.0,
                        help="an idle worker's wait before it looks again (search worker's)")
    parser.add_argument("--proxy", action="store_true",
                        help="PostgreSQL direct vs through `search proxy` (--workers "
                        "default 8,32,64), with the peak number of sessions")
    parser.add_argument("--trials-per-worker", type=int, default=2,
                        help="with --proxy: the budget is this many trials per worker")
    parser.add_argument("--proxy-port", type=int, default=13999)
    args = parser.parse_args()
    logging.getLogger("search.study.storage").setLevel(logging.ERROR)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    sizes = ", ".join(f"{name} {size // 1000} kB" for name, size in ARTIFACT_BYTES.items())
    print(f"synthetic objective (no training): {args.epochs} epochs x {args.epoch_s} s sleep; "
          f"per trial 3 suggestions, {args.epochs} x (report + should_prune), 11 user "
          f"attributes, 3 artifacts ({sizes}); "
          f"heartbeat every {args.heartbeat_s} s; "
          + (f"{args.trials_per_worker} trials per worker" if args.proxy
             else f"{args.trials} trials per run") + "; "
          f"{os.cpu_count()} CPUs; means per trial")
    if args.proxy:
        workers = "8,32,64" if args.workers == parser.get_default("workers") else args.workers
        print_table(proxy_rows(args, [int(w) for w in workers.split(",")]), PROXY_HEADER)
        return
    rows = []
    admin = {"postgresql": args.postgres, "mariadb": args.mysql}
    for backend in args.backends.split(","):
        for workers in (int(w) for w in args.workers.split(",")):
            with tempfile.TemporaryDirectory() as tmp, \
                    Database(backend, admin.get(backend), Path(tmp)) as url:
                (Path(tmp) / "artifacts").mkdir()
                settings = Settings(url, args.trials, args.epochs, args.epoch_s,
                                    args.heartbeat_s, str(Path(tmp) / "artifacts"), args.poll_s)
                rows.append(summarize(backend, workers, bench(settings, workers)))
                print("  done:", " ".join(rows[-1]), flush=True)
    print_table(rows)


if __name__ == "__main__":
    main()
