"""Tiny data sets (8 px images) in both layouts, and a stand-in for ``DataConfig``."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from search.errors import DataError

SIZE = 8
COLOURS = {"apple": (200, 30, 30), "pear": (40, 180, 40), "quince": (220, 200, 40)}
Counts = dict[str, dict[str, int]]  # split -> class -> samples
DEFAULT_COUNTS: Counts = {"train": {"apple": 6, "pear": 4}, "val": {"apple": 2, "pear": 2}}


@dataclass
class Spec:
    """What the data modules read from ``DataConfig`` (search/config.py)."""

    root: Path
    format: str = "folders"
    modalities: list[str] = field(default_factory=lambda: ["rgb"])
    demo: str | None = None
    cache_dir: Path = Path("cache")
    val_fraction: float = 0.15
    test_fraction: float = 0.15


def save_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def pixels(label: str, index: int, channels: int = 3) -> np.ndarray:
    """A class colour with a per-sample tweak, so every image differs."""
    colour = np.array(COLOURS.get(label, (90, 90, 90))[:channels], np.uint8)
    image = np.tile(colour, (SIZE, SIZE, 1))
    image[0, 0] = index % 256
    return image[..., 0] if channels == 1 else image


def labels_payload(label: str, index: int) -> dict[str, object]:
    return {"numeric": {"width": float(index), "weight": 10.0 + index}, "text": f"{label} {index}"}


def write_folders(root: Path, counts: Counts = DEFAULT_COUNTS) -> Path:
    """A folders-layout set with every modality: rgb, depth and a labels JSON."""
    for split, per_class in counts.items():
        for label, count in per_class.items():
            for i in range(count):
                stem = f"{label}{i}"
                save_png(root / split / "rgb" / label / f"{stem}.png", pixels(label, i))
                save_png(root / split / "depth" / label / f"{stem}.png", pixels(label, i, 1))
                path = root / split / "labels" / label / f"{stem}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(labels_payload(label, i)))
    return root


def write_csv(root: Path, counts: Counts = DEFAULT_COUNTS) -> Path:
    """The same set in the csv layout (columns image, label, depth, num_*, text)."""
    header = ["image", "label", "depth", "num_width", "num_weight", "text"]
    for split, per_class in counts.items():
        rows = []
        for label, count in per_class.items():
            for i in range(count):
                image, depth = f"img/{split}/{label}{i}.png", f"dep/{split}/{label}{i}.png"
                save_png(root / image, pixels(label, i))
                save_png(root / depth, pixels(label, i, 1))
                payload = labels_payload(label, i)
                numeric = payload["numeric"]
                assert isinstance(numeric, dict)
                rows.append([image, label, depth, *numeric.values(), payload["text"]])
        with (root / f"{split}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)
    return root


@pytest.fixture
def spec(tmp_path: Path) -> Callable[..., Spec]:
    """Make a ``Spec`` whose cache lives in this test's temporary directory."""

    def make(root: Path, **options: object) -> Spec:
        options.setdefault("cache_dir", tmp_path / "cache")
        return Spec(root=root, **options)  # type: ignore[arg-type]

    return make


@pytest.fixture
def make_folders(tmp_path: Path) -> Callable[..., Path]:
    """``make_folders(counts=..., name=...)`` writes a folders-layout set under tmp_path."""
    return lambda counts=DEFAULT_COUNTS, name="folders": write_folders(tmp_path / name, counts)


@pytest.fixture
def make_csv(tmp_path: Path) -> Callable[..., Path]:
    """``make_csv(counts=..., name=...)`` writes a csv-layout set under tmp_path."""
    return lambda counts=DEFAULT_COUNTS, name="csvset": write_csv(tmp_path / name, counts)


@pytest.fixture
def one_line() -> Callable[..., str]:
    """``one_line(excinfo, *needles)``: the message is one line naming every needle."""

    def check(error: pytest.ExceptionInfo[DataError], *needles: str) -> str:
        message = str(error.value)
        assert "\n" not in message
        for needle in needles:
            assert needle in message, f"{needle!r} not in {message!r}"
        return message

    return check
