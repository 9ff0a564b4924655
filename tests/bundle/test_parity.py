"""Training and serving read inputs through the same code: a bundle scores what its trial scored.

For every modality, the val and test arrays a trial is scored on (``Split.batch`` of the
prepared data, what ``search.trial.train.evaluate`` feeds the network) and the arrays
``search predict`` feeds onnxruntime for the same files are byte-identical; and the test
macro F1 that ``search export`` prints is the one ``search predict`` reports on that split.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image, ImageOps
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
    # The square 8-bit demo-like data: center crop (the default) and no depth range.
    assert meta["preprocess"]["resize"]["mode"] == "center_crop"
    assert meta["preprocess"]["depth"]["range"] is None
    bundle = Bundle(Path("bundle"), meta, session=None)  # model_inputs needs no session
    data = prepare_data(read_study_file(STUDY_FILE))
    for split in ("val", "test"):
        samples = index_samples(data, split)
        assert_byte_identical(model_inputs(bundle, samples), training_arrays(data, split),
                              list(range(len(samples))))
        for modality in ("rgb", "depth"):  # the uint8 pixels too: one decoder, one cache
            prep = meta["preprocess"]
            pixels = np.stack([load_pixels(getattr(s, modality), modality, prep) for s in samples])
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


# --- real photos and real depth: non-square, transparent, CMYK; 16-bit millimetres ---------

CLASSES = {"red": ((200, 40, 40), 900), "green": ((40, 180, 60), 1300),
           "yellow": ((220, 200, 40), 1700)}  # colour, distance in mm


def real_photo_set(root: Path, per_class: dict[str, int], seed: int) -> Path:
    """Phone-like photos (not square, some RGBA, CMYK JPEG or palette) with 16-bit depth in mm."""
    rng = np.random.default_rng(seed)
    for name, (colour, distance) in CLASSES.items():
        for split, count in per_class.items():
            for i in range(count):
                width, height = rng.integers(20, 48, 2)
                rgb = np.clip(np.asarray(colour) + rng.normal(0, 25, (height, width, 3)), 0, 255)
                image = Image.fromarray(rgb.astype(np.uint8))
                folder = root / split / "rgb" / name
                folder.mkdir(parents=True, exist_ok=True)
                kind = i % 4
                if kind == 1:  # a cut-out: transparent corners
                    alpha = np.full((height, width), 255, np.uint8)
                    alpha[: height // 3, : width // 3] = 0
                    image.putalpha(Image.fromarray(alpha))
                    image.save(folder / f"{name}{i}.png")
                elif kind == 2:
                    image.convert("CMYK").save(folder / f"{name}{i}.jpg", quality=90)
                elif kind == 3:
                    palette = image.convert("P", palette=Image.Palette.ADAPTIVE)
                    palette.save(folder / f"{name}{i}.png")
                else:
                    image.save(folder / f"{name}{i}.png")
                depth = distance + rng.normal(0, 60, (height, width))
                depth[rng.random((height, width)) < 0.02] = 0  # no reading
                path = root / split / "depth" / name / f"{name}{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.clip(depth, 0, 65535).astype(np.uint16)).save(path)
    return root


def plain_client_pixels(path: Path, modality: str, prep: dict) -> np.ndarray:
    """uint8 pixels made by following model.json's words alone (no code of ours)."""
    size, mode = prep["resolution"], prep["resize"]["mode"]
    image = ImageOps.exif_transpose(Image.open(path))
    fitted = prep["depth"]["range"] if modality == "depth" else None
    if fitted is not None:
        image = image.convert("I").convert("F")
    elif image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, "white")
        image = Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    else:
        image = image.convert("RGB" if modality == "rgb" else "L")
    width, height = image.size
    if mode == "center_crop":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size),
                                                                        Image.BILINEAR)
    elif mode == "pad":
        long = max(width, height)
        inner = (round(width * size / long), round(height * size / long))
        canvas = Image.new(image.mode, (size, size), 0)
        canvas.paste(image.resize(inner, Image.BILINEAR),
                     ((size - inner[0]) // 2, (size - inner[1]) // 2))
        image = canvas
    else:
        image = image.resize((size, size), Image.BILINEAR)
    values = np.asarray(image, np.float32 if fitted else np.uint8).reshape(size, size, -1)
    if fitted:
        low, high = fitted
        scaled = np.rint((values - np.float32(low)) * np.float32(255 / (high - low)))
        values = np.clip(scaled, 0, 255).astype(np.uint8)
    return values


@pytest.fixture(scope="module")
def real_photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    real_photo_set(root / "data", {"train": 5, "val": 2, "test": 3}, seed=3)
    return root


@pytest.mark.parametrize("resize", ["center_crop", "pad", "squash"])
def test_real_photos_and_sixteen_bit_depth_reach_predict_and_a_plain_client_as_trained(
        resize, real_photos, exported, tmp_path, monkeypatch):
    monkeypatch.chdir(real_photos)
    config = read_study_file(str(write_study(tmp_path, real_photos / "data")))
    config = config.model_copy(update={
        "train": config.train.model_copy(update={"resize": resize}),
        "data": config.data.model_copy(update={"cache_dir": tmp_path / "cache"})})
    data = prepare_data(config)
    low, high = data.preprocess.depth_range  # fitted on train: 16-bit millimetres
    assert 500 < low < 900 < 1700 < high < 2000
    # The exported graph (rgb + depth at 32 px) with this data's preprocessing.
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(exported.bundle, bundle_dir)
    meta = json.loads((bundle_dir / "model.json").read_text())
    assert meta["preprocess"]["resolution"] == data.preprocess.resolution
    meta["preprocess"] = bundle_preprocess_section(data.preprocess.to_dict(), ("rgb", "depth"))
    assert meta["preprocess"]["resize"]["mode"] == resize
    assert meta["preprocess"]["depth"]["range"] == [low, high]
    (bundle_dir / "model.json").write_text(json.dumps(meta))
    bundle = Bundle(bundle_dir, meta, session=None)
    for split in ("val", "test"):
        samples = index_samples(data, split)
        assert_byte_identical(model_inputs(bundle, samples), training_arrays(data, split),
                              list(range(len(samples))))
        for modality in ("rgb", "depth"):
            client = np.stack([plain_client_pixels(getattr(s, modality), modality,
                                                   meta["preprocess"]) for s in samples])
            assert client.tobytes() == np.asarray(data.arrays[split].images[modality]).tobytes()
    # The client's feeds through onnxruntime give what `search predict` writes.
    samples = folder_samples(Path("data/test"), bundle)
    feeds = {}
    for modality in ("rgb", "depth"):
        rule = meta["preprocess"][modality]
        pixels = np.stack([plain_client_pixels(getattr(s, modality), modality,
                                               meta["preprocess"]) for s in samples])
        feeds[modality] = ((pixels.transpose(0, 3, 1, 2) * np.float32(rule["scale"])
                            - np.asarray(rule["mean"], np.float32).reshape(1, -1, 1, 1))
                           / np.asarray(rule["std"], np.float32).reshape(1, -1, 1, 1)
                           ).astype(np.float32)
    session = ort.InferenceSession(str(bundle_dir / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    logits = session.run(None, feeds)[0]
    result = CliRunner().invoke(app, ["predict", str(bundle_dir), "data/test", "--out",
                                      str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    with (tmp_path / "p.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["sample"] for row in rows] == [s.name for s in samples]
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    for row, expected in zip(rows, probabilities, strict=True):
        got = [float(row[f"p_{name}"]) for name in meta["labels"].values()]
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_export_refuses_a_trial_whose_depth_range_no_longer_fits(exported, tmp_path,
                                                                   monkeypatch):
    """The trial trained on 8-bit depth; the same maps re-saved as 16-bit get a fitted range."""
    copy = tmp_path / "copy"
    shutil.copytree(exported.root, copy, ignore=shutil.ignore_patterns("bundle", "cache"))
    monkeypatch.chdir(copy)
    monkeypatch.delenv("SEARCH_STORAGE", raising=False)
    for path in Path("data/train/depth").glob("*/*.png"):
        Image.fromarray(np.asarray(Image.open(path)).astype(np.uint16) * 256).save(path)
    result = CliRunner().invoke(app, ["export", "--study", STUDY_FILE, "--out", "out"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "depth range" in lines[0], result.output
    assert not Path("out").exists()
