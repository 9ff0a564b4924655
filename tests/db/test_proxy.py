"""``search proxy``: Optuna's gRPC storage proxy in front of a real PostgreSQL database.

Workers run as processes with ``--storage grpc://...``; the proxy, its own process, is the
only client of the database, and the study's coordinator: it queues the budget and fails
the trials of dead workers (see :mod:`search.study.proxy`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from search.cli import app
from search.errors import StorageError
from search.study.proxy import TEND_S, ProxyStorage, parse_proxy_url
from search.study.storage import get_storage
from tests.db.conftest import _free_port, logs, start_worker, stop_all, tiny_study, wait_all
from tests.db.test_workers import wait_for_trial

FINAL = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def test_proxy_urls_parse_or_fail_with_one_line():
    assert parse_proxy_url("grpc://10.0.0.5:13001") == ("10.0.0.5", 13001)
    assert parse_proxy_url("grpc://proxy") == ("proxy", 13000)
    for bad in ("grpc://", "grpc://host:port", "grpc://user:pw@host:1", "grpc://h:99999"):
        with pytest.raises(StorageError, match="grpc://HOST:PORT"):
            parse_proxy_url(bad)


def test_proxy_cli_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("SEARCH_STORAGE", raising=False)
    runner = CliRunner()
    result = runner.invoke(app, ["proxy"])
    assert result.exit_code == 2
    assert "no storage to serve" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["proxy", "--storage", "grpc://127.0.0.1:13000"])
    assert result.exit_code == 2 and "not another proxy" in result.output
    with socket.socket() as taken:  # a port someone else listens on
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["proxy", "--storage", f"sqlite:///{tmp_path / 's.db'}",
                                     "--port", str(port)])
    assert result.exit_code == 2, result.output
    assert f"cannot listen on 127.0.0.1:{port}" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.slow
def test_a_worker_with_no_proxy_to_reach_fails_with_one_line(workdir):
    study_file = tiny_study(workdir, n_trials=1)
    result = CliRunner().invoke(app, ["worker", "--study", str(study_file), "--storage",
                                      f"grpc://127.0.0.1:{_free_port()}"])
    assert result.exit_code == 2, result.output
    assert "no storage proxy answers at grpc://127.0.0.1:" in result.output


def start_proxy(url: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    """``search proxy`` as its own process, the database URL in its environment only."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "SEARCH_STORAGE": url}
    log = open(workdir / "worker-proxy.log", "w")  # worker-*: logs() shows it on failure
    try:
        process = subprocess.Popen([sys.executable, "-m", "search", "proxy", "--port", str(port)],
                                   cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env)
    finally:
        log.close()
    proxy_url = f"grpc://127.0.0.1:{port}"
    client = ProxyStorage(proxy_url)
    try:
        client.wait_server_ready(timeout=60)
    finally:
        client.close()
    return process, proxy_url


def stop_proxy(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def load(url: str) -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=get_storage(url))


@pytest.mark.db
@pytest.mark.slow
def test_a_killed_worker_behind_the_proxy_is_failed_and_its_trial_resumed(workdir, postgres_db):
    interval, grace = 1, 4
    study_file = tiny_study(workdir, n_trials=1, epochs=6, heartbeat=(interval, grace))
    study_file.write_text(study_file.read_text().replace("patience = 5", "patience = 10"))
    proxy, proxy_url = start_proxy(postgres_db.url, workdir)
    workers = [start_worker(study_file, proxy_url, n_trials=1, index=i, workdir=workdir)
               for i in range(2)]
    try:
        victim = wait_for_trial(postgres_db.url, lambda t: t.state == TrialState.RUNNING
                          and "worker_pid" in t.user_attrs and len(t.intermediate_values) >= 2)
        os.kill(victim.user_attrs["worker_pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for_trial(postgres_db.url, lambda t: t.number == victim.number
                 and t.state == TrialState.FAIL, timeout_s=60)
        failed_after = time.monotonic() - killed_at
        codes = wait_all(workers, timeout_s=180)
    finally:
        stop_all(workers)
        stop_proxy(proxy)
    assert sorted(codes) == [-signal.SIGKILL, 0], logs(workdir)
    # Stale once the last relayed beat is `grace` old; failed at the proxy's next round.
    assert failed_after <= grace + TEND_S + 4, failed_after
    trials = load(postgres_db.url).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    retry = trials[-1]
    assert retry.system_attrs["failed_trial"] == victim.number
    assert retry.user_attrs["worker_pid"] != victim.user_attrs["worker_pid"]
    # Resumed from the dead worker's last epoch: fewer epochs trained than reported.
    assert retry.user_attrs["epochs_run"] < len(retry.intermediate_values)


@pytest.mark.db
@pytest.mark.slow
def test_a_preempted_worker_behind_the_proxy_queues_its_copy_and_exits_75(workdir, postgres_db):
    study_file = tiny_study(workdir, n_trials=1, epochs=4)
    study_file.write_text(study_file.read_text().replace("patience = 5", "patience = 10"))
    proxy, proxy_url = start_proxy(postgres_db.url, workdir)
    first = start_worker(study_file, proxy_url, n_trials=1, index=0, workdir=workdir)
    try:
        victim = wait_for_trial(postgres_db.url, lambda t: t.state == TrialState.RUNNING
                          and len(t.intermediate_values) >= 2)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 75, logs(workdir)  # "restart me"
        # The copy came through the proxy (the client's own retry callback), not the reaper.
        killed, copy = load(postgres_db.url).get_trials()
        assert killed.number == victim.number and killed.state == TrialState.FAIL
        assert killed.user_attrs["interrupted"] == "preempted (SIGTERM)"
        assert copy.system_attrs["failed_trial"] == victim.number
        second = start_worker(study_file, proxy_url, n_trials=1, index=1, workdir=workdir)
        assert wait_all([second], timeout_s=300) == [0], logs(workdir)
    finally:
        stop_all([first])
        stop_proxy(proxy)
    killed, copy = load(postgres_db.url).get_trials()
    assert copy.state == TrialState.COMPLETE
    assert copy.user_attrs["resumed_after"] == "preempted (SIGTERM)"
    assert copy.user_attrs["epochs_run"] < len(copy.intermediate_values) == 4


@pytest.mark.db
@pytest.mark.slow
def test_search_run_through_the_proxy_finishes_exactly_the_budget(workdir, postgres_db):
    study_file = tiny_study(workdir, n_trials=3)
    proxy, proxy_url = start_proxy(postgres_db.url, workdir)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]),
           "SEARCH_STORAGE": proxy_url}
    try:
        done = subprocess.run([sys.executable, "-m", "search", "run", "--study", str(study_file),
                               "--workers", "2"], cwd=workdir, env=env, capture_output=True,
                              text=True, timeout=400)
        status = CliRunner().invoke(app, ["status", "--study", str(study_file),
                                          "--storage", proxy_url])
    finally:
        stop_proxy(proxy)
    assert done.returncode == 0, done.stdout + done.stderr + logs(workdir)
    assert status.exit_code == 0 and "3/3 done" in status.output, status.output
    trials = load(postgres_db.url).get_trials()
    assert all(t.state in FINAL for t in trials), [t.state for t in trials]
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 3, [t.state for t in trials]
    # The start point (the centre of the space) ran first, queued by the proxy before the
    # budget; the budget's own trials are queued with no fixed parameters.
    assert trials[0].system_attrs["fixed_params"]
    assert not any(t.system_attrs["fixed_params"] for t in trials[1:])
    assert proxy.returncode in (0, 130), logs(workdir)
