"""Real studies against the real servers: many workers, a killed worker, a restarted server.

Every test runs ``search worker`` (or ``search run``) as separate processes on the tiniest
real study (16 px, b0, rgb only), in a database of its own.
"""

from __future__ import annotations

import json
import logging
import os
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

from search.config import HeartbeatConfig
from search.study.storage import get_storage, normalize_url
from search.study.worker import POLL_S
from search.trial.artifacts import CHECKPOINT, CONFUSION, METRICS, create_artifact_store
from tests.db.conftest import (
    logs,
    pg_ctl,
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
        assert set(files) == {CHECKPOINT, CONFUSION, METRICS}
        download_artifact(artifact_store=store, artifact_id=files[METRICS],
                          file_path=str(workdir / "m.json"))
        assert json.loads((workdir / "m.json").read_text())["macro_f1"] == trial.value
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


def test_study_survives_a_postgresql_restart(workdir, restartable_postgres):
    url = restartable_postgres.url
    study_file = tiny_study(workdir, n_trials=3, epochs=4, heartbeat=(1, 6))
    run = subprocess.Popen(
        [sys.executable, "-m", "search", "run", "--study", str(study_file), "--storage", url,
         "--workers", "2"], cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    try:
        wait_for_trial(url, lambda t: t.state == TrialState.RUNNING
                       and len(t.intermediate_values) >= 1)
        before = {t.number: (t.state, t.value) for t in open_study(url).get_trials()
                  if t.state.is_finished()}
        pg_ctl("restart")
        output, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    worker_logs = "\n".join(p.read_text() for p in (workdir / "runs/tiny/logs").glob("*.log"))
    assert "Exception in thread" not in worker_logs  # the heartbeat thread lived on
    trials = open_study(url).get_trials()
    assert all(t.state in FINAL for t in trials), [t.state for t in trials]
    for number, (state, value) in before.items():  # nothing finished was lost
        assert (trials[number].state, trials[number].value) == (state, value)
    done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    worker_errors = [line for line in output.splitlines() if "worker exited with code" in line]
    # Either the study finished, or a worker said clearly why it stopped and `run` failed.
    assert run.returncode == (0 if done == 3 else 1), output + worker_logs
    assert done == 3 or worker_errors, output
    assert all("error: " in line for line in worker_errors), worker_errors


def test_heartbeat_thread_outlives_a_stopped_server(restartable_postgres, caplog):
    url = restartable_postgres.url
    storage = get_storage(url, heartbeat=HeartbeatConfig(interval_s=1, grace_s=60))
    study = optuna.create_study(study_name="beats", storage=storage)
    trial = study.ask()
    beats = get_heartbeat_thread(trial._trial_id, storage)
    caplog.set_level(logging.WARNING, logger="search.study.storage")
    beats.start()
    try:
        time.sleep(1.5)
        pg_ctl("stop")
        time.sleep(2.5)  # at least two beats hit a stopped server
        pg_ctl("start")
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
