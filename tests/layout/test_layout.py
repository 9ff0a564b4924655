"""The package layout's promises (DESIGN.md, "Target layout"), checked on the import graph."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Modules behind a user command; none may import another (they share lower layers instead).
COMMANDS = ("search.study.runner", "search.study.worker", "search.study.status",
            "search.study.dashboard", "search.bundle.export", "search.bundle.predict",
            "search.data.check", "search.launch.slurm", "search.launch.k8s")


def imported_modules(python: str) -> list[str]:
    """Modules in sys.modules after running ``python`` in a fresh interpreter."""
    code = f"{python}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def test_the_study_file_schema_imports_no_optuna_sqlalchemy_or_torch():
    loaded = imported_modules("import search.config, search.space")
    heavy = [m for m in loaded if m.split(".")[0] in ("optuna", "sqlalchemy", "torch")]
    assert heavy == []


def _imports(module: str) -> set[str]:
    path = ROOT / (module.replace(".", "/") + ".py")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_no_command_module_imports_another():
    for module in COMMANDS:
        others = _imports(module) & (set(COMMANDS) - {module})
        assert not others, f"{module} imports {sorted(others)}"


def test_models_and_augment_import_nothing_of_search():
    for package in ("models", "augment"):
        for path in (ROOT / package).rglob("*.py"):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            assert not any(m == "search" or m.startswith("search.") for m in _imports(module)), path
def test_the_cluster_placement_table_imports_no_optuna_sqlalchemy_or_torch():
    # Workers write it and `search status` reads it: a leaf both may import.
    loaded = imported_modules("import search.launch.placement")
    heavy = [m for m in loaded if m.split(".")[0] in ("optuna", "sqlalchemy", "torch")]
    assert heavy == []


def test_decoding_imports_no_torch_optuna_or_models():
    loaded = imported_modules("import search.data.decode")
    heavy = [m for m in loaded if m.split(".")[0] in ("optuna", "sqlalchemy", "torch", "models")]
    assert heavy == []


