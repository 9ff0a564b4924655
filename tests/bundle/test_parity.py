"""Training and serving read inputs through the same code: a bundle scores what its trial scored.

For every modality, the val and test arrays a trial is scored on (``Split.batch`` of the
prepared data, what ``search.trial.train.evaluate`` feeds the network) and the arrays
``search predict`` feeds onnxruntime for the same files are byte-identical; and the test
macro F1 that ``search export`` prints is the one ``search predict`` reports on that split.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from search.bundle.predict import Bundle, Sample, folder_samples, load_pixels, model_inputs
from search.cli import app
from search.config import read_study_file
from search.data.decode import bundle_preprocess_section
from search.data.prepared import PreparedData, prepare_data
from tests.search.conftest import make_dataset, write_study
from tests.search.test_export import STUDY_FILE, build_exported_study

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")


def training_arrays(data: PreparedData, split: str) -> dict[str, np.ndarray]:
    """What a trial is scored on: the evaluation split's batch, every row, as numpy."""
    prepared = data.split(split)
    batch = prepared.batch(np.arange(len(prepared)), CPU, channels_last=False)
    return {name: tensor.numpy() for name, tensor in batch.items()}


def index_samples(data: PreparedData, split: str) -> list[Sample]:
    """``search predict`` samples for the files of a split of the data set, in its order."""
    return [Sample(name=str(s.rgb), rgb=s.rgb, depth=s.depth, text=s.text, label=s.label,
                   numeric=None if s.numeric is None else list(s.numeric))
            for s in data.index.splits[split]]


def assert_byte_identical(feeds: dict[str, np.ndarray], expected: dict[str, np.ndarray],
                          order: list[int]) -> None:
    assert sorted(feeds) == sorted(expected)
    for name, value in feeds.items():
        want = expected[name][order]
        assert value.dtype == want.dtype and value.shape == want.shape, name
        assert value.tobytes() == want.tobytes(), f"{name} differs"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return build_exported_study(tmp_path_factory)


def test_rgb_and_depth_feeds_are_the_arrays_the_trial_was_scored_on(exported, monkeypatch):
    monkeypatch.chdir(exported.root)
    meta = json.loads(Path("bundle/model.json").read_text())
    bundle = Bundle(Path("bundle"), meta, session=None)  # model_inputs needs no session
    data = prepare_data(read_study_file(STUDY_FILE))
    for split in ("val", "test"):
        samples = index_samples(data, split)
        assert_byte_identical(model_inputs(bundle, samples), training_arrays(data, split),
                              list(range(len(samples))))
        for modality in ("rgb", "depth"):  # the uint8 pixels too: one decoder, one cache
            size = data.preprocess.resolution
            pixels = np.stack([load_pixels(getattr(s, modality), modality, size) for s in samples])
            assert pixels.tobytes() == np.asarray(data.arrays[split].images[modality]).tobytes()
    # The same through predict's own reader of the folders layout.
    samples = folder_samples(Path("data/test"), bundle)
    ids = data.arrays["test"].ids
    assert_byte_identical(model_inputs(bundle, samples), training_arrays(data, "test"),
                          [ids.index(Path(s.name).stem) for s in samples])


def test_export_and_predict_report_the_same_test_macro_f1(exported, monkeypatch):
    monkeypatch.chdir(exported.root)
    exported_f1 = re.search(r"test macro F1 (\d\.\d{4})", exported.export_output).group(1)
    result = CliRunner().invoke(app, ["predict", "bundle", "data/test"])
    assert result.exit_code == 0, result.output
    predicted_f1 = re.search(r"macro F1 (\d\.\d{4}), accuracy", result.output).group(1)
    assert predicted_f1 == exported_f1


@pytest.mark.parametrize("second", ["numeric", "text"])
def test_numeric_and_text_feeds_are_the_arrays_the_trial_was_scored_on(second, tmp_path,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_dataset(Path("data"), modalities=("rgb", second))
    make_dataset(Path("held"), counts={"red": 4, "green": 4, "yellow": 3}, seed=1,
                 modalities=("rgb", second))
    os.rename("held/train", "data/test")
    config = read_study_file(str(write_study(Path("."), Path("data"),
                                             modalities=f'["rgb", "{second}"]',
                                             fusion='["joint"]')))
    data = prepare_data(config)
    names = ("rgb", second)
    inputs = [{"name": m, "modality": m, "dtype": "int64" if m == "text" else "float32"}
              for m in names]
    meta = {"inputs": inputs,
            "preprocess": bundle_preprocess_section(data.preprocess.to_dict(), names)}
    bundle = Bundle(Path("no-bundle"), meta, session=None)
    for split in ("val", "test"):
        samples = index_samples(data, split)
        assert_byte_identical(model_inputs(bundle, samples), training_arrays(data, split),
                              list(range(len(samples))))
    samples = folder_samples(Path("data/test"), bundle)
    ids = data.arrays["test"].ids
    assert_byte_identical(model_inputs(bundle, samples), training_arrays(data, "test"),
                          [ids.index(Path(s.name).stem) for s in samples])
