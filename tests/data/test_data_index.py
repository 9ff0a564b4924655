"""load_index: both layouts, every modality, drawn splits, the fingerprint."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from search.data.index import holdout, load_index

MODALITIES = [["rgb"], ["rgb", "depth"], ["rgb", "numeric"], ["rgb", "text"]]


@pytest.mark.parametrize("fmt", ["folders", "csv"])
@pytest.mark.parametrize("modalities", MODALITIES, ids="+".join)
def test_loads_every_modality(fmt, modalities, make_folders, make_csv, spec):
    counts = {
        "train": {"apple": 4, "pear": 3},
        "val": {"apple": 1, "pear": 1},
        "test": {"apple": 2, "pear": 1},
    }
    root = make_folders(counts) if fmt == "folders" else make_csv(counts)
    index = load_index(spec(root, format=fmt, modalities=modalities), seed=0)

    assert index.classes == ["apple", "pear"]
    assert index.counts() == counts
    assert index.modalities == modalities
    sample = next(s for s in index.splits["train"] if s.id == "apple2")
    assert sample.label == "apple" and sample.rgb.is_file()
    assert (sample.depth is not None) == ("depth" in modalities)
    if "depth" in modalities:
        assert sample.depth is not None and sample.depth.is_file()
    if "numeric" in modalities:
        assert index.numeric_names == ["width", "weight"]
        assert sample.numeric == (2.0, 12.0)
    else:
        assert index.numeric_names is None and sample.numeric is None
    assert sample.text == ("apple 2" if "text" in modalities else None)


def test_numeric_lists_are_named_by_position(make_folders, spec):
    root = make_folders()
    for path in root.glob("*/labels/*/*.json"):
        path.write_text('{"numeric": [1, 2.5, 3], "text": ""}')
    index = load_index(spec(root, modalities=["rgb", "numeric"]), seed=0)
    assert index.numeric_names == ["x0", "x1", "x2"]
    assert {s.numeric for s in index.splits["val"]} == {(1.0, 2.5, 3.0)}


def test_numeric_objects_may_order_keys_differently(make_folders, spec):
    root = make_folders()
    (root / "train/labels/apple/apple3.json").write_text(
        '{"text": "", "numeric": {"weight": 5, "width": 7}}'
    )
    index = load_index(spec(root, modalities=["rgb", "numeric"]), seed=0)
    sample = next(s for split in index.splits.values() for s in split if s.id == "apple3")
    assert index.numeric_names == ["width", "weight"] and sample.numeric == (7.0, 5.0)


def _ids(index):
    return {split: sorted(s.id for s in samples) for split, samples in index.splits.items()}


@pytest.mark.parametrize("fmt", ["folders", "csv"])
def test_missing_val_and_test_are_drawn_stratified_and_seeded(fmt, make_folders, make_csv, spec):
    counts = {"train": {"apple": 40, "pear": 20, "quince": 20}}
    root = make_folders(counts) if fmt == "folders" else make_csv(counts)
    data = spec(root, format=fmt, val_fraction=0.25, test_fraction=0.25)
    first, again, other = (load_index(data, seed=s) for s in (0, 0, 1))

    assert _ids(first) == _ids(again)
    assert _ids(first) != _ids(other)
    ids = _ids(first)
    assert sum(len(v) for v in ids.values()) == 80
    assert len(set().union(*map(set, ids.values()))) == 80  # disjoint, nothing lost
    # Stratified: each class keeps its share in each split (20 / 10 / 10 for 40 apples).
    assert first.counts()["val"] == {"apple": 10, "pear": 5, "quince": 5}
    assert first.counts()["test"] == {"apple": 10, "pear": 5, "quince": 5}
    assert first.fingerprint != other.fingerprint  # the drawn splits differ


def test_only_the_missing_split_is_drawn(make_folders, spec):
    root = make_folders({"train": {"apple": 17, "pear": 17}, "test": {"apple": 3, "pear": 3}})
    index = load_index(spec(root, val_fraction=0.15, test_fraction=0.15), seed=0)
    assert index.counts()["test"] == {"apple": 3, "pear": 3}
    # val is 15% of all the data, drawn from the non-test part: 0.15 / 0.85 of 34 -> 6.
    assert sum(index.counts()["val"].values()) == 6
    assert sum(index.counts()["train"].values()) == 28


def test_tiny_classes_keep_a_training_sample(make_folders, spec):
    root = make_folders({"train": {"apple": 30, "pear": 2, "quince": 1}})
    index = load_index(spec(root, val_fraction=0.3, test_fraction=0.3), seed=0)
    train = index.counts()["train"]
    assert train["quince"] == 1 and train["pear"] >= 1
    assert sum(len(s) for s in index.splits.values()) == 33


def test_holdout_falls_back_when_too_few_to_stratify(make_folders, spec):
    root = make_folders({"train": {c: 2 for c in ("apple", "pear", "quince", "fig", "kiwi")}})
    rows = load_index(spec(root), seed=0).splits["train"]
    kept, held = holdout(rows, 0.1, seed=0)  # 1 held sample cannot cover 5 classes
    assert len(held) == 1 and len(kept) == len(rows) - 1
    assert set(Counter(r.label for r in kept)) == {"apple", "pear", "quince", "fig", "kiwi"}


def test_fingerprint_follows_every_file_used(make_folders, spec):
    root = make_folders()
    data = spec(root, modalities=["rgb", "numeric"])
    base = load_index(data, seed=0).fingerprint
    assert load_index(data, seed=0).fingerprint == base

    labels = root / "val/labels/pear/pear1.json"
    stat = labels.stat()
    os.utime(labels, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    touched = load_index(data, seed=0).fingerprint
    assert touched != base

    image = root / "train/rgb/apple/apple0.png"
    image.write_bytes(image.read_bytes() + b"\0")
    assert load_index(data, seed=0).fingerprint not in (base, touched)


def test_fingerprint_follows_the_options(make_folders, spec):
    root = make_folders()
    rgb = load_index(spec(root), seed=0).fingerprint
    assert load_index(spec(root, modalities=["rgb", "depth"]), seed=0).fingerprint != rgb
    # With val and test given (DEFAULT_COUNTS has no test), the seed decides the test split.
    assert load_index(spec(root), seed=1).fingerprint != rgb


def test_hidden_files_are_ignored(make_folders, spec):
    root = make_folders()
    (root / "train/rgb/apple/.DS_Store").write_bytes(b"junk")
    (root / "train/rgb/.hidden").mkdir()
    index = load_index(spec(root), seed=0)
    assert sum(len(samples) for samples in index.splits.values()) == 14


def test_jpeg_and_mixed_case_suffixes_are_images(make_folders, spec, tmp_path: Path):
    root = make_folders()
    (root / "train/rgb/apple/apple0.png").rename(root / "train/rgb/apple/apple0.JPEG")
    index = load_index(spec(root), seed=0)
    assert any(s.rgb.name == "apple0.JPEG" for s in index.splits["train"])
