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


@pytest.fixture
def trials(postgres_db):
    """The test study's trials, read through one storage (none before a worker created it)."""
    storage = get_storage(postgres_db.url)
    opened: list[optuna.Study] = []

    def read() -> list[optuna.trial.FrozenTrial]:
        if not opened:
            try:
                opened.append(optuna.load_study(study_name="tiny", storage=storage))
            except KeyError:
                return []
        return opened[0].get_trials()

    yield read
    storage.engine.dispose()


def wait_until(condition, timeout_s: float, message):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.5)
    pytest.fail(message())


def submit(study_file, url: str, workers: int) -> str:
    """``search slurm --submit`` (CPU tasks); returns the array's job id."""
    submitted = CliRunner().invoke(app, [
        "slurm", "--study", str(study_file), "--workers", str(workers),
        "--gpus-per-worker", "0", "--storage", url, "--submit"])
    assert submitted.exit_code == 0, submitted.output
    return re.search(r"submitted job array (\d+)", submitted.output).group(1)


def task_logs(workdir) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                     for p in sorted((workdir / "runs" / "tiny" / "slurm").glob("*.out")))


def running_with_two_epochs(trials, task: str):
    """A RUNNING trial of array task ``task`` with two epochs reported (the first one's
    resume file is on disk), else None."""
    return next((t for t in trials() if t.state == TrialState.RUNNING
                 and t.user_attrs.get("slurm_array_task_id") == task
                 and len(t.intermediate_values) >= 2), None)


def test_a_job_array_spends_the_budget_and_takes_over_a_cancelled_tasks_trial(
        slurm_cluster, workdir, postgres_db, trials, monkeypatch):
    url = postgres_db.url
    study_file = tiny_study(workdir, n_trials=N_TRIALS, epochs=6, heartbeat=(1, 4))
    study_file.write_text(study_file.read_text().replace("patience = 5", "patience = 10"))
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    started = time.monotonic()

    job_id = submit(study_file, url, workers=2)
    script = (workdir / "runs" / "tiny" / "slurm" / "tiny.sbatch").read_text()
    assert url not in script and postgres_db.name not in script

    victim = wait_until(lambda: running_with_two_epochs(trials, "1"), 150,
                        lambda: f"task 1 never ran a trial\n{task_logs(workdir)}")
    slurm_cluster.run("scancel", f"{job_id}_1")
    wait_until(lambda: not slurm_cluster.tasks(job_id), 150,
               lambda: f"tasks still queued: {slurm_cluster.tasks(job_id)}\n{task_logs(workdir)}")
    elapsed = time.monotonic() - started

    final = trials()
    states = [t.state for t in final]
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == N_TRIALS, (
        states, task_logs(workdir))
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states, states
    assert final[victim.number].state == TrialState.FAIL
    # Taken over by the surviving task, resumed from the cancelled task's last epoch.
    retry = next(t for t in final if t.number != victim.number
                 and t.user_attrs.get("origin_trial") == victim.number)
    assert retry.state == TrialState.COMPLETE, task_logs(workdir)
    assert retry.user_attrs["slurm_array_task_id"] == "0"
    assert retry.user_attrs["slurm_array_job_id"] == job_id
    assert retry.user_attrs["epochs_run"] < len(retry.intermediate_values)
    # Every trial that ran says which task ran it, and `search status` shows it.
    assert all(t.user_attrs["slurm_array_job_id"] == job_id for t in final)
    status = CliRunner().invoke(app, ["status", "--study", str(study_file), "--storage", url])
    assert status.exit_code == 0, status.output
    assert f"{job_id}_0" in status.output and f"{job_id}_1" in status.output
    print(f"slurm array of 2 tasks, {N_TRIALS} trials, one task cancelled: {elapsed:.0f} s")


def test_the_time_limit_warning_stops_the_worker_and_requeues_its_task(
        slurm_cluster, workdir, postgres_db, trials, monkeypatch):
    url = postgres_db.url
    study_file = tiny_study(workdir, n_trials=1, epochs=6, heartbeat=(1, 4))
    study_file.write_text(study_file.read_text().replace("patience = 5", "patience = 10"))
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    started = time.monotonic()
    job_id = submit(study_file, url, workers=1)
    victim = wait_until(lambda: running_with_two_epochs(trials, "0"), 150,
                        lambda: f"the task never ran a trial\n{task_logs(workdir)}")
    # What Slurm sends the batch script --signal's lead time before the time limit.
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", f"{job_id}_0")
    wait_until(lambda: not slurm_cluster.tasks(job_id), 150,
               lambda: f"tasks still queued: {slurm_cluster.tasks(job_id)}\n{task_logs(workdir)}")
    elapsed = time.monotonic() - started

    job = slurm_cluster.run("scontrol", "show", "job", f"{job_id}_0")
    assert "Restarts=1" in job and "JobState=COMPLETED" in job, job
    final = trials()
    assert [t.state for t in final] == [TrialState.FAIL, TrialState.COMPLETE], task_logs(workdir)
    retry = final[1]
    # The requeued task resumed its own trial from the last epoch it finished.
    assert retry.user_attrs["origin_trial"] == victim.number
    assert retry.user_attrs["slurm_job_id"] == victim.user_attrs["slurm_job_id"]
    assert retry.user_attrs["epochs_run"] < len(retry.intermediate_values)
    print(f"slurm task warned, requeued and resumed: {elapsed:.0f} s")
