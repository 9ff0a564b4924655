"""Bad input, by property: random mutations of valid study files, CSVs and model.json files.

Whatever hypothesis makes of them, `search run --dry-run`, `search data check` and
`search predict` end with exit 0 or 2, and an exit 2 is one `error:` line, never a traceback.
Each test checks that hypothesis ran all the cases it asked for: 1,000 + 700 + 400 = 2,100
(weighted by cost: a dry run of a broken file is cheapest, a prediction dearest).
"""

from __future__ import annotations

import copy
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from search.cli import app
from tests.search.conftest import make_dataset, write_study
from tests.search.test_export import build_exported_study
from tests.search.test_init import make_csv_dataset

pytestmark = pytest.mark.slow
runner = CliRunner()
CASES: Counter[str] = Counter()
SETTINGS = {"deadline": None, "derandomize": True, "database": None,
            "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}

NASTY = ["", '""', '"x"', "-1", "0", "1e999", "nan", "inf", "[", "{", "}", "[1, \"a\"]",
         "true", '"../../../etc/passwd"', '"\u00e9\u00e8"', "{ low = 1, high = 0 }",
         '["b9"]', '"postgresql://u:secret@nowhere:1/x"', "3.5", '"rgb"']


def _mutations() -> st.SearchStrategy:
    line_op = st.tuples(st.sampled_from(["delete", "duplicate", "value"]),
                        st.integers(0, 200), st.sampled_from(NASTY))
    text_op = st.tuples(st.sampled_from(["truncate", "insert"]), st.integers(0, 5000),
                        st.text(max_size=12))
    return st.lists(st.one_of(line_op, text_op, st.just(("bom", 0, ""))), min_size=1,
                    max_size=3)


def mutate(text: str, operations: list[tuple]) -> str:
    for kind, where, value in operations:
        lines = text.splitlines()
        if kind == "bom":
            text = "\ufeff" + text
        elif kind == "truncate":
            text = text[: where % (len(text) + 1)]
        elif kind == "insert":
            at = where % (len(text) + 1)
            text = text[:at] + value + text[at:]
        elif lines:
            i = where % len(lines)
            if kind == "delete":
                del lines[i]
            elif kind == "duplicate":
                lines.insert(i, lines[i])
            elif "=" in lines[i]:
                lines[i] = lines[i].split("=", 1)[0] + "= " + value
            elif "," in lines[i]:  # a CSV row: replace one cell
                cells = lines[i].split(",")
                cells[where % len(cells)] = value
                lines[i] = ",".join(cells)
            text = "\n".join(lines) + "\n"
    return text


def assert_clean(result, what: str) -> None:
    """Exit 0 or 2; an error is one line; never a traceback."""
    output = result.output
    assert "Traceback" not in output, f"{what}:\n{output}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{what}: {type(result.exception).__name__}: {result.exception}")
    assert result.exit_code in (0, 2), f"{what}: exit {result.exit_code}\n{output}"
    if result.exit_code == 2:
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, f"{what}: not one error line:\n{output}"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prop-study")
    make_dataset(root / "data", counts={"red": 6, "green": 5, "yellow": 5})
    write_study(root, root / "data", n_trials=1, epochs=1, fusion='["none"]')
    return root


@pytest.fixture(scope="module")
def csv_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prop-csv")
    make_csv_dataset(root / "data")
    (root / "csv.toml").write_text(
        f'[study]\nname = "csv"\n\n[data]\nroot = "{root / "data"}"\nformat = "csv"\n'
        'modalities = ["rgb", "numeric"]\nval_fraction = 0.25\ntest_fraction = 0.25\n\n'
        '[train]\nresolution = 32\npretrained = "none"\n')
    return root


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return build_exported_study(tmp_path_factory).bundle


def test_mutated_study_files_dry_run_cleanly(folders, monkeypatch):
    monkeypatch.chdir(folders)
    monkeypatch.setenv("SEARCH_OFFLINE", "1")
    monkeypatch.delenv("SEARCH_STORAGE", raising=False)
    original = (folders / "tiny.toml").read_text()

    @settings(max_examples=1000, **SETTINGS)
    @given(_mutations())
    def case(operations):
        (folders / "bad.toml").write_text(mutate(original, operations))
        assert_clean(runner.invoke(app, ["run", "--study", "bad.toml", "--dry-run"]),
                     f"study mutated by {operations}")
        CASES["study file"] += 1

    case()
    assert CASES["study file"] >= 1000, CASES  # hypothesis ran every case it was asked for
    assert not (folders / "runs" / "tiny").exists()  # a dry run stores nothing


def test_mutated_csv_files_check_cleanly(csv_set, monkeypatch):
    monkeypatch.chdir(csv_set)
    good = (csv_set / "data" / "train.csv").read_text()

    @settings(max_examples=700, **SETTINGS)
    @given(_mutations())
    def case(operations):
        (csv_set / "data" / "train.csv").write_text(mutate(good, operations), encoding="utf-8")
        assert_clean(runner.invoke(app, ["data", "check", "--study", "csv.toml"]),
                     f"csv mutated by {operations}")
        CASES["csv"] += 1

    try:
        case()
    finally:
        (csv_set / "data" / "train.csv").write_text(good)
        shutil.rmtree(csv_set / "runs", ignore_errors=True)
    assert CASES["csv"] >= 700, CASES


def _paths(value, prefix=()):
    """Every key path in a JSON document."""
    if isinstance(value, dict):
        for key, child in value.items():
            yield (*prefix, key)
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield (*prefix, i)
            yield from _paths(child, (*prefix, i))


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6),
                        st.floats(allow_nan=True), st.text(max_size=8),
                        st.just([]), st.just({}), st.just([1, 2]), st.just({"x": 1}))


def test_mutated_model_json_predicts_cleanly(bundle, tmp_path):
    meta = json.loads((bundle / "model.json").read_text())
    paths = list(_paths(meta))
    copy_dir = tmp_path / "bundle"
    shutil.copytree(bundle, copy_dir)
    image = next((bundle.parent / "data" / "test" / "rgb").glob("*/*.png"))
    depth = image.parents[2] / "depth" / image.parent.name / image.name

    @settings(max_examples=400, **SETTINGS)
    @given(st.lists(st.tuples(st.sampled_from(paths), st.sampled_from(["delete", "set"]),
                              JSON_VALUES), min_size=1, max_size=3))
    def case(edits):
        doc = copy.deepcopy(meta)
        for path, kind, value in edits:
            parent = doc
            try:
                for key in path[:-1]:
                    parent = parent[key]
                if kind == "delete" and isinstance(parent, dict):
                    parent.pop(path[-1], None)
                elif isinstance(parent, dict) or (isinstance(parent, list)
                                                  and path[-1] < len(parent)):
                    parent[path[-1]] = copy.deepcopy(value)  # st.just gives one object
            except (KeyError, IndexError, TypeError):
                pass  # an earlier edit removed or replaced this path
        (copy_dir / "model.json").write_text(json.dumps(doc))
        assert_clean(runner.invoke(app, ["predict", str(copy_dir), str(image),
                                         "--depth", str(depth)]), f"model.json edits {edits}")
        CASES["model.json"] += 1

    case()
    assert CASES["model.json"] >= 400, CASES
    print(f"property cases so far: {dict(CASES)}")
