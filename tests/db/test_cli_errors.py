"""An unreachable database or a wrong password: one clear line and exit code 2, no traceback."""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from search.cli import app
from tests.db.conftest import ServerDatabase, tiny_study

runner = CliRunner()
UNREACHABLE = "postgresql://postgres:hunter2@127.0.0.1:1/nothing"


def invoke(*args: str):
    return runner.invoke(app, list(args))


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("command", ["run", "worker", "status"])
def test_unreachable_database_is_one_line_and_exit_2(workdir, command):
    study_file = tiny_study(workdir, n_trials=1)
    result = invoke(command, "--study", str(study_file), "--storage", UNREACHABLE)
    assert_one_line_error(result, "cannot reach storage", "127.0.0.1:1")
    assert "hunter2" not in result.output  # the password never reaches the terminal


def test_search_worker_process_prints_no_traceback(workdir, monkeypatch):
    study_file = tiny_study(workdir, n_trials=1)
    monkeypatch.setenv("SEARCH_STORAGE", UNREACHABLE)  # how compose hands workers the URL
    done = subprocess.run([sys.executable, "-m", "search", "worker", "--study", str(study_file)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: cannot reach storage "
                           "postgresql://postgres:***@127.0.0.1:1/nothing: ")
    assert "refused" in line
    assert "Traceback" not in done.stderr + done.stdout


@pytest.fixture
def mariadb_user(mariadb_db: ServerDatabase) -> Iterator[tuple[ServerDatabase, str]]:
    """A MariaDB user with a password, allowed on the test database; dropped afterwards."""
    user = f"fs_user_{secrets.token_hex(4)}"
    mariadb_db.execute(f"CREATE USER '{user}'@'%' IDENTIFIED BY 'right-password'")
    mariadb_db.execute(f"GRANT ALL ON {mariadb_db.name}.* TO '{user}'@'%'")
    try:
        yield mariadb_db, user
    finally:
        mariadb_db.execute(f"DROP USER IF EXISTS '{user}'@'%'")


@pytest.mark.db
@pytest.mark.parametrize("command", ["run", "worker", "status"])
def test_wrong_password_is_one_line_and_exit_2(workdir, mariadb_user, command):
    database, user = mariadb_user
    url = f"mysql://{user}:wrong-password@127.0.0.1:3306/{database.name}"
    result = invoke(command, "--study", str(tiny_study(workdir, n_trials=1)), "--storage", url)
    assert_one_line_error(result, "cannot reach storage", "Access denied", user)
    assert "wrong-password" not in result.output
    right = invoke("status", "--study", str(tiny_study(workdir, n_trials=1)), "--storage",
                   url.replace("wrong-password", "right-password"))
    assert "not found in the storage" in right.stderr  # the right password gets through


@pytest.mark.db
def test_wrong_password_on_postgresql_is_one_line_without_the_password(workdir, own_postgres):
    # The test's own server checks passwords (scram); the shared one trusts 127.0.0.1.
    url = own_postgres.url.replace(own_postgres.password, "wrong-password")
    result = invoke("status", "--study", str(tiny_study(workdir, n_trials=1)), "--storage", url)
    assert_one_line_error(result, "cannot reach storage", "password authentication failed",
                          "postgres:***@")
    assert "wrong-password" not in result.output
