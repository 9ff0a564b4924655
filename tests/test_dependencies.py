"""pyproject.toml's dependency bounds against what the code relies on."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).parents[1]
# Optuna's private names: `_storage`, `_backend`, `optuna.storages._rdb`, `RDBStorage._...`.
PRIVATE_OPTUNA = re.compile(r"\._storage\b|\._backend\b|optuna(\.\w+)*\._\w+|RDBStorage\._\w+")


def test_optuna_is_pinned_below_its_next_major_while_private_apis_are_used():
    users = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "search").rglob("*.py")
                   if PRIVATE_OPTUNA.search(path.read_text()))
    if not users:
        return  # nothing private: any future Optuna may do
    requirements = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    [optuna] = [Requirement(r) for r in requirements if Requirement(r).name == "optuna"]
    installed = Version(version("optuna"))
    next_major = Version(f"{installed.major + 1}")
    assert installed in optuna.specifier, (optuna, installed)
    assert next_major not in optuna.specifier, (
        f"{', '.join(users)} use Optuna's private API; pin optuna below {next_major} "
        f"in pyproject.toml (now {optuna})")
    assert Version(f"{installed.major}.999") in optuna.specifier  # minor updates still allowed
