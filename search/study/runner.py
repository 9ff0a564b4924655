"""``search run``: create or load the study, start one worker per GPU, show progress.

The study is created here, once, before any worker starts (two processes creating the
same fresh SQLite study race on table creation). Workers are plain subprocesses running
``search worker``; the database is their only coordination. They get the storage URL in
their environment (``SEARCH_STORAGE``), never on their command line, which every local user
can read (``ps``, ``/proc/PID/cmdline``), password included.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState
from rich.console import Console
from rich.live import Live

from search.config import StudyConfig
from search.data.prepared import prepare_data
from search.errors import WorkersFailedError
from search.study.budget import StudyLock
from search.study.open import open_study
from search.study.proxy import is_proxy_url
from search.study.report import best_trials_table, failures, progress
from search.study.storage import WORKER_WAIT_S, interruptible, retrying
from search.study.supervisor import Supervisor
from search.trial.objective import check_pretrained, pick_device

STOP_GRACE_S = 60


@dataclass(frozen=True)
class WorkerPlan:
    """One worker process to start: its index, visible GPU (or None) and CPU threads."""

    index: int
    gpu: int | None
    threads: int


def plan_workers(config: StudyConfig, workers: int | None) -> list[WorkerPlan]:
    """One worker per visible GPU; on a CPU-only machine ``train.workers`` (default 1)."""
    gpus = torch.cuda.device_count() if config.train.device != "cpu" else 0
    count = workers or (gpus if gpus else (1 if config.train.workers == "auto"
                                           else config.train.workers))
    threads = config.train.threads or max(1, (os.cpu_count() or 1) // count)
    return [WorkerPlan(i, (i % gpus) if gpus else None, threads) for i in range(count)]


def physical_gpu(position: int, visible: str | None) -> str:
    """The device id to pin a worker to: position ``position`` in our own visible GPUs.

    ``torch.cuda`` numbers the GPUs we can see from 0, so with ``CUDA_VISIBLE_DEVICES=2,3``
    our GPU 1 is the machine's GPU 3, and that is what the worker must be given.
    """
    ids = [part.strip() for part in (visible or "").split(",") if part.strip()]
    return ids[position] if position < len(ids) else str(position)


def run_study(config: StudyConfig, *, storage_url: str, n_trials: int | None = None,
              workers: int | None = None, console: Console | None = None) -> optuna.Study:
    """Run (or continue) the study until its budget is spent; returns the study."""
    with interruptible():
        return _run_study(config, storage_url=storage_url, n_trials=n_trials, workers=workers,
                          console=console or Console())


def _run_study(config: StudyConfig, *, storage_url: str, n_trials: int | None,
               workers: int | None, console: Console) -> optuna.Study:
    pick_device(config.train.device)  # fail before anything starts if no GPU is there
    check_pretrained(config)  # ... or if ImageNet weights can be neither found nor fetched
    n_trials = n_trials or config.study.n_trials
    study = open_study(config, storage_url, mode="run", n_trials=n_trials)
    state = progress(study, n_trials)
    if state.done >= n_trials:
        console.print(f"study {config.name!r} is already finished: {state.line()}")
        console.print(best_trials_table(study))
        return study
    if state.done:
        console.print(f"continuing study {config.name!r}: {state.done}/{n_trials} trials done")

    data = prepare_data(config)  # generate, validate and cache once, before workers race
    console.print(f"data: {len(data.classes)} classes, "
                  + ", ".join(f"{name} {len(a.labels)}" for name, a in data.arrays.items()))
    plans = plan_workers(config, workers)
    console.print(f"starting {len(plans)} worker(s) on "
                  + ("GPU " + ",".join(physical_gpu(p.gpu, os.environ.get("CUDA_VISIBLE_DEVICES"))
                              for p in plans if p.gpu is not None) if plans[0].gpu is not None
                     else f"CPU ({plans[0].threads} threads each)")
                  + f"; logs in {config.run_dir / 'logs'}")
    lock = None if is_proxy_url(storage_url) else StudyLock(storage_url, config.name)
    supervisor = Supervisor(
        study, n_trials, lambda index: _start_worker(config, storage_url, n_trials, plans[index]),
        len(plans), max_restarts=config.study.max_worker_restarts, console=console, lock=lock)
    try:
        _watch(study, n_trials, supervisor, console)
    except KeyboardInterrupt:
        console.print("interrupted: stopping workers (their running trials are marked FAIL)")
        _stop(supervisor.processes)
        try:
            _fail_orphans(study, supervisor.processes)
        except KeyboardInterrupt:
            # The database is unreachable (interrupted storage calls do not retry); the
            # trials left RUNNING are failed by the next worker's heartbeat check.
            console.print("the storage is unreachable: trials left RUNNING are failed by "
                          "the next run's heartbeat check")
        console.print(f"run `search run --study {config.source}` to continue")
        raise
    finally:
        if lock is not None:
            lock.close()
    processes = supervisor.processes
    _fail_orphans(study, processes)
    _report_worker_errors(processes, config, console)
    final = progress(study, n_trials)
    console.print(final.line())
    console.print(best_trials_table(study))
    for line in failures(study):
        console.print(line)
    failed = sum(p.returncode != 0 for p in processes)
    if failed and final.done < n_trials:
        raise WorkersFailedError(
            f"{failed} of {len(processes)} worker(s) stopped with an error and "
            f"{n_trials - final.done} trial(s) of the budget are left; see the lines above, "
            f"then `search run --study {config.source}` continues")
    return study


def _start_worker(config: StudyConfig, storage_url: str, n_trials: int,
                  plan: WorkerPlan) -> subprocess.Popen:
    logs = config.run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # The URL (and its password) goes through the environment: a command line is public.
    env = {**os.environ, "SEARCH_STORAGE": storage_url}
    if plan.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = physical_gpu(plan.gpu, os.environ.get("CUDA_VISIBLE_DEVICES"))
    command = [sys.executable, "-m", "search", "worker", "--study", str(config.source),
               "--n-trials", str(n_trials),
               "--worker-index", str(plan.index), "--threads", str(plan.threads),
               # Restarted during a database restart, it waits instead of failing again.
               "--wait-for-storage", str(WORKER_WAIT_S)]
    log = open(logs / f"worker-{plan.index}.log", "a")
    # Own session: a terminal Ctrl-C reaches only us, and we forward exactly one SIGINT.
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    process.log_path = Path(log.name)  # type: ignore[attr-defined]
    log.close()
    return process


def _watch(study: optuna.Study, n_trials: int, supervisor: Supervisor,
           console: Console) -> None:
    """Live progress line until every worker has exited for good (restarts included)."""
    started = time.time()
    interactive = console.is_terminal
    last_state, last_print = None, 0.0
    with Live(console=console, auto_refresh=False, transient=False) as live:
        while True:
            running = supervisor.poll()
            state = retrying(progress, study, n_trials, started=started,
                             workers=len(supervisor.slots))
            if interactive:
                live.update(state.line(), refresh=True)
            elif (state.counts, state.best) != last_state or time.time() - last_print > 60:
                # Logs and CI get a line when something changed, or once a minute.
                console.print(state.line())
                last_state, last_print = (state.counts, state.best), time.time()
            if not running:
                return
            time.sleep(1.0 if interactive else 2.0)


def _stop(processes: list[subprocess.Popen]) -> None:
    """SIGINT, then wait; workers mark their trial FAIL and exit."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_GRACE_S
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _fail_orphans(study: optuna.Study, processes: list[subprocess.Popen]) -> None:
    """No trial of ours may stay RUNNING once its worker is gone (after Ctrl-C: not requeued,
    the user stopped the search on purpose)."""
    pids = {p.pid for p in processes}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get("worker_pid") in pids:
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)


def _report_worker_errors(processes: list[subprocess.Popen], config: StudyConfig,
                          console: Console) -> None:
    for process in processes:
        if process.returncode not in (0, None):
            log_path: Path = process.log_path  # type: ignore[attr-defined]
            lines = log_path.read_text(errors="replace").strip().splitlines()
            console.print(f"[red]worker exited with code {process.returncode}[/red]: "
                          f"{lines[-1] if lines else ''} (log: {log_path})")
