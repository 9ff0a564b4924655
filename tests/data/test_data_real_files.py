"""Spreadsheets saved with a byte-order mark, and the same photo in two splits or classes."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from search.config import TrainConfig, read_study_file
from search.data.check import check_data
from search.data.decode import DEFAULT_RESIZE, RESIZE_MODES
from search.data.index import load_index
from search.errors import ConfigError

MODALITIES = ["rgb", "depth", "numeric", "text"]


def as_excel_writes_it(path: Path) -> None:
    """Re-save a CSV as spreadsheets do: a UTF-8 byte-order mark and padded cells."""
    lines = path.read_text(encoding="utf-8").splitlines()
    padded = [",".join(f" {cell} " for cell in line.split(",")) for line in lines]
    path.write_text("\n".join(padded) + "\n", encoding="utf-8-sig")


def test_a_csv_with_a_byte_order_mark_reads_as_without(make_csv, spec):
    plain = make_csv(name="plain")
    marked = make_csv(name="marked")
    for split in ("train", "val"):
        as_excel_writes_it(marked / f"{split}.csv")
    assert (marked / "train.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    want = load_index(spec(plain, format="csv", modalities=MODALITIES), seed=0)
    got = load_index(spec(marked, format="csv", modalities=MODALITIES), seed=0)
    assert got.classes == want.classes == ["apple", "pear"]
    assert got.numeric_names == want.numeric_names == ["width", "weight"]
    for split, samples in want.splits.items():
        relative = [(s.id, s.label, s.rgb.relative_to(plain), s.depth.relative_to(plain),
                     s.numeric, s.text) for s in samples]
        assert relative == [(s.id, s.label, s.rgb.relative_to(marked),
                             s.depth.relative_to(marked), s.numeric, s.text)
                            for s in got.splits[split]]


def photo_set(root: Path, counts: dict[str, dict[str, int]]) -> Path:
    """A folders-layout set of random photos: no two samples share their pixels."""
    rng = np.random.default_rng(0)
    for split, per_class in counts.items():
        for label, count in per_class.items():
            for i in range(count):
                path = root / split / "rgb" / label / f"{label}{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
    return root


def check(root: Path, spec) -> tuple[list[list[str]], str]:
    console = Console(record=True, width=400)
    report = check_data(spec(root), resolution=8, seed=0, console=console)
    return report.duplicates, console.export_text()


COUNTS = {"train": {"apple": 3, "pear": 3}, "val": {"apple": 2, "pear": 2},
          "test": {"apple": 2, "pear": 2}}


def test_data_check_warns_about_the_same_photo_in_two_splits_or_classes(spec, tmp_path: Path):
    root = photo_set(tmp_path / "photos", COUNTS)
    duplicates, output = check(root, spec)
    assert duplicates == [] and "warning" not in output
    # A training photo copied into test under another name; a pear photo re-saved (same
    # pixels, other bytes) among the apples.
    shutil.copy(root / "train/rgb/apple/apple0.png", root / "test/rgb/apple/copy.png")
    Image.open(root / "train/rgb/pear/pear1.png").save(root / "train/rgb/apple/pear1.png",
                                                     compress_level=0)
    assert (root / "train/rgb/apple/pear1.png").read_bytes() != (
        root / "train/rgb/pear/pear1.png").read_bytes()
    duplicates, output = check(root, spec)
    assert sorted(map(sorted, duplicates)) == [
        ["test/apple: test/rgb/apple/copy.png", "train/apple: train/rgb/apple/apple0.png"],
        ["train/apple: train/rgb/apple/pear1.png", "train/pear: train/rgb/pear/pear1.png"],
    ]
    warning = next(line for line in output.splitlines() if line.startswith("warning"))
    assert "2 sets of photos with the same pixels in two splits or two classes" in warning
    assert "test/rgb/apple/copy.png" in warning and "train/rgb/pear/pear1.png" in warning


def test_the_first_three_sets_are_named_and_the_rest_counted(spec, tmp_path: Path):
    root = photo_set(tmp_path / "photos", COUNTS)
    for i in range(2):
        for label in ("apple", "pear"):
            shutil.copy(root / f"val/rgb/{label}/{label}{i}.png",
                        root / f"test/rgb/{label}/from_val{i}.png")
    duplicates, output = check(root, spec)
    assert len(duplicates) == 4
    warning = next(line for line in output.splitlines() if line.startswith("warning"))
    assert warning.count("from_val") == 3 and "; and 1 more (" in warning


def test_the_same_photo_twice_in_one_class_of_one_split_is_no_warning(spec, tmp_path: Path):
    root = photo_set(tmp_path / "photos", COUNTS)
    shutil.copy(root / "train/rgb/apple/apple0.png", root / "train/rgb/apple/again.png")
    duplicates, output = check(root, spec)
    assert duplicates == [] and "warning" not in output


def test_resize_is_a_checked_train_key(tmp_path: Path):
    study = tmp_path / "s.toml"
    text = ('[study]\nname = "s"\n[data]\nroot = "{root}"\n[train]\n{resize}'
            '[space]\nbackbone = ["b0"]\n')
    study.write_text(text.format(root=tmp_path, resize=""))
    assert read_study_file(str(study)).train.resize == "center_crop"
    study.write_text(text.format(root=tmp_path, resize='resize = "pad"\n'))
    assert read_study_file(str(study)).train.resize == "pad"
    study.write_text(text.format(root=tmp_path, resize='resize = "stretch"\n'))
    with pytest.raises(ConfigError) as error:
        read_study_file(str(study))
    assert "train.resize" in str(error.value) and "'center_crop'" in str(error.value)
    # The config's choices are the decoder's (config.py may not import search.data).
    assert get_args(TrainConfig.model_fields["resize"].annotation) == RESIZE_MODES
    assert TrainConfig().resize == DEFAULT_RESIZE
