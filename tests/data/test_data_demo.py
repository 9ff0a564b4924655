"""The demo apples: deterministic, imbalanced, complete, and its second modality informs."""

from __future__ import annotations

import functools
import hashlib
import multiprocessing
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import search.data.demo as demo
from search.data.cache import load_split_arrays
from search.data.demo import NUMERIC_NAMES, VARIETIES, ensure_demo, generate_apples
from search.data.index import load_index


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def apples(tmp_path_factory) -> Path:
    """Fuji 75 ... rockit 15: big enough to fit the probes below, 16 px to stay fast."""
    root = tmp_path_factory.mktemp("demo") / "apples"
    generate_apples(root, seed=0, size=16, scale=0.3)
    return root


@pytest.fixture(scope="module")
def arrays(apples: Path, tmp_path_factory) -> dict[str, np.ndarray]:
    """Every sample of every split: class names, RGB, depth and numeric."""
    data = SimpleNamespace(
        root=apples, format="folders", modalities=["rgb", "depth"], val_fraction=0.15,
        test_fraction=0.15,
    )  # fmt: skip
    index = load_index(data, seed=0)
    splits = load_split_arrays(index, 16, tmp_path_factory.mktemp("cache"))
    data.modalities = ["rgb", "numeric"]
    numeric = load_index(data, seed=0).splits
    return {
        "names": np.array(index.classes)[np.concatenate([s.labels for s in splits.values()])],
        "rgb": np.concatenate([s.images["rgb"] for s in splits.values()]),
        "depth": np.concatenate([s.images["depth"] for s in splits.values()]),
        "numeric": np.array([s.numeric for split in numeric.values() for s in split]),
    }


def test_same_seed_same_bytes(tmp_path: Path):
    make = functools.partial(generate_apples, size=8, scale=0.02)
    make(tmp_path / "a", seed=0)
    make(tmp_path / "b", seed=0)
    make(tmp_path / "c", seed=1)
    a, b, c = (_hashes(tmp_path / name) for name in "abc")
    assert a == b and len(a) == 3 * (10 + 4 * 5)  # gala 10, the others 5 (the minimum)
    assert len(c) == len(a) and set(a.values()).isdisjoint(c.values())


def test_classes_imbalance_and_complete_samples(apples: Path, spec):
    index = load_index(spec(apples, modalities=["rgb", "depth"]), seed=0)
    assert index.classes == sorted(v.name for v in VARIETIES) and len(index.classes) >= 5
    totals = Counter(s.label for split in index.splits.values() for s in split)
    assert totals == {v.name: round(v.count * 0.3) for v in VARIETIES}
    assert max(totals.values()) >= 10 * min(totals.values())
    assert {v.count for v in VARIETIES} == {500, 250, 150, 90, 50}
    assert all(s.depth is not None and s.depth.is_file() for s in index.splits["test"])
    numeric = load_index(spec(apples, modalities=["rgb", "numeric"]), seed=0)
    assert numeric.numeric_names == list(NUMERIC_NAMES)
    assert all(len(s.numeric or ()) == 4 for split in numeric.splits.values() for s in split)
    text = load_index(spec(apples, modalities=["rgb", "text"]), seed=0)
    assert all(s.text for s in text.splits["val"])


def test_csv_layout_loads(tmp_path: Path, spec):
    generate_apples(tmp_path / "csv", fmt="csv", size=8, scale=0.02)
    index = load_index(spec(tmp_path / "csv", format="csv", modalities=["rgb", "numeric"]), seed=0)
    assert len(index.classes) == 5 and index.numeric_names == list(NUMERIC_NAMES)
    assert all(n >= 1 for n in index.counts()["val"].values())
    assert all(s.rgb.is_file() for s in index.splits["train"])


def _colour_histograms(rgb: np.ndarray, levels: int = 8) -> np.ndarray:
    """Joint RGB histograms, ``levels`` per channel: what a colour-only classifier sees."""
    bins = (rgb.reshape(len(rgb), -1, 3) // (256 // levels)).astype(np.int64)
    codes = (bins[..., 0] * levels + bins[..., 1]) * levels + bins[..., 2]
    return np.stack([np.bincount(c, minlength=levels**3) for c in codes]) / codes.shape[1]


def _score(features: np.ndarray, labels: np.ndarray) -> float:
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, class_weight="balanced"))
    return float(cross_val_score(model, features, labels, cv=3, scoring="balanced_accuracy").mean())


def test_numeric_tells_the_rgb_twins_apart(arrays):
    twins = np.isin(arrays["names"], ["fuji", "rockit"])
    labels = arrays["names"][twins]
    assert _score(arrays["numeric"][twins], labels) > 0.95
    assert _score(_colour_histograms(arrays["rgb"][twins]), labels) < 0.7


def test_depth_tells_the_rgb_twins_apart(arrays):
    twins = np.isin(arrays["names"], ["fuji", "rockit"])
    flat = arrays["depth"][twins].reshape(twins.sum(), -1).astype(np.float32)
    table = np.median(flat, axis=1)  # most pixels are the table: its level is the distance
    top = np.percentile(flat, 98, axis=1)
    area = (flat > table[:, None] + 4).mean(axis=1)
    distance = 600 - table / 255 * 500  # the demo's depth encoding, in mm
    features = np.stack([top - table, np.sqrt(area) * distance], axis=1)
    assert _score(features, arrays["names"][twins]) > 0.9


def test_rgb_tells_the_other_varieties_apart(arrays):
    names = arrays["names"]
    groups = np.where(np.isin(names, ["fuji", "rockit"]), "fuji_or_rockit", names)
    assert _score(_colour_histograms(arrays["rgb"]), groups) > 0.85


def _visible(folder: Path) -> list[str]:
    """What is left in ``folder`` besides ensure_demo's lock files."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def _race(root: str, barrier, results) -> None:
    barrier.wait()
    data = SimpleNamespace(root=Path(root), format="folders", demo="apples")
    results.put(ensure_demo(data))


def test_ensure_demo_racing_processes_draw_once(tmp_path: Path, monkeypatch):
    calls = multiprocessing.get_context("fork").Queue()
    real = generate_apples

    def counted(root: Path, **options: object) -> None:
        calls.put(1)
        real(root, size=8, scale=0.02, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(demo, "generate_apples", counted)
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    racers = [
        context.Process(target=_race, args=(str(tmp_path / "apples"), barrier, results))
        for _ in range(2)
    ]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(timeout=60)
        assert racer.exitcode == 0
    assert sorted(results.get(timeout=5) for _ in racers) == [False, True]
    assert calls.get(timeout=5) == 1 and calls.empty()
    assert _visible(tmp_path) == ["apples"]


def test_ensure_demo(tmp_path: Path, spec, monkeypatch):
    small = functools.partial(generate_apples, size=8, scale=0.05)
    monkeypatch.setattr(demo, "generate_apples", small)
    assert not ensure_demo(spec(tmp_path / "a", demo=None))
    assert not (tmp_path / "a").exists()

    assert ensure_demo(spec(tmp_path / "a", demo="apples"))
    assert (tmp_path / "a/train/rgb/rockit").is_dir()
    assert not ensure_demo(spec(tmp_path / "a", demo="apples"))  # not empty: left alone

    (tmp_path / "b").mkdir()
    assert ensure_demo(spec(tmp_path / "b", demo="apples", format="csv"))
    assert (tmp_path / "b/train.csv").is_file()
    assert _visible(tmp_path) == ["a", "b"]  # no temporary leftovers


def test_ensure_demo_crash_leaves_nothing(tmp_path: Path, spec, monkeypatch):
    def crash(root: Path, **_: object) -> None:
        (root / "train").mkdir()
        raise OSError("disk full")

    monkeypatch.setattr(demo, "generate_apples", crash)
    with pytest.raises(demo.DataError, match="cannot generate the demo data set"):
        ensure_demo(spec(tmp_path / "a", demo="apples"))
    assert _visible(tmp_path) == []
