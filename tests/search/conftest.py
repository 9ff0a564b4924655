"""Tiny data sets and study files for the search tests (16-32 px, b0, a few epochs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

COLOURS = {"red": (200, 30, 30), "green": (40, 180, 40), "yellow": (220, 200, 40)}


def make_dataset(root: Path, *, counts: dict[str, int] | None = None, size: int = 16,
                 seed: int = 0, modalities: tuple[str, ...] = ("rgb", "depth", "numeric"),
                 noise: float = 20.0) -> Path:
    """A folders-layout data set: one colour per class, a depth blob, numeric = class + noise."""
    counts = counts or {"red": 12, "green": 8, "yellow": 6}
    rng = np.random.default_rng(seed)
    for cls_index, (name, count) in enumerate(counts.items()):
        colour = np.array(COLOURS.get(name, (100, 100, 100)), dtype=float)
        for i in range(count):
            pixels = np.clip(colour + rng.normal(0, noise, (size, size, 3)), 0, 255)
            _save(root / "train" / "rgb" / name / f"{name}{i}.png", pixels.astype(np.uint8))
            if "depth" in modalities:
                depth = np.full((size, size), 40 * (cls_index + 1), dtype=float)
                depth = np.clip(depth + rng.normal(0, 5, depth.shape), 0, 255).astype(np.uint8)
                _save(root / "train" / "depth" / name / f"{name}{i}.png", depth)
            if "numeric" in modalities or "text" in modalities:
                label = {"numeric": [float(cls_index) + rng.normal(0, 0.1), float(i % 3)],
                         "text": f"apple {name} note {i}"}
                path = root / "train" / "labels" / name / f"{name}{i}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(label))
    return root


def _save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


STUDY = """
[study]
name = "{name}"
n_trials = {n_trials}
seed = 0

[data]
root = "{root}"
modalities = {modalities}
val_fraction = 0.25
test_fraction = 0.2

[augment]
ops = ["flip_left_right"]

[train]
epochs = {epochs}
batch_size = 8
resolution = 32
patience = 5
warmup_epochs = 0
threads = 1
pretrained = "none"

[space]
balance = "oversample"
backbone = ["b0"]
fusion = {fusion}
dropout = [0.0, 0.3]
optimizer = ["adam", "adamw"]
lr = {{ low = 1e-3, high = 1e-2, log = true }}

[pruner]
kind = "{pruner}"
min_resource = 1
reduction_factor = 2

[sampler]
n_startup_trials = 2
"""


def write_study(folder: Path, data_root: Path, *, name: str = "tiny", n_trials: int = 2,
                epochs: int = 2, modalities: str = '["rgb", "depth"]',
                fusion: str = '["none", "early", "joint", "late"]', pruner: str = "none",
                extra: str = "") -> Path:
    path = folder / f"{name}.toml"
    path.write_text(STUDY.format(name=name, n_trials=n_trials, root=data_root, epochs=epochs,
                                 modalities=modalities, fusion=fusion, pruner=pruner) + extra)
    return path


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in a fresh folder so runs/ and caches stay inside the test's tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SEARCH_STORAGE", raising=False)
    return tmp_path


@pytest.fixture
def tiny_data(workdir) -> Path:
    return make_dataset(workdir / "data")
