"""Fresh databases for the storage tests: one per test, created before it and dropped after.

The ``storage_url`` fixture runs a test against every backend (SQLite, PostgreSQL, MariaDB),
like Optuna's own storage contract tests; ``server_url`` only against the two servers.
The servers are the real ones on this machine; point the tests elsewhere with
``FS_TEST_POSTGRES_URL`` and ``FS_TEST_MYSQL_URL`` (administrator URLs).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy.engine import make_url

from search.study.storage import normalize_url
from tests.search.conftest import make_dataset, write_study

ADMIN_URLS = {
    "postgresql": os.environ.get("FS_TEST_POSTGRES_URL",
                                 "postgresql://postgres@127.0.0.1:5432/postgres"),
    "mariadb": os.environ.get("FS_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/mysql"),
}


class ServerDatabase:
    """One throw-away database on a server, named ``fs_test_<random>``."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.admin_url = normalize_url(ADMIN_URLS[backend])
        self.name = f"fs_test_{secrets.token_hex(6)}"
        self._admin = sqlalchemy.create_engine(self.admin_url, isolation_level="AUTOCOMMIT",
                                               pool_pre_ping=True)

    @property
    def url(self) -> str:
        return make_url(self.admin_url).set(database=self.name).render_as_string(
            hide_password=False)

    def execute(self, sql: str, **params: object) -> list:
        with self._admin.connect() as connection:
            result = connection.execute(sqlalchemy.text(sql), params)
            return list(result) if result.returns_rows else []

    def create(self) -> None:
        try:
            self.execute(f"CREATE DATABASE {self.name}")
        except sqlalchemy.exc.OperationalError as error:
            pytest.fail(f"{self.backend} at {self.admin_url} is not reachable ({error.orig}); "
                        "start it (see .ci/run) or deselect these tests with -m 'not db'")

    def drop(self) -> None:
        if self.backend == "postgresql":
            # FORCE ends sessions a killed worker may have left behind.
            self.execute(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")
        else:
            for (session_id,) in self.execute(
                    "SELECT id FROM information_schema.processlist WHERE db = :db", db=self.name):
                self.execute(f"KILL {int(session_id)}")
            self.execute(f"DROP DATABASE IF EXISTS {self.name}")
        self._admin.dispose()


SERVERS = [pytest.param("postgresql", marks=pytest.mark.db, id="postgresql"),
           pytest.param("mariadb", marks=pytest.mark.db, id="mariadb")]


@pytest.fixture(params=[pytest.param("sqlite", id="sqlite"), *SERVERS])
def storage_url(request, tmp_path) -> Iterator[str]:
    """A URL to an empty database, for each backend in turn."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'study.db'}"
        return
    database = ServerDatabase(request.param)
    database.create()
    try:
        yield database.url
    finally:
        database.drop()


@pytest.fixture(params=SERVERS)
def server_url(request) -> Iterator[str]:
    """A URL to an empty database on PostgreSQL, then on MariaDB."""
    database = ServerDatabase(request.param)
    database.create()
    try:
        yield database.url
    finally:
        database.drop()


@pytest.fixture
def postgres_db() -> Iterator[ServerDatabase]:
    """A fresh PostgreSQL database (for tests that restart or inspect the server)."""
    database = ServerDatabase("postgresql")
    database.create()
    try:
        yield database
    finally:
        database.drop()


@pytest.fixture
def mariadb_db() -> Iterator[ServerDatabase]:
    """A fresh MariaDB database."""
    database = ServerDatabase("mariadb")
    database.create()
    try:
        yield database
    finally:
        database.drop()


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run in a fresh folder so runs/ and caches stay inside the test's tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SEARCH_STORAGE", raising=False)
    return tmp_path


def tiny_study(workdir: Path, *, n_trials: int, epochs: int = 1, name: str = "tiny",
               heartbeat: tuple[int, int] | None = None) -> Path:
    """The smallest real study: rgb only, 16 px, b0, no fusion, one thread per worker."""
    data = workdir / "data"
    if not data.exists():
        make_dataset(data, counts={"red": 8, "green": 6, "yellow": 6}, modalities=("rgb",))
    path = write_study(workdir, data, name=name, n_trials=n_trials, epochs=epochs,
                       modalities='["rgb"]', fusion='["none"]')
    text = path.read_text().replace("resolution = 32", "resolution = 16")
    if heartbeat is not None:
        interval, grace = heartbeat
        text = text.replace("seed = 0\n", f"seed = 0\nheartbeat_interval_s = {interval}\n"
                            f"heartbeat_grace_s = {grace}\n", 1)
    path.write_text(text)
    return path


def start_worker(study_file: Path, storage_url: str, *, n_trials: int, index: int,
                 workdir: Path) -> subprocess.Popen:
    """``search worker`` as its own process, logging to ``worker-<index>.log``."""
    log = open(workdir / f"worker-{index}.log", "w")
    command = [sys.executable, "-m", "search", "worker", "--study", str(study_file),
               "--storage", storage_url, "--n-trials", str(n_trials),
               "--worker-index", str(index), "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    env.pop("SEARCH_STORAGE", None)
    try:
        return subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                                env=env)
    finally:
        log.close()


@contextlib.contextmanager
def reaped(process: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """``process``, killed and waited for on the way out if it still runs (a failed step)."""
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def wait_all(processes: list[subprocess.Popen], timeout_s: float) -> list[int]:
    """Wait for every process; kill the rest and fail if they outlive ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    try:
        return [p.wait(timeout=max(0.1, deadline - time.monotonic())) for p in processes]
    except subprocess.TimeoutExpired:
        stop_all(processes)
        pytest.fail(f"workers still running after {timeout_s:.0f} s")


def stop_all(processes: list[subprocess.Popen]) -> None:
    """Kill whatever is still running (test clean-up)."""
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def logs(workdir: Path) -> str:
    """Every worker log of the test, for failure messages."""
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}"
                     for p in sorted(workdir.glob("worker-*.log")))


class OwnPostgres:
    """A PostgreSQL server of the test's own, which it may stop, restart or take away.

    ``initdb`` into a fresh folder, listening on a free port of 127.0.0.1 only, with
    password (scram) authentication over TCP: the shared server on 5432 is never touched.
    As root, the server runs as the ``postgres`` user (PostgreSQL refuses to run as root).
    """

    def __init__(self) -> None:
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not bins:
            pytest.skip("no PostgreSQL server binaries (/usr/lib/postgresql/*/bin) here")
        self.bin = bins[-1].parent
        self.password = "pw-" + secrets.token_hex(8)
        self.root = Path(tempfile.mkdtemp(prefix="fs-own-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, "postgres")
        (self.root / "pw").write_text(self.password)
        if self._as_postgres:
            shutil.chown(self.root / "pw", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--no-sync",
                  "--auth-local=trust", "--auth-host=scram-sha-256",
                  f"--pwfile={self.root / 'pw'}")

    @property
    def url(self) -> str:
        """The superuser's URL to database ``postgres``, password included."""
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c full_page_writes=off")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l",
                  str(self.root / "log"), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast`` ends sessions and shuts down cleanly; ``immediate`` is a crash."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        done = subprocess.run([str(self.bin / "pg_ctl"), "-D", str(self.data), "status"],
                              capture_output=True, user="postgres" if self._as_postgres else None)
        return done.returncode == 0

    def remove(self) -> None:
        if self.running():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, program: str, *args: str) -> None:
        done = subprocess.run([str(self.bin / program), *args], capture_output=True, text=True,
                              timeout=120, user="postgres" if self._as_postgres else None)
        if done.returncode != 0:
            log = self.root / "log"
            pytest.fail(f"{program} failed: {done.stderr or done.stdout}"
                        + (log.read_text() if log.exists() else ""))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    """A running PostgreSQL server of this test's own (see :class:`OwnPostgres`)."""
    server = OwnPostgres()
    try:
        server.start()
        yield server
    finally:
        server.remove()
