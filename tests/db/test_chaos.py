"""Chaos: two studies under fire finish exactly their budgets, and no trial is lost.

``search run --workers 3`` on a PostgreSQL server of the test's own and ``search run
--workers 2`` on SQLite train at once. Meanwhile a random worker that is running a trial is
SIGKILLed every few seconds (its supervisor restarts it and the trial resumes from its last
epoch), the PostgreSQL server is stopped and started once, and the PostgreSQL study's artifact
folder (a small tmpfs, else a file-size limit) runs out of space once. Then every promise
is checked on what is stored.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import torch
from optuna.artifacts import download_artifact
from optuna.trial import FrozenTrial, TrialState
from PIL import Image

from search.study.requeue import requeued_numbers
from search.study.storage import get_storage
from search.trial.artifacts import CHECKPOINT, CONFUSION, create_artifact_store, find_artifact
from tests.db.conftest import OwnPostgres, tiny_study
from tests.db.test_workers import alive, children
from tests.search.conftest import make_dataset

pytestmark = [pytest.mark.db, pytest.mark.slow]
ROOT = Path(__file__).parents[2]

WORKERS = {"pg": 3, "lite": 2}
N_TRIALS = {"pg": 4, "lite": 3}
EPOCHS = 4
KILL_EVERY_S = 3.0
MAX_KILLS = 8
# Both faults after the 2nd kill: on an idle machine the studies can end before a 4th.
RESTART_POSTGRES_AFTER = FILL_DISK_AFTER = 2  # kills
# Without a tmpfs (no CAP_SYS_ADMIN), one worker's files are capped instead: below a
# checkpoint or resume file (b0: over 15 MB), above any log line it writes.
FILE_SIZE_LIMIT = 4 << 20
NO_SPACE = ("No space left", "could not write", "File too large")
# A hang detector, generous: on the loaded machine this test was written on (load 15-50 on
# 2 cores) starting one worker (importing torch) took over a minute, and a run 8-9 minutes.
RUN_LIMIT_S = 900


def chaos_study(workdir: Path, name: str) -> Path:
    """A small study whose supervisor and heartbeat retries outlast every kill of the test.

    Four times the tiny study's images at twice its resolution: on an idle machine the tiny
    study's trials took 3 s, and both studies ended before the second kill.
    """
    if not (workdir / "data").exists():
        make_dataset(workdir / "data", counts={"red": 32, "green": 24, "yellow": 24},
                     modalities=("rgb",))
    path = tiny_study(workdir, n_trials=N_TRIALS[name], epochs=EPOCHS, name=name,
                      heartbeat=(1, 10))
    path.write_text(path.read_text().replace("resolution = 16", "resolution = 32").replace(
        "seed = 0\n", "seed = 0\nmax_worker_restarts = 100\nmax_retry = 100\n", 1))
    return path


def start_run(workdir: Path, name: str, url: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SEARCH_STORAGE": url}
    with open(workdir / f"run-{name}.log", "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "search", "run", "--study", str(workdir / f"{name}.toml"),
             "--workers", str(WORKERS[name])],
            cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env)


def read_trials(url: str, name: str) -> list[FrozenTrial]:
    storage = get_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials()
    finally:
        storage.remove_session()
        storage.engine.dispose()


@contextlib.contextmanager
def small_disk(folder: Path) -> Iterator[bool]:
    """Mount a 1 GB tmpfs on ``folder``, unmounted after; yields whether it could.

    ``CHAOS_FULL_DISK=rlimit`` skips the mount, to try the fallback on a machine that has it.
    """
    folder.mkdir(parents=True)
    mounted = os.environ.get("CHAOS_FULL_DISK") != "rlimit" and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1g", "tmpfs", str(folder)],
        capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "--lazy", str(folder)], check=False)


def fill(ballast: Path) -> None:
    """Grow ``ballast`` until its file system is full (again: workers free space meanwhile)."""
    chunk = bytes(1 << 20)
    with open(ballast, "ab", buffering=0) as file, contextlib.suppress(OSError):  # ENOSPC
        while True:
            file.write(chunk)


class Chaos:
    """The faults, and the count of each."""

    def __init__(self, workdir: Path, runs: dict[str, subprocess.Popen], urls: dict[str, str],
                 postgres: OwnPostgres) -> None:
        self.workdir, self.runs, self.urls, self.postgres = workdir, runs, urls, postgres
        self.kills = 0
        self.workers_seen: set[int] = set()

    def kill_one(self) -> None:
        """SIGKILL a random worker that is running a trial (one with epochs done, if any)."""
        workers = {pid for run in self.runs.values() for pid in children(run.pid)}
        self.workers_seen |= workers
        running = [t for name, url in self.urls.items() for t in read_trials(url, name)
                   if t.state == TrialState.RUNNING and t.user_attrs.get("worker_pid") in workers]
        victims = [t for t in running if t.intermediate_values] or running
        if victims:
            os.kill(random.choice(victims).user_attrs["worker_pid"], signal.SIGKILL)
            self.kills += 1

    def restart_postgres(self) -> None:
        self.postgres.stop("fast")  # every session ends, as in a real restart
        time.sleep(3)  # workers' storage calls fail and retry meanwhile
        self.postgres.start()

    def run_out_of_space(self, folder: Path, mounted: bool, timeout_s: float = 180) -> None:
        """Fill the artifact folder (or cap the file size of a worker, without a tmpfs) until
        a trial fails for want of space, then free it."""
        deadline = time.monotonic() + timeout_s
        if not mounted:
            self.limit_file_size(deadline)
            return
        ballast = folder / "ballast"
        try:
            while time.monotonic() < deadline and not self.no_space_failures():
                fill(ballast)
                time.sleep(0.5)
        finally:
            ballast.unlink()

    def limit_file_size(self, deadline: float) -> None:
        """``RLIMIT_FSIZE`` on a PostgreSQL worker that runs a trial, until a trial fails for
        it (Python ignores SIGXFSZ, so a write past the limit fails with EFBIG); a worker
        killed meanwhile takes its limit along, and the next one gets it."""
        limited = None
        # The soft limit only: raising a hard limit back needs CAP_SYS_RESOURCE.
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        try:
            while time.monotonic() < deadline and not self.no_space_failures():
                if limited is None or not alive(limited):
                    running = [t.user_attrs["worker_pid"]
                               for t in read_trials(self.urls["pg"], "pg")
                               if t.state == TrialState.RUNNING and "worker_pid" in t.user_attrs]
                    limited = next((pid for pid in running if alive(pid)), None)
                    if limited is not None:
                        with contextlib.suppress(ProcessLookupError):
                            resource.prlimit(limited, resource.RLIMIT_FSIZE,
                                             (FILE_SIZE_LIMIT, hard))
                time.sleep(0.5)
        finally:
            if limited is not None:
                with contextlib.suppress(ProcessLookupError):
                    resource.prlimit(limited, resource.RLIMIT_FSIZE, (soft, hard))

    def no_space_failures(self) -> list[FrozenTrial]:
        # The resume file (its write error is torch's, which may not name the cause) or
        # an artifact could not be written.
        return [t for t in read_trials(self.urls["pg"], "pg")
                if any(s in t.user_attrs.get("fail_reason", "") for s in NO_SPACE)]


def test_chaos(workdir, own_postgres):
    urls = {"pg": own_postgres.url, "lite": f"sqlite:///{workdir / 'lite.db'}"}
    for name in urls:
        chaos_study(workdir, name)
    pg_artifacts = workdir / "runs" / "pg" / "artifacts"
    with small_disk(pg_artifacts) as mounted:
        runs = {name: start_run(workdir, name, url) for name, url in urls.items()}
        chaos = Chaos(workdir, runs, urls, own_postgres)
        started = time.monotonic()
        try:
            wait_for_training(workdir, runs, urls)
            next_kill = time.monotonic()
            while any(run.poll() is None for run in runs.values()):
                assert time.monotonic() - started < RUN_LIMIT_S, "the studies did not finish"
                if chaos.kills < MAX_KILLS and time.monotonic() >= next_kill:
                    chaos.kill_one()
                    next_kill = time.monotonic() + KILL_EVERY_S
                    if chaos.kills == RESTART_POSTGRES_AFTER:
                        chaos.restart_postgres()
                    if chaos.kills == FILL_DISK_AFTER:
                        chaos.run_out_of_space(pg_artifacts, mounted)
                time.sleep(0.5)
        finally:
            for run in runs.values():
                if run.poll() is None:
                    run.kill()
                    run.wait()
            chaos.workers_seen |= {pid for run in runs.values() for pid in children(run.pid)}
            stragglers = [pid for pid in chaos.workers_seen if alive(pid)]
            for pid in stragglers:
                os.kill(pid, signal.SIGKILL)
        output = "\n".join((workdir / f"run-{name}.log").read_text() for name in runs)
        assert [run.returncode for run in runs.values()] == [0, 0], output
        assert not stragglers, f"workers {stragglers} outlived their `search run`"
        assert chaos.no_space_failures(), "the full disk failed no trial: it was not tested"
        resumed = sum(check_study(workdir, name, url) for name, url in urls.items())
    restarts = output.count("restarted it")
    # A kill can land just as the victim's trial ends the budget: nothing is left to restart
    # it for, and the supervisor says so (CI saw one such kill of 8).
    too_late = output.count("after the budget was spent; not restarted")
    # Else the faults below never happened and the checks above proved little.
    assert chaos.kills >= FILL_DISK_AFTER and resumed, f"{chaos.kills} kills, {resumed} resumed"
    # Every kill hit a worker that was restarted, or one the finished budget no longer needed.
    assert restarts + too_late >= chaos.kills, output
    print(f"\nfull disk: {'a 1 GB tmpfs' if mounted else 'RLIMIT_FSIZE on one worker'}")
    print(f"kills after the budget was spent (nothing to restart): {too_late}")
    print(f"chaos: {chaos.kills} kills, {restarts} restarts, {resumed} resumed trials, "
          f"0 lost\nchaos took {time.monotonic() - started:.0f} s")


def wait_for_training(workdir: Path, runs: dict[str, subprocess.Popen],
                      urls: dict[str, str], timeout_s: float = 600) -> None:
    """Until each study has a trial with an epoch done (the studies exist only from then on)."""
    deadline = time.monotonic() + timeout_s
    waiting = set(runs)
    while waiting:
        assert time.monotonic() < deadline, f"{waiting} never started training"
        for name in list(waiting):
            assert runs[name].poll() is None, (workdir / f"run-{name}.log").read_text()
            log = (workdir / f"run-{name}.log").read_text()
            # `search run` has created the study once it starts workers.
            if "starting" in log and any(t.intermediate_values
                                         for t in read_trials(urls[name], name)):
                waiting.discard(name)
        time.sleep(0.5)


def check_study(workdir: Path, name: str, url: str) -> int:
    """Assert that nothing of study ``name`` was lost; returns its resumed trials."""
    trials = read_trials(url, name)
    states = [t.state for t in trials]
    table = describe(trials)  # what a failure needs to be understood without a rerun
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states, table
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == N_TRIALS[name], table
    # Each failure is either a requeue (killed, or failed as stale: a copy carries on) or
    # a trial that could not write to the full disk; anything else is a bug or a lost trial.
    requeued = requeued_numbers(trials)
    failed = {t.number: t.user_attrs.get("fail_reason") for t in trials
              if t.state == TrialState.FAIL and t.number not in requeued}
    assert all(r and any(s in r for s in NO_SPACE)
               for r in failed.values()), f"{name}: failed, not resumed: {failed}"

    artifacts = workdir / "runs" / name / "artifacts"
    store = create_artifact_store(artifacts)
    storage = get_storage(url)
    downloads = workdir / "downloads" / name
    for trial in done:
        if trial.state == TrialState.COMPLETE:
            assert trial.value is not None
            checkpoint = download(store, storage, trial, CHECKPOINT, downloads)
            assert torch.load(checkpoint, weights_only=True)["state_dict"], trial.number
            with Image.open(download(store, storage, trial, CONFUSION, downloads)) as png:
                png.verify()  # a whole PNG, not the start of one
            # A full history: every epoch reported once, none missing around a kill.
            assert sorted(trial.intermediate_values) == list(range(EPOCHS)), trial.number
    storage.engine.dispose()

    copies = [t for t in trials if "failed_trial" in t.system_attrs]
    for copy in copies:
        # The epochs the killed trials reported are the copy's first epochs, unchanged.
        for number in copy.system_attrs["retry_history"]:
            before = trials[number].intermediate_values.items()
            assert before <= copy.intermediate_values.items(), (number, copy.number)
    assert not [p for p in (artifacts / "resume").rglob("*") if p.is_file()], \
        "resume files left behind"
    return sum(t.state.is_finished() and t.state != TrialState.FAIL for t in copies)


def describe(trials: list[FrozenTrial]) -> str:
    """One line per trial: state, times, who ran it, why it ended, what it copies."""
    def when(moment) -> str:
        return moment.strftime("%H:%M:%S.%f")[:-3] if moment else "-"

    return "\n".join(
        f"#{t.number} {t.state.name} {when(t.datetime_start)}-{when(t.datetime_complete)} "
        f"pid={t.user_attrs.get('worker_pid')} epochs={sorted(t.intermediate_values)} "
        f"interrupted={t.user_attrs.get('interrupted')!r} "
        f"resumed_after={t.user_attrs.get('resumed_after')!r} "
        f"fail_reason={t.user_attrs.get('fail_reason')!r} "
        f"retry_history={t.system_attrs.get('retry_history')}" for t in trials)


def download(store, storage, trial: FrozenTrial, filename: str, folder: Path) -> Path:
    """The trial's artifact called ``filename``, downloaded into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{trial.number}-{filename}"
    download_artifact(artifact_store=store, file_path=str(path),
                      artifact_id=find_artifact(trial, storage, filename))
    return path
