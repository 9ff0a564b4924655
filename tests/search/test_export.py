"""`search export`: a real tiny study (rgb + depth, early fusion) -> bundle, and its errors.

The study and its bundle are built once per test session by :func:`build_exported_study`
(`search run`, then `search export`, in a folder of the session's tmp dir) and shared with
test_predict.py and test_dashboard.py: the ONNX export alone takes tens of seconds on a CPU.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.artifacts import get_all_artifact_meta
from optuna.trial import TrialState
from safetensors.torch import load_file
from typer.testing import CliRunner

import models
from search.bundle.export import OnnxCheck, check_out, move_into_place
from search.cli import app
from search.config import read_study_file
from search.data.decode import RGB_MEAN, RGB_STD
from search.data.prepared import prepare_data
from search.trial.artifacts import CHECKPOINT
from tests.search.conftest import make_dataset, write_study

pytestmark = pytest.mark.slow
runner = CliRunner()
STUDY_FILE = "tiny.toml"
STORAGE = "sqlite:///runs/tiny/study.db"


@dataclass(frozen=True)
class ExportedStudy:
    """A finished study (made by `search run`) and its exported bundle."""

    root: Path  # run from here: the study file's paths are relative to it
    bundle: Path
    export_output: str


def build_exported_study(tmp_path_factory: pytest.TempPathFactory) -> ExportedStudy:
    """Run and export the shared tiny study once per session (later calls reuse it)."""
    root = tmp_path_factory.getbasetemp() / "exported-study"
    done = root / "done.json"
    if not done.is_file():
        shutil.rmtree(root, ignore_errors=True)  # a build that failed half-way
        root.mkdir()
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(root)
            patch.delenv("SEARCH_STORAGE", raising=False)
            make_dataset(Path("data"))
            # An explicit test split, in the folders layout, for predict to read back.
            make_dataset(Path("held"), counts={"red": 4, "green": 4, "yellow": 3}, seed=1)
            os.rename("held/train", "data/test")
            write_study(Path("."), Path("data"), n_trials=1, epochs=1, fusion='["early"]')
            result = runner.invoke(app, ["run", "--study", STUDY_FILE])
            assert result.exit_code == 0, result.output
            result = runner.invoke(app, ["export", "--study", STUDY_FILE, "--out", "bundle"])
            assert result.exit_code == 0, result.output
        done.write_text(json.dumps({"export_output": result.output}))
    output = json.loads(done.read_text())["export_output"]
    return ExportedStudy(root=root, bundle=root / "bundle", export_output=output)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> ExportedStudy:
    return build_exported_study(tmp_path_factory)


@pytest.fixture
def in_study(exported, monkeypatch) -> ExportedStudy:
    """Run the test from the shared study's folder (read-only use)."""
    monkeypatch.chdir(exported.root)
    monkeypatch.delenv("SEARCH_STORAGE", raising=False)
    return exported


@pytest.fixture
def study_copy(exported, tmp_path, monkeypatch) -> Path:
    """A private copy of the study's folder, for tests that damage it."""
    copy = tmp_path / "copy"
    shutil.copytree(exported.root, copy, ignore=shutil.ignore_patterns("bundle", "cache"))
    monkeypatch.chdir(copy)
    monkeypatch.delenv("SEARCH_STORAGE", raising=False)
    return copy


def export_error(*args: str) -> str:
    result = runner.invoke(app, ["export", "--study", STUDY_FILE, *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_bundle_holds_the_three_files_and_model_json_follows_the_contract(in_study):
    meta = json.loads((in_study.bundle / "model.json").read_text())
    assert {p.name for p in in_study.bundle.iterdir()} == {
        "model.onnx", "weights.safetensors", "model.json"}
    assert meta["labels"] == {"0": "green", "1": "red", "2": "yellow"}
    assert meta["inputs"] == [
        {"name": "rgb", "modality": "rgb", "shape": ["batch", 3, 32, 32], "dtype": "float32"},
        {"name": "depth", "modality": "depth", "shape": ["batch", 1, 32, 32],
         "dtype": "float32"}]
    prep = meta["preprocess"]
    assert prep["resolution"] == 32 and prep["channel_order"] == "RGB"
    assert prep["rgb"]["mean"] == list(RGB_MEAN) and prep["rgb"]["std"] == list(
        RGB_STD)
    assert prep["depth"]["mean"] == 0.5 and prep["depth"]["std"] == 0.25
    assert "numeric" not in prep and "text" not in prep  # the model takes neither
    arch = meta["architecture"]
    assert arch["backbone"] == "b0" and arch["fusion"] == "early" and arch["params"] > 1_000_000
    assert models.ModelSpec.from_dict(arch["spec"]).input_names == ("rgb", "depth")

    study = optuna.load_study(study_name="tiny", storage=STORAGE)
    best = study.best_trial
    metrics = meta["metrics"]
    assert meta["trial"]["number"] == best.number and meta["study"]["name"] == "tiny"
    assert metrics["val_macro_f1"] == best.value
    assert metrics["per_class_f1"]["val"] == best.user_attrs["per_class_f1"]
    assert set(metrics["per_class_f1"]["test"]) == {"green", "red", "yellow"}
    assert np.asarray(metrics["test_confusion"]).sum() == metrics["test_samples"] == 11
    assert 0.0 <= metrics["test_macro_f1"] <= 1.0 and 0.0 <= metrics["test_accuracy"] <= 1.0
    interval = metrics["test_macro_f1_interval"]
    assert interval["low"] <= metrics["test_macro_f1"] <= interval["high"]
    assert interval["level"] == 0.95 and interval["replicates"] == 2000
    assert metrics["val_test_gap"] == pytest.approx(best.value - metrics["test_macro_f1"])
    assert f"(95% interval {interval['low']:.3f}-{interval['high']:.3f})" in in_study.export_output
    assert "val - test gap" in in_study.export_output
    assert 0.0 <= meta["onnx_max_abs_diff"] <= meta["onnx_tolerance"]
    assert meta["onnx_tolerance"] == pytest.approx(1e-3 + 1e-4 * meta["onnx_max_abs_logit"])
    assert "max |logit diff|" in in_study.export_output
    assert not list(in_study.root.glob(".bundle.tmp-*"))  # the temporary folder is gone


@torch.no_grad()
def test_safetensors_weights_rebuild_the_network_and_reproduce_the_test_metrics(in_study):
    meta = json.loads((in_study.bundle / "model.json").read_text())
    model = models.create_model(meta["architecture"]["spec"])
    model.load_state_dict(load_file(in_study.bundle / "weights.safetensors"))
    model.eval()
    split = prepare_data(read_study_file(STUDY_FILE)).split("test")
    batch = split.batch(np.arange(len(split)), torch.device("cpu"), channels_last=False)
    predicted = model(batch).argmax(dim=1).numpy()
    accuracy = float((predicted == split.labels).mean())
    assert accuracy == pytest.approx(meta["metrics"]["test_accuracy"])


def test_export_without_a_completed_trial_is_a_clear_error(study_copy):
    write_study(study_copy, Path("data"), name="empty", n_trials=1, epochs=1)
    Path("runs/empty").mkdir(parents=True)
    study = optuna.create_study(study_name="empty", storage="sqlite:///runs/empty/study.db")
    study.tell(study.ask(), state=TrialState.FAIL)
    result = runner.invoke(app, ["export", "--study", "empty.toml", "--out", "out"])
    assert result.exit_code == 2
    assert result.output.strip() == (
        "error: study 'empty' has no completed trial yet (1 trial(s) in other states); "
        "nothing to export")
    assert not Path("out").exists()


def test_export_of_an_unknown_or_unfinished_trial_is_a_clear_error(study_copy):
    assert "has no trial 7 (trials 0..0)" in export_error("--out", "out", "--trial", "7")
    study = optuna.load_study(study_name="tiny", storage=STORAGE)
    study.tell(study.ask(), state=TrialState.FAIL)
    line = export_error("--out", "out", "--trial", "1")
    assert "trial 1 of study 'tiny' is FAIL, not COMPLETE; the best complete trial is 0" in line
    assert not Path("out").exists()


def test_export_with_the_checkpoint_artifact_deleted_is_a_clear_error(study_copy):
    study = optuna.load_study(study_name="tiny", storage=STORAGE)
    metas = get_all_artifact_meta(study.best_trial, storage=study._storage)
    checkpoint = next(m for m in metas if m.filename == CHECKPOINT)
    (study_copy / "runs" / "tiny" / "artifacts" / checkpoint.artifact_id).unlink()
    line = export_error("--out", "out")
    assert "checkpoint.pt artifact is missing from the artifact store" in line
    assert not Path("out").exists()


def test_export_from_a_missing_database_neither_creates_it_nor_goes_on(study_copy):
    line = export_error("--out", "out", "--storage", "sqlite:///runs/nowhere/study.db")
    assert "no SQLite database at runs/nowhere/study.db" in line
    assert not Path("runs/nowhere").exists()


def test_export_refuses_to_overwrite_a_folder_that_is_not_a_bundle(study_copy):
    Path("precious").mkdir()
    (Path("precious") / "notes.txt").write_text("keep me")
    assert "precious exists and is not an export bundle" in export_error("--out", "precious")
    assert (Path("precious") / "notes.txt").read_text() == "keep me"


def test_an_earlier_bundle_is_replaced_whole(tmp_path):
    out, built = tmp_path / "bundle", tmp_path / ".bundle.tmp-1"
    out.mkdir()
    (out / "model.json").write_text("{}")
    (out / "stale.txt").write_text("old")
    built.mkdir()
    (built / "model.json").write_text('{"new": true}')
    move_into_place(built, out)
    assert [p.name for p in out.iterdir()] == ["model.json"]
    assert json.loads((out / "model.json").read_text()) == {"new": True}
    assert not built.exists() and not list(tmp_path.glob(".bundle.old-*"))
    check_out(tmp_path / "new")  # a new folder is fine


def test_the_onnx_tolerance_scales_with_the_logits_and_rejects_nan():
    assert OnnxCheck(max_abs_diff=9e-4, max_abs_logit=0.5).agrees
    assert not OnnxCheck(max_abs_diff=2e-3, max_abs_logit=0.5).agrees
    assert OnnxCheck(max_abs_diff=0.02, max_abs_logit=300.0).agrees  # float32 at that size
    assert not OnnxCheck(max_abs_diff=0.04, max_abs_logit=300.0).agrees
    assert not OnnxCheck(max_abs_diff=float("nan"), max_abs_logit=1.0).agrees


def test_export_refuses_a_data_set_that_changed_since_the_trial_trained(study_copy):
    study_file = Path(STUDY_FILE)
    study_file.write_text(study_file.read_text().replace("resolution = 32", "resolution = 48"))
    line = export_error("--out", "out")
    assert "the data set changed since trial 0 trained (resolution or numeric" in line
    assert not Path("out").exists()
