"""`search export --ensemble K --bias`: one graph over several trials, same bundle contract."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import models
from search.bundle.ensemble import EnsembleModel
from search.cli import app
from tests.search.conftest import make_dataset, write_study
from tests.search.test_predict import plain_onnxruntime, read_predictions

runner = CliRunner()


def _model(fusion: str, modality: str | None, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    spec = models.ModelSpec(backbone="b0", fusion=fusion, num_classes=3, modality=modality,
                            resolution=32)
    return models.prepare_for_export(models.create_model(spec))


@torch.no_grad()
def test_the_ensemble_normalizes_per_member_and_averages_probabilities():
    rgb_only, fused = _model("none", None, 0), _model("early", "depth", 1)
    norms = [{"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
             {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}]
    bias = [0.0, 0.5, -0.25]
    model = EnsembleModel([rgb_only, fused], norms, [0.25, 0.75], bias)
    assert model.input_names == ("rgb", "depth")
    batch = {"rgb": torch.rand(4, 3, 32, 32), "depth": torch.randn(4, 1, 32, 32)}

    def member(net, norm, inputs):
        mean = torch.tensor(norm["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(norm["std"]).view(1, 3, 1, 1)
        return torch.softmax(net({**inputs, "rgb": (inputs["rgb"] - mean) / std}), dim=1)

    expected = torch.log(0.25 * member(rgb_only, norms[0], {"rgb": batch["rgb"]})
                         + 0.75 * member(fused, norms[1], batch)) + torch.tensor(bias)
    torch.testing.assert_close(model(batch), expected)
    # Without the bias, softmax of the output gives back the averaged probabilities.
    plain = EnsembleModel([rgb_only, fused], norms, [0.25, 0.75])
    assert torch.allclose(torch.softmax(plain(batch), 1).sum(1), torch.ones(4))


@pytest.mark.slow
def test_an_ensemble_bundle_passes_the_plain_onnxruntime_contract(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SEARCH_STORAGE", raising=False)
    make_dataset(Path("data"))
    make_dataset(Path("held"), counts={"red": 4, "green": 4, "yellow": 3}, seed=1)
    os.rename("held/train", "data/test")
    study = write_study(Path("."), Path("data"), n_trials=3, epochs=1, fusion='["none", "early"]')
    # Members validated with test-time views: the graph must carry them too.
    study.write_text(study.read_text().replace("[space]\n", '[space]\ntta = "flips"\n'))
    result = runner.invoke(app, ["run", "--study", "tiny.toml"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["export", "--study", "tiny.toml", "--out", "ens",
                                 "--ensemble", "3", "--bias"])
    assert result.exit_code == 0, result.output
    assert "exported an ensemble of" in result.output and "bias: val macro F1" in result.output
    assert "val - test gap" in result.output

    meta = json.loads(Path("ens/model.json").read_text())
    arch, prep = meta["architecture"], meta["preprocess"]
    assert arch["ensemble"] and 1 <= len(arch["members"]) <= 3
    assert sum(m["weight"] for m in arch["members"]) == pytest.approx(1.0)
    assert prep["rgb"]["mean"] == [0.0, 0.0, 0.0] and prep["rgb"]["std"] == [1.0, 1.0, 1.0]
    assert all(m["preprocess"]["rgb"]["std"] != [1.0, 1.0, 1.0] for m in arch["members"])
    assert all(m["tta"] == ["flip_left_right"] for m in arch["members"])
    assert len(meta["postprocess"]["bias"]) == 3
    assert "val_macro_f1_after_out_of_fold" in meta["postprocess"]["steps"]["bias"]
    metrics = meta["metrics"]
    interval = metrics["test_macro_f1_interval"]
    assert interval["low"] <= metrics["test_macro_f1"] <= interval["high"]
    # The gap is against the out-of-fold estimate of the last fitted step (the bias).
    oof = meta["postprocess"]["steps"]["bias"]["val_macro_f1_after_out_of_fold"]
    assert metrics["val_macro_f1"] == oof
    assert metrics["val_test_gap"] == pytest.approx(oof - metrics["test_macro_f1"])
    assert meta["onnx_max_abs_diff"] <= meta["onnx_tolerance"]

    # search predict and a client that follows nothing but model.json agree with export.
    out = runner.invoke(app, ["predict", "ens", "data/test", "--out", str(tmp_path / "p.csv")])
    assert out.exit_code == 0, out.output
    assert f"macro F1 {meta['metrics']['test_macro_f1']:.4f}" in out.output
    rows = read_predictions(tmp_path / "p.csv")
    rgb = sorted(Path("data/test/rgb").glob("*/*.png"))
    depth = [Path("data/test/depth") / p.parent.name / p.name for p in rgb]
    _, probabilities = plain_onnxruntime(Path("ens"), {"rgb": rgb, "depth": depth})
    for path, row in zip(rgb, probabilities, strict=True):
        assert rows[path.stem]["label"] == meta["labels"][str(int(np.argmax(row)))]
        assert float(rows[path.stem]["probability"]) == pytest.approx(row.max(), abs=1e-5)
