"""`search dashboard`: optuna-dashboard serves a study made by `search run`, with its artifacts.

The server runs as `search dashboard` in a subprocess on a free port; the test reads
optuna-dashboard's own JSON API (/api/studies, /api/studies/<id>) and one artifact.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.error import URLError

import pytest
from PIL import Image
from typer.testing import CliRunner

from search.cli import app
from search.trial.artifacts import CHECKPOINT, CONFUSION, LEARNING_CURVE, METRICS
from tests.debian import ensure_packages
from tests.search.conftest import write_study
from tests.search.test_export import STUDY_FILE, build_exported_study

pytestmark = pytest.mark.slow
runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return build_exported_study(tmp_path_factory)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read()


def wait_for(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"dashboard exited with {process.returncode}: {log.read_text()}")
        try:
            get(url)
            return
        except (URLError, ConnectionError, TimeoutError):
            time.sleep(0.3)
    pytest.fail(f"dashboard did not answer within {START_TIMEOUT_S}s: {log.read_text()}")


@pytest.fixture(scope="module")
def dashboard(exported, tmp_path_factory):
    """`search dashboard` on the shared study; yields its base URL and its output file."""
    port = free_port()
    log = tmp_path_factory.mktemp("dashboard") / "out.log"
    env = {k: v for k, v in os.environ.items() if k != "SEARCH_STORAGE"}
    env["PYTHONPATH"] = str(REPO)
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "search", "dashboard", "--study", STUDY_FILE,
             "--host", "127.0.0.1", "--port", str(port)],
            cwd=exported.root, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/api/meta", process, log)
        yield base, log
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_dashboard_lists_the_study_its_trials_and_their_artifacts(dashboard):
    base, log = dashboard
    _, body = get(f"{base}/api/meta")
    assert json.loads(body)["artifact_is_available"] is True
    _, body = get(f"{base}/api/studies")
    summaries = {s["study_name"]: s for s in json.loads(body)["study_summaries"]}
    study_id = summaries["tiny"]["study_id"]
    assert f"open {base}/dashboard/studies/{study_id}" in log.read_text()

    _, body = get(f"{base}/api/studies/{study_id}")
    detail = json.loads(body)
    assert detail["objective_names"] == ["val macro F1"]  # set_metric_names, as served
    trials = detail["trials"]
    assert [t["state"] for t in trials] == ["Complete"]
    note = trials[0]["note"]["body"]
    assert f"**val macro F1 {trials[0]['values'][0]:.4f}**" in note
    assert all(f"| {name} |" in note for name in ("green", "red", "yellow"))
    artifacts = {a["filename"]: a for a in trials[0]["artifacts"]}
    assert set(artifacts) == {CHECKPOINT, CONFUSION, LEARNING_CURVE, METRICS}
    png = artifacts[CONFUSION]
    status, image = get(f"{base}/artifacts/{study_id}/{trials[0]['trial_id']}/"
                        f"{png['artifact_id']}")
    assert status == 200 and image.startswith(b"\x89PNG")
    curve = artifacts[LEARNING_CURVE]
    status, image = get(f"{base}/artifacts/{study_id}/{trials[0]['trial_id']}/"
                        f"{curve['artifact_id']}")
    assert status == 200 and image.startswith(b"\x89PNG")


def one_line_error(*args: str) -> str:
    result = runner.invoke(app, ["dashboard", *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_a_missing_sqlite_file_is_an_error_and_is_not_created(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SEARCH_STORAGE", raising=False)
    study = write_study(tmp_path, tmp_path, name="ghost")
    line = one_line_error("--study", str(study))
    assert line == ("error: no SQLite database at runs/ghost/study.db: run `search run "
                    f"--study {study}` first, or pass --storage")
    assert not (tmp_path / "runs").exists()
    assert "in-memory SQLite" in one_line_error("--study", str(study), "--storage", "sqlite://")


def test_an_unreachable_server_or_an_unknown_study_is_an_error(exported, monkeypatch):
    monkeypatch.chdir(exported.root)
    line = one_line_error("--study", STUDY_FILE, "--storage",
                          "postgresql://nobody:secret@127.0.0.1:1/nothing")
    assert line.startswith("error: cannot reach storage postgresql")
    assert "secret" not in line
    other = write_study(exported.root / "runs", Path("data"), name="other")
    try:
        line = one_line_error("--study", str(other), "--storage", "sqlite:///runs/tiny/study.db")
    finally:
        other.unlink()
    assert "study 'other' not found in the storage" in line


def test_a_busy_port_is_an_error(exported, monkeypatch):
    monkeypatch.chdir(exported.root)
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        line = one_line_error("--study", STUDY_FILE, "--host", "127.0.0.1", "--port", str(port))
    assert line.startswith(f"error: cannot listen on 127.0.0.1:{port}: ")


CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def chromium() -> Path:
    ensure_packages([str(CHROMIUM)], ["chromium"], recommends=False)
    return CHROMIUM


def headless_chromium(url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000", *args, url],
        capture_output=True, text=True, timeout=120)


def test_a_browser_shows_the_trial_and_its_confusion_matrix(chromium, dashboard, tmp_path):
    base, _ = dashboard
    _, body = get(f"{base}/api/studies")
    study_id = json.loads(body)["study_summaries"][0]["study_id"]
    url = f"{base}/dashboard/studies/{study_id}/trials?numbers=0"
    page = headless_chromium(url, tmp_path, "--dump-dom").stdout
    for text in (f"tiny (id={study_id})", "Trial 0", "Artifacts", CONFUSION, CHECKPOINT):
        assert text in page
    shot = tmp_path / "trial.png"
    headless_chromium(url, tmp_path, "--window-size=1280,900", f"--screenshot={shot}")
    with Image.open(shot) as image:
        assert image.size == (1280, 900)
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or ()) > 50  # not blank
