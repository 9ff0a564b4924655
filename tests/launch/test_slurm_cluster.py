"""`search slurm --submit` on a real single-node Slurm, against a real PostgreSQL study."""

from __future__ import annotations

import re
import time

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from search.cli import app
from search.study.storage import get_storage
from tests.db.conftest import tiny_study

N_TRIALS = 2
pytestmark = [pytest.mark.slurm, pytest.mark.db]


def trials(url: str) -> list[optuna.trial.FrozenTrial]:
    """The study's trials; none before the first worker has created it."""
    try:
        study = optuna.load_study(study_name="tiny", storage=get_storage(url))
    except KeyError:
        return []
    try:
        return study.get_trials()
    finally:
        study._storage._backend.engine.dispose()


def wait_until(condition, timeout_s: float, message):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.3)
    pytest.fail(message())


def test_a_job_array_spends_the_budget_and_takes_over_a_cancelled_tasks_trial(
        slurm_cluster, workdir, postgres_db, monkeypatch):
    url = postgres_db.url
    study_file = tiny_study(workdir, n_trials=N_TRIALS, epochs=6, heartbeat=(1, 4))
    study_file.write_text(study_file.read_text().replace("patience = 5", "patience = 10"))
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    started = time.monotonic()

    submitted = CliRunner().invoke(app, [
        "slurm", "--study", str(study_file), "--workers", "2", "--gpus-per-worker", "0",
        "--storage", url, "--submit"])
    assert submitted.exit_code == 0, submitted.output
    job_id = re.search(r"submitted job array (\d+)", submitted.output).group(1)
    script = (workdir / "runs" / "tiny" / "slurm" / "tiny.sbatch").read_text()
    assert url not in script and postgres_db.name not in script

    def task_logs() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted((workdir / "runs" / "tiny" / "slurm").glob("*.out")))

    # Task 1 has reported two epochs of its trial (the first one's resume file is on disk).
    victim = wait_until(lambda: next(
        (t for t in trials(url) if t.state == TrialState.RUNNING
         and t.user_attrs.get("slurm_array_task_id") == "1"
         and len(t.intermediate_values) >= 2), None),
        150, lambda: f"task 1 never ran a trial\n{task_logs()}")
    slurm_cluster.run("scancel", f"{job_id}_1")
    wait_until(lambda: not slurm_cluster.tasks(job_id), 150,
               lambda: f"tasks still queued: {slurm_cluster.tasks(job_id)}\n{task_logs()}")
    elapsed = time.monotonic() - started

    final = trials(url)
    states = [t.state for t in final]
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == N_TRIALS, (
        states, task_logs())
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states, states
    assert final[victim.number].state == TrialState.FAIL
    # Taken over by the surviving task, resumed from the cancelled task's last epoch.
    retry = next(t for t in final if t.number != victim.number
                 and t.user_attrs.get("origin_trial") == victim.number)
    assert retry.state == TrialState.COMPLETE, task_logs()
    assert retry.user_attrs["slurm_array_task_id"] == "0"
    assert retry.user_attrs["slurm_array_job_id"] == job_id
    assert retry.user_attrs["epochs_run"] < len(retry.intermediate_values)
    # Every trial that ran says which task ran it, and `search status` shows it.
    assert all(t.user_attrs["slurm_array_job_id"] == job_id for t in final)
    status = CliRunner().invoke(app, ["status", "--study", str(study_file), "--storage", url])
    assert status.exit_code == 0, status.output
    assert f"{job_id}_0" in status.output and f"{job_id}_1" in status.output
    print(f"slurm array of 2 tasks, {N_TRIALS} trials, one task cancelled: {elapsed:.0f} s")
