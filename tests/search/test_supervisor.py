"""`search run` with one worker: a SIGKILLed worker is restarted and its trial resumed."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from search.study.supervisor import Supervisor, describe_exit
from tests.search.conftest import write_study

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]


def _trials(workdir: Path) -> list[FrozenTrial]:
    db = workdir / "runs" / "tiny" / "study.db"
    # Opening a half-created database with Optuna would race the worker on creating its
    # tables, so look for the study row with plain sqlite3 first.
    if not db.exists():
        return []
    try:
        with closing(sqlite3.connect(db)) as connection:
            found = connection.execute(
                "SELECT 1 FROM studies WHERE study_name = 'tiny'").fetchone()
    except sqlite3.OperationalError:
        found = None  # no database or no tables yet
    if not found:
        return []
    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{db}").get_trials()


def _wait_for(workdir: Path, ready, run: subprocess.Popen, timeout_s: float = 240) -> FrozenTrial:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and run.poll() is None:
        for trial in _trials(workdir):
            if ready(trial):
                return trial
        time.sleep(0.3)
    run.kill()
    pytest.fail(f"no trial became ready (run exited {run.poll()}): {run.communicate()[0]}")


def test_a_killed_single_worker_is_restarted_and_its_trial_resumes(workdir, tiny_data):
    study_file = write_study(workdir, tiny_data, n_trials=1, epochs=5, fusion='["early"]',
                             extra="")
    study_file.write_text(study_file.read_text().replace("patience = 5", "patience = 20"))
    run = subprocess.Popen(
        [sys.executable, "-m", "search", "run", "--study", str(study_file)], cwd=workdir,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        # Two epochs reported: the first epoch's resume file is on disk.
        victim = _wait_for(workdir, lambda t: t.state == TrialState.RUNNING
                           and "worker_pid" in t.user_attrs
                           and len(t.intermediate_values) >= 2, run)
        os.kill(victim.user_attrs["worker_pid"], signal.SIGKILL)
        output, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 0, output
    trials = _trials(workdir)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE], output
    killed, copy = trials
    reason = f"worker 0 (pid {victim.user_attrs['worker_pid']}) killed by SIGKILL"
    assert killed.user_attrs["interrupted"] == reason
    assert copy.user_attrs["resumed_after"] == reason and copy.user_attrs["interrupted"] == ""
    assert copy.system_attrs["failed_trial"] == killed.number
    assert copy.params == killed.params
    # Resumed, not restarted: the epochs before the kill are in its history, not retrained.
    assert copy.user_attrs["epochs_run"] < len(copy.intermediate_values) == 5
    assert set(killed.intermediate_values.items()) <= set(copy.intermediate_values.items())
    assert "restarted it (1/3)" in output and "1/1 done" in output
    assert "1 requeued" in output and "trial 0 requeued (" + reason in output
    assert not list((workdir / "runs" / "tiny" / "artifacts" / "resume").glob("*.pt"))


def test_exit_descriptions():
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(-signal.SIGTERM) == "killed by SIGTERM"
    assert describe_exit(3) == "exited with code 3"


def _worker(workdir: Path, study_file: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "search", "worker", "--study", str(study_file), "--threads", "1"],
        cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_a_worker_killed_after_the_budget_is_spent_is_not_restarted(tmp_path):
    """A kill that lands as the last trial ends: nothing to resume, nothing to restart for."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}",
                                direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=0.5))  # a budget of 1, spent
    started: list[int] = []

    def start(index: int) -> subprocess.Popen:
        started.append(index)
        return subprocess.Popen([sys.executable, "-c",
                                 "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])

    console = Console(record=True, width=200)
    supervisor = Supervisor(study, 1, start, 1, max_restarts=3, console=console)
    supervisor.slots[0].process.wait()
    assert supervisor.poll() is False  # nothing runs any more
    assert started == [0]
    assert "killed by SIGKILL after the budget was spent; not restarted" in console.export_text()


def test_sigterm_preempts_a_worker_whose_trial_resumes_in_the_next(workdir, tiny_data):
    study_file = write_study(workdir, tiny_data, n_trials=1, epochs=5, fusion='["early"]')
    study_file.write_text(study_file.read_text().replace("patience = 5", "patience = 20"))
    first = _worker(workdir, study_file)
    victim = _wait_for(workdir, lambda t: t.state == TrialState.RUNNING
                       and len(t.intermediate_values) >= 2, first)
    sent = time.monotonic()
    # Slurm's scancel signals the batch shell, which forwards SIGTERM, and the worker itself:
    # a burst of them must not cut short the requeue that the first one started.
    for _ in range(20):
        if first.poll() is not None:
            break
        first.send_signal(signal.SIGTERM)
        time.sleep(0.05)
    output, _ = first.communicate(timeout=60)
    assert time.monotonic() - sent < 15, output  # left its step promptly
    assert first.returncode == 75, output  # "restart me", distinct from a crash or Ctrl-C
    # Optuna logs the interrupted trial (with its stack); our own last word is one line.
    assert output.strip().splitlines()[-1] == (
        "preempted: SIGTERM; the running trial resumes elsewhere"), output
    killed, copy = _trials(workdir)
    assert killed.number == victim.number and killed.state == TrialState.FAIL
    assert killed.user_attrs["interrupted"] == "preempted (SIGTERM)"
    assert copy.state == TrialState.WAITING and copy.params == killed.params
    assert list((workdir / "runs" / "tiny" / "artifacts" / "resume").glob("*.pt"))

    second = _worker(workdir, study_file)
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 0, output
    killed, copy = _trials(workdir)
    assert copy.state == TrialState.COMPLETE
    assert copy.user_attrs["resumed_after"] == "preempted (SIGTERM)"
    assert copy.user_attrs["epochs_run"] < len(copy.intermediate_values) == 5
