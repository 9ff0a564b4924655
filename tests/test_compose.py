"""docker-compose.yml and the Dockerfile, checked statically (no Docker engine needed).

Compose's own interpolation (``${VAR:-default}``, ``$$``) is applied here the way compose
applies it, and every command the services run is parsed by the real ``search`` CLI.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml
from sqlalchemy.engine import make_url
from typer.main import get_command

from search.cli import app

ROOT = Path(__file__).parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's variable substitution: ``${VAR:-default}``, ``${VAR}``, and ``$$`` -> ``$``."""
    env = env or {}

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1)) or (match.group(3) or "")

    return re.sub(r"\$\$|\$\{(\w+)(:-([^}]*))?\}", substitute, value)


def command_words(service: dict) -> list[str]:
    """The argv the service's container runs, after compose and (for ``sh -c``) the shell."""
    command = service["command"]
    if isinstance(command, str):
        command = shlex.split(command)
    command = [interpolate(word) for word in command]
    if command[:2] != ["sh", "-c"]:
        return command
    script = command[2].strip()
    assert script.startswith("exec "), "sh -c should exec the command (signals reach it)"
    echo = "exec printf '%s\\n' " + script.removeprefix("exec ")
    done = subprocess.run(["sh", "-c", echo], capture_output=True, text=True, check=True)
    return done.stdout.splitlines()


def parse_cli(words: list[str]):
    """Parse ``search ...`` with the real CLI, without running the command."""
    assert words[0] == "search"
    assert PYPROJECT["project"]["scripts"]["search"] == "search.cli:main"
    group = get_command(app)
    name, *args = words[1:]
    command = group.commands.get(name)
    assert command is not None, f"`search {name}` is not a command"
    return command.make_context(name, args)


def test_services_and_volumes():
    assert {"postgres", "worker", "dashboard"} <= set(SERVICES)
    postgres = SERVICES["postgres"]
    mounts = {m.split(":")[0]: m.split(":")[1] for m in postgres["volumes"]}
    assert mounts.get("pgdata") == "/var/lib/postgresql/data"
    assert set(COMPOSE["volumes"]) >= {"pgdata", "runs"}
    # Dashboard and workers see the same artifact store.
    for name in ("worker", "dashboard"):
        assert "runs:/app/runs" in SERVICES[name]["volumes"]


def test_postgres_has_a_health_check_that_workers_wait_for():
    check = SERVICES["postgres"]["healthcheck"]
    assert "pg_isready" in " ".join(check["test"])
    for name in ("worker", "dashboard"):
        assert SERVICES[name]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_each_worker_reserves_one_gpu_and_can_scale():
    worker = SERVICES["worker"]
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1
    assert device["capabilities"] == ["gpu"]
    # `--scale worker=N` needs no fixed container name and no fixed host port.
    assert "container_name" not in worker and "ports" not in worker


def test_worker_runs_search_worker_on_the_study_from_the_environment():
    words = command_words(SERVICES["worker"])
    assert words[:2] == ["search", "worker"]
    context = parse_cli(words)
    assert context.params["study"] == "apples"
    assert 0 <= context.params["worker_index"] < 1_000_000  # seeds stay below 2**32
    assert context.params["wait_for_storage"] == 60  # started with the database: wait for it


def test_dashboard_is_published_on_the_hosts_loopback_only():
    words = command_words(SERVICES["dashboard"])
    assert words[:2] == ["search", "dashboard"]
    context = parse_cli(words)
    # Inside its container it listens on every interface, so Docker can forward to it...
    assert context.params["host"] == "0.0.0.0"
    # ...but the host publishes it on 127.0.0.1 alone: it has no login and can delete studies.
    for port in SERVICES["dashboard"]["ports"]:
        host_ip, host_port, container_port = interpolate(str(port)).split(":")
        assert host_ip == "127.0.0.1", f"dashboard published on {host_ip or 'all interfaces'}"
        assert (host_port, container_port) == ("8080", str(context.params["port"]))
    for name, service in SERVICES.items():  # nothing else is published to the network
        for port in service.get("ports", []):
            assert interpolate(str(port)).startswith("127.0.0.1:"), (name, port)


@pytest.mark.parametrize("name", ["worker", "dashboard"])
def test_search_storage_points_at_the_postgres_service(name):
    url = make_url(interpolate(SERVICES[name]["environment"]["SEARCH_STORAGE"]))
    postgres = {k: interpolate(v) for k, v in SERVICES["postgres"]["environment"].items()}
    assert url.get_backend_name() == "postgresql" and url.host == "postgres"
    assert (url.username, url.password, url.database) == (
        postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"], postgres["POSTGRES_DB"])
    # The variable overrides the default, as the CLI reads it.
    override = interpolate(SERVICES[name]["environment"]["SEARCH_STORAGE"],
                           {"SEARCH_STORAGE": "postgresql://db.example/x"})
    assert override == "postgresql://db.example/x"


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def test_dockerfile_copies_files_that_exist_and_are_not_ignored():
    ignored = [p.strip().rstrip("/") for p in (ROOT / ".dockerignore").read_text().splitlines()
               if p.strip() and not p.startswith("#")]
    copies = [args.split()[:-1] for op, args in dockerfile_instructions() if op == "COPY"]
    assert copies
    for sources in copies:
        for source in sources:
            path = source.rstrip("/")
            assert (ROOT / path).exists(), f"Dockerfile copies {source}, which does not exist"
            assert not any(fnmatch(path, pattern) for pattern in ignored), (
                f"{source} is excluded by .dockerignore")


def test_dockerfile_installs_the_project_and_runs_search():
    instructions = dockerfile_instructions()
    base = next(args for op, args in instructions if op == "FROM")
    assert base.startswith("python:3.11")
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
    runs = " ".join(args for op, args in instructions if op == "RUN")
    assert "pip install ." in runs
    assert "torch==2.14.1" in PYPROJECT["project"]["dependencies"]
    packages = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = " ".join(args for op, args in instructions if op == "COPY")
    for package in packages:  # every package pip installs is in the image
        assert f"{package.rstrip('*')}/" in copied
    cmd = next(args for op, args in instructions if op == "CMD")
    words = yaml.safe_load(cmd)  # exec form is a JSON (so YAML) list
    assert words[0] == "search" and words[0] in PYPROJECT["project"]["scripts"]
    parse_cli([*words[:1], "worker", "--study", "apples"])  # the image's CLI has the commands
    assert (ROOT / "studies" / "apples.toml").is_file()  # the default SEARCH_STUDY
