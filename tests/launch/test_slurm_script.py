"""`search slurm` without a cluster: the script it writes and the input it refuses."""

from __future__ import annotations

import os
import re
import subprocess

import optuna
import pytest
from optuna.trial import TrialState
from rich.console import Console
from typer.testing import CliRunner

from search.cli import app
from search.launch.placement import slurm_attrs, slurm_task
from search.launch.slurm import SIGNAL_LEAD_S
from search.study.report import slurm_table
from tests.db.conftest import tiny_study

URL = "postgresql://search:s3cret-pw@db-host:5432/search"


def slurm(*args: str):
    return CliRunner().invoke(app, ["slurm", *args])


def directives(script: str) -> dict[str, str]:
    """``#SBATCH --key=value`` lines as a dict (``--requeue`` -> "")."""
    found = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line.removeprefix("#SBATCH ").partition("=")
            found[key] = value
    return found


@pytest.fixture
def study_file(workdir):
    return tiny_study(workdir, n_trials=2)


def test_writes_an_array_of_workers_with_requeue_and_a_warning_signal(workdir, study_file):
    result = slurm("--study", str(study_file), "--workers", "3", "--storage", URL,
                   "--partition", "gpu", "--time", "02:00:00", "--account", "lab")
    assert result.exit_code == 0, result.output
    script = (workdir / "runs" / "tiny" / "slurm" / "tiny.sbatch").read_text()
    found = directives(script)
    assert found["--array"] == "0-2"
    assert found["--gres"] == "gpu:1"
    assert (found["--partition"], found["--time"], found["--account"]) == (
        "gpu", "02:00:00", "lab")
    assert "--requeue" in found
    assert found["--signal"] == f"B:USR1@{SIGNAL_LEAD_S}"
    assert found["--chdir"] == str(workdir)
    worker = next(line for line in script.splitlines() if " -m search worker " in line)
    assert f"--study {study_file}" in worker
    assert '--worker-index "$SLURM_ARRAY_TASK_ID"' in worker
    assert "--wait-for-storage 60.0" in worker  # a task started during an outage waits
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_the_storage_url_and_its_password_stay_out_of_the_script_and_the_output(
        workdir, study_file):
    result = slurm("--study", str(study_file), "--workers", "2", "--storage", URL)
    assert result.exit_code == 0, result.output
    script = (workdir / "runs" / "tiny" / "slurm" / "tiny.sbatch").read_text()
    assert "s3cret-pw" not in script and "db-host" not in script
    assert "s3cret-pw" not in result.output
    # A task refuses to start without the URL in its environment.
    env = {k: v for k, v in os.environ.items() if k != "SEARCH_STORAGE"}
    task = subprocess.run(["bash", str(workdir / "runs" / "tiny" / "slurm" / "tiny.sbatch")],
                          env=env, capture_output=True, text=True, timeout=30)
    assert task.returncode != 0 and "SEARCH_STORAGE: is not set" in task.stderr


def test_cpu_clusters_ask_for_no_gpu(workdir, study_file):
    result = slurm("--study", str(study_file), "--workers", "2", "--gpus-per-worker", "0",
                   "--storage", URL, "--out", "array.sh")
    assert result.exit_code == 0, result.output
    assert "--gres" not in directives((workdir / "array.sh").read_text())


@pytest.mark.parametrize("storage", ["sqlite:///runs/tiny/study.db", None])
def test_sqlite_is_refused_in_one_line(workdir, study_file, storage):
    args = ["--storage", storage] if storage else []  # None: the default SQLite file
    result = slurm("--study", str(study_file), "--workers", "2", *args)
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "SQLite" in result.output
    assert not (workdir / "runs" / "tiny" / "slurm" / "tiny.sbatch").exists()


@pytest.mark.parametrize(("flag", "value", "named"), [
    ("--time", "1:00", "--time"),
    ("--time", "00:03:00", "too short"),
    ("--partition", "gpu; rm -rf /", "--partition"),
    ("--account", "lab\n#SBATCH --x", "--account"),
])
def test_bad_options_are_one_line_naming_the_option(workdir, study_file, flag, value, named):
    result = slurm("--study", str(study_file), "--workers", "2", "--storage", URL, flag, value)
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and named in result.output


def test_submit_without_sbatch_is_one_line(workdir, study_file, monkeypatch):
    monkeypatch.setenv("PATH", str(workdir))  # no sbatch here
    result = slurm("--study", str(study_file), "--workers", "2", "--storage", URL, "--submit")
    assert result.exit_code == 2
    assert re.search(r"error: sbatch not found", result.output)


def test_slurm_ids_become_trial_attributes_and_a_task_name():
    environ = {"SLURM_ARRAY_JOB_ID": "41", "SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_ID": "44",
               "HOME": "/root"}
    attrs = slurm_attrs(environ)
    assert attrs == {"slurm_array_job_id": "41", "slurm_array_task_id": "3",
                     "slurm_job_id": "44"}
    assert slurm_task(attrs) == "41_3"
    assert slurm_task({"slurm_job_id": "7"}) == "7"
    assert slurm_attrs({"HOME": "/root"}) == {} and slurm_task({}) is None


def test_status_groups_started_trials_by_slurm_task_in_task_order():
    study = optuna.create_study(direction="maximize")
    for task, value in [("10", 0.5), ("2", None), ("2", 0.7), ("-", None)]:
        trial = study.ask()
        if task != "-":
            trial.set_user_attr("slurm_array_job_id", "41")
            trial.set_user_attr("slurm_array_task_id", task)
        if value is None and task != "-":
            study.tell(trial, state=TrialState.FAIL)
        elif value is not None:
            study.tell(trial, value)
    # A waiting retry still carries the ids of the task that died: not shown as run there.
    study.enqueue_trial({}, user_attrs={"slurm_array_job_id": "41", "slurm_array_task_id": "9"})
    console = Console(width=200, record=True)
    console.print(slurm_table(study))
    rows = [line for line in console.export_text().splitlines() if "41_" in line]
    assert [row.split()[1] for row in rows] == ["41_2", "41_10"]
    assert "1 (fail), 2 (complete)" in rows[0] and "0 (complete)" in rows[1]
    assert slurm_table(optuna.create_study()) is None
