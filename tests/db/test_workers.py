"""Real studies against the real servers: many workers, a killed worker, a restarted server.

Every test runs ``search worker`` (or ``search run``) as separate processes on the tiniest
real study (16 px, b0, rgb only), in a database of its own.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import torch
from optuna.artifacts import download_artifact, get_all_artifact_meta
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import FrozenTrial, TrialState
from typer.testing import CliRunner

from search.cli import app
from search.config import HeartbeatConfig
from search.study.storage import get_storage, normalize_url
from search.study.worker import POLL_S
from search.trial.artifacts import (
    CHECKPOINT,
    CONFUSION,
    LEARNING_CURVE,
    METRICS,
    create_artifact_store,
)
from tests.db.conftest import (
    logs,
    reaped,
    start_worker,
    stop_all,
    tiny_study,
    wait_all,
)

pytestmark = [pytest.mark.db, pytest.mark.slow]
FINAL = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def open_study(url: str) -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=get_storage(url))


def wait_for_trial(url: str, ready, timeout_s: float = 180) -> FrozenTrial:
    """Poll the study until a trial satisfies ``ready`` (the study may not exist yet)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            for trial in open_study(url).get_trials():
                if ready(trial):
                    return trial
        except KeyError:
            pass  # no worker has created the study yet
        time.sleep(0.2)
    pytest.fail(f"no trial became ready within {timeout_s:.0f} s")


def test_three_workers_finish_exactly_the_budget(workdir, server_url):
    study_file = tiny_study(workdir, n_trials=4)
    workers = [start_worker(study_file, server_url, n_trials=4, index=i, workdir=workdir)
               for i in range(3)]
    try:
        assert wait_all(workers, timeout_s=300) == [0, 0, 0], logs(workdir)
    finally:
        stop_all(workers)
    study = open_study(server_url)
    trials = study.get_trials()
    assert all(t.state in FINAL for t in trials)
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == 4, [t.state for t in trials]
    store = create_artifact_store(workdir / "runs" / "tiny" / "artifacts")
    for trial in done:
        assert 0.0 <= trial.value <= 1.0
        assert trial.user_attrs["timing"]["storage_s"] < trial.user_attrs["timing"]["total_s"]
        files = {m.filename: m.artifact_id
                 for m in get_all_artifact_meta(trial, storage=study._storage)}
        assert set(files) == {CHECKPOINT, CONFUSION, LEARNING_CURVE, METRICS}
        download_artifact(artifact_store=store, artifact_id=files[METRICS],
                          file_path=str(workdir / "m.json"))
        assert json.loads((workdir / "m.json").read_text())["value"] == trial.value
        download_artifact(artifact_store=store, artifact_id=files[CHECKPOINT],
                          file_path=str(workdir / "c.pt"))
        assert torch.load(workdir / "c.pt", weights_only=True)["state_dict"]
        (workdir / "m.json").unlink()
        (workdir / "c.pt").unlink()
    study._storage._backend.engine.dispose()


def test_a_killed_worker_is_failed_by_heartbeat_and_its_trial_retried(workdir, postgres_db):
    interval, grace = 1, 4
    url = postgres_db.url
    study_file = tiny_study(workdir, n_trials=1, epochs=6, heartbeat=(interval, grace))
    study_file.write_text(study_file.read_text().replace("patience = 5", "patience = 10"))
    # One slot, two workers: one trains, the other waits and watches for stale trials.
    workers = [start_worker(study_file, url, n_trials=1, index=i, workdir=workdir)
               for i in range(2)]
    try:
        # Two epochs reported: the first epoch's resume file is on disk.
        victim = wait_for_trial(url, lambda t: t.state == TrialState.RUNNING
                                and "worker_pid" in t.user_attrs
                                and len(t.intermediate_values) >= 2)
        os.kill(victim.user_attrs["worker_pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for_trial(url, lambda t: t.number == victim.number and t.state == TrialState.FAIL,
                       timeout_s=60)
        failed_after = time.monotonic() - killed_at
        codes = wait_all(workers, timeout_s=180)
    finally:
        stop_all(workers)
    assert sorted(codes) == [-signal.SIGKILL, 0], logs(workdir)
    # Stale once the last beat is `grace` old; seen at the survivor's next poll.
    assert failed_after <= grace + POLL_S + 4, failed_after
    trials = open_study(url).get_trials()
    retry = trials[-1]
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert retry.system_attrs["failed_trial"] == victim.number
    assert retry.user_attrs["worker_pid"] != victim.user_attrs["worker_pid"]
    # Resumed from the dead worker's last epoch: fewer epochs trained than reported.
    assert retry.user_attrs["epochs_run"] < len(retry.intermediate_values)
    assert not list((workdir / "runs" / "tiny" / "artifacts" / "resume").glob("*.pt"))


def start_run(study_file: Path, url: str, workdir: Path, *extra: str,
              command: str = "run") -> subprocess.Popen:
    """``search run`` (or ``command``) as its own process; the URL (password and all) in its
    environment."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "SEARCH_STORAGE": url}
    return subprocess.Popen(
        [sys.executable, "-m", "search", command, "--study", str(study_file), *extra],
        cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def output_until(process: subprocess.Popen, needle: str, timeout: float) -> str:
    """What ``process`` printed up to the first line that holds ``needle``."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([process.stdout], [], [], 0.5)[0]:
            line = process.stdout.readline()
            seen.append(line)
            if needle in line or not line:
                break
    assert seen and needle in seen[-1], f"no {needle!r} within {timeout:g} s: {''.join(seen)}"
    return "".join(seen)


def worker_logs(workdir: Path) -> str:
    return "\n".join(p.read_text() for p in (workdir / "runs/tiny/logs").glob("*.log"))


def test_study_survives_a_postgresql_restart_with_nothing_lost(workdir, own_postgres):
    url = own_postgres.url
    study_file = tiny_study(workdir, n_trials=3, epochs=4, heartbeat=(1, 10))
    with reaped(start_run(study_file, url, workdir, "--workers", "2")) as run:
        wait_for_trial(url, lambda t: t.state == TrialState.RUNNING
                       and len(t.intermediate_values) >= 1)
        before = open_study(url).get_trials()
        own_postgres.stop("fast")  # every session ends, as in a real restart
        time.sleep(3)  # workers' storage calls fail and retry meanwhile
        own_postgres.start()
        output, _ = run.communicate(timeout=300)
    logs_text = worker_logs(workdir)
    # The study finished: no worker died of the outage, and `search run` exited 0.
    assert run.returncode == 0, output + logs_text
    assert "worker exited with code" not in output, output + logs_text
    assert "Exception in thread" not in logs_text  # the heartbeat thread lived on
    trials = open_study(url).get_trials()
    assert all(t.state in FINAL for t in trials), [t.state for t in trials]
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 3
    # Nothing stored before the restart was lost: states of finished trials, and every
    # epoch reported so far (a trial failed as stale is continued by its retry).
    for old in before:
        now = trials[old.number]
        if old.state.is_finished():
            assert (now.state, now.value) == (old.state, old.value)
        assert now.intermediate_values.items() >= old.intermediate_values.items()
        if now.state == TrialState.FAIL:
            retries = [t for t in trials if t.system_attrs.get("failed_trial") == now.number]
            assert retries, f"trial {now.number} failed and was not retried"


def test_heartbeat_thread_outlives_a_stopped_server(own_postgres, caplog):
    url = own_postgres.url
    storage = get_storage(url, heartbeat=HeartbeatConfig(interval_s=1, grace_s=60))
    study = optuna.create_study(study_name="beats", storage=storage)
    trial = study.ask()
    beats = get_heartbeat_thread(trial._trial_id, storage)
    caplog.set_level(logging.WARNING, logger="search.study.storage")
    beats.start()
    try:
        time.sleep(1.5)
        own_postgres.stop("fast")
        time.sleep(2.5)  # at least two beats hit a stopped server
        own_postgres.start()
        back = _last_beat(url, trial._trial_id)
        time.sleep(2.5)
        assert beats._thread.is_alive()
        assert _last_beat(url, trial._trial_id) > back  # beating again after the restart
    finally:
        beats.join()
    assert "heartbeat of trial id" in caplog.text
    study.tell(trial, 1.0)
    storage.engine.dispose()


def _last_beat(url: str, trial_id: int):
    engine = sqlalchemy.create_engine(normalize_url(url), pool_pre_ping=True)
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                with engine.connect() as connection:
                    return connection.execute(sqlalchemy.text(
                        "SELECT heartbeat FROM trial_heartbeats WHERE trial_id = :id"),
                        {"id": trial_id}).scalar_one()
            except sqlalchemy.exc.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)  # still starting up
    finally:
        engine.dispose()


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_ctrl_c_stops_run_and_workers_at_once_while_the_database_is_down(workdir, own_postgres):
    url = own_postgres.url
    study_file = tiny_study(workdir, n_trials=2, epochs=30, heartbeat=(1, 30))
    run = start_run(study_file, url, workdir, "--workers", "1")
    try:
        wait_for_trial(url, lambda t: t.state == TrialState.RUNNING
                       and len(t.intermediate_values) >= 1)
        workers = children(run.pid)
        assert workers
        own_postgres.stop("immediate")  # the database goes away under the running study
        time.sleep(2)  # storage calls now fail and retry
        run.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends
        interrupted = time.monotonic()
        output, _ = run.communicate(timeout=60)
        stopped_after = time.monotonic() - interrupted
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    # Seconds: a storage retry yields at once; what remains is two interpreters exiting.
    assert stopped_after < 5, f"took {stopped_after:.1f} s\n{output}{worker_logs(workdir)}"
    assert run.returncode == 130, output
    assert not [pid for pid in workers if alive(pid)], worker_logs(workdir)
    assert "Traceback" not in output


def test_no_password_on_any_command_line_log_or_error(workdir, own_postgres):
    secret = own_postgres.password  # the server checks it: a worker without it cannot join
    url = own_postgres.url
    study_file = tiny_study(workdir, n_trials=2)
    run = start_run(study_file, url, workdir, "--workers", "2")
    command_lines = []
    try:
        while run.poll() is None and len(command_lines) < 3:
            workers = children(run.pid)
            if len(workers) == 2:
                command_lines = [Path(f"/proc/{pid}/cmdline").read_bytes()
                                 for pid in (run.pid, *workers)]
            time.sleep(0.2)
        output, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 0, output + worker_logs(workdir)  # the workers did connect
    assert len(command_lines) == 3, "saw no worker running"
    assert all(b"search" in line and secret.encode() not in line for line in command_lines)
    assert secret not in output and secret not in worker_logs(workdir)

    # Error lines name the URL without its password, for a bad URL as for a bad database.
    bad = [url.rsplit("/", 1)[0] + "/no_such_database",
           url.replace(f":{own_postgres.port}/", ":not-a-port/"),
           url.replace("postgresql://", "postgresql:/"),
           url.replace("postgresql://", "")]
    for storage in bad:
        for command in ("run", "status", "worker"):
            result = CliRunner().invoke(app, [command, "--study", str(study_file)],
                                        env={"SEARCH_STORAGE": storage})
            assert result.exit_code == 2, (storage, command, result.output)
            assert secret not in result.output, (storage, command, result.output)
            assert "Traceback" not in result.output, result.output


def test_a_run_from_another_folder_keeps_the_studys_artifact_folder(workdir):
    study_file = tiny_study(workdir, n_trials=1)
    url = f"sqlite:///{workdir / 'shared.db'}"
    first, second = workdir / "first", workdir / "second"
    for folder, budget in ((first, 1), (second, 2)):
        folder.mkdir()
        run = start_run(study_file, url, folder, "--n-trials", str(budget))
        output, _ = run.communicate(timeout=300)
        assert run.returncode == 0, output
    study = optuna.load_study(study_name="tiny", storage=get_storage(url))
    recorded = Path(study.user_attrs["artifacts_dir"])
    assert recorded == (first / "runs" / "tiny" / "artifacts").resolve()  # set once, kept
    assert not list((second / "runs" / "tiny" / "artifacts").rglob("*.*"))
    store = create_artifact_store(recorded)
    trials = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    assert len(trials) == 2
    for trial in trials:  # both runs' checkpoints are in the one store
        files = {m.filename: m.artifact_id
                 for m in get_all_artifact_meta(trial, storage=study._storage)}
        target = workdir / f"checkpoint-{trial.number}.pt"
        download_artifact(artifact_store=store, artifact_id=files[CHECKPOINT],
                          file_path=str(target))
        assert torch.load(target, weights_only=True)["state_dict"]
    study._storage._backend.engine.dispose()


def test_a_worker_started_while_postgresql_restarts_waits_for_it(workdir, own_postgres):
    """What `search run` does for a worker it restarts during a database restart.

    The worker's first connection is refused; with ``--wait-for-storage`` it retries until
    the server is back, then creates the study, runs its trial and exits 0 (without it, a
    refused connection is one line and exit 2 at once: see test_cli_errors).
    """
    url = own_postgres.url
    study_file = tiny_study(workdir, n_trials=1, epochs=1)
    own_postgres.stop("fast")
    with reaped(start_run(study_file, url, workdir, "--threads", "1", "--wait-for-storage",
                          "60", command="worker")) as worker:
        # The worker is retrying its first connection (however long its imports took).
        waited = output_until(worker, "unreachable", timeout=60)
        own_postgres.start()
        output = waited + worker.communicate(timeout=180)[0]
    assert worker.returncode == 0, output
    assert "unreachable" in output and own_postgres.password not in output
    [trial] = open_study(url).get_trials()
    assert trial.state == TrialState.COMPLETE
