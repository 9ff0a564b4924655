"""Bad data sets: each is one DataError line naming the first files and the count."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from search.data.cache import load_split_arrays
from search.data.index import load_index
from search.errors import DataError, UserError

BOTH = {"train": {"apple": 6, "pear": 4}, "val": {"apple": 2, "pear": 2}}


def test_missing_root(spec, one_line, tmp_path: Path):
    with pytest.raises(DataError) as error:
        load_index(spec(tmp_path / "nowhere"), seed=0)
    one_line(error, "data root not found", str(tmp_path / "nowhere"))
    assert isinstance(error.value, UserError) and error.value.exit_code == 2


def test_no_training_split(spec, one_line, tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as error:
        load_index(spec(tmp_path / "empty"), seed=0)
    one_line(error, "no training split", "train/rgb/<class>")


def test_corrupt_images_are_named_when_decoded(make_folders, spec, one_line, tmp_path: Path):
    root = make_folders()
    (root / "train/rgb/apple/apple1.png").write_bytes(b"not a png at all")
    good = (root / "train/rgb/pear/pear0.png").read_bytes()
    (root / "val/rgb/pear/pear1.png").write_bytes(good[: len(good) // 2])  # truncated
    index = load_index(spec(root), seed=0)
    with pytest.raises(DataError) as error:
        load_split_arrays(index, 8, tmp_path / "cache")
    one_line(error, "2 unreadable or corrupt images", "apple1.png", "pear1.png")
    # Nothing half-built is left behind, and a fixed data set then loads.
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    (root / "train/rgb/apple/apple1.png").write_bytes(good)
    (root / "val/rgb/pear/pear1.png").write_bytes(good)
    load_split_arrays(load_index(spec(root), seed=0), 8, tmp_path / "cache")


def test_missing_depth_files(make_folders, spec, one_line):
    root = make_folders(BOTH)
    for name in ("apple0", "apple1", "apple2", "apple3"):
        (root / f"train/depth/apple/{name}.png").unlink()
    with pytest.raises(DataError) as error:
        load_index(spec(root, modalities=["rgb", "depth"]), seed=0)
    message = one_line(error, "4 images without a depth file", "train/depth/apple/apple0.png")
    assert "and 1 more" in message  # three named, the rest counted


def test_missing_labels_file(make_folders, spec, one_line):
    root = make_folders(BOTH)
    (root / "val/labels/pear/pear1.json").unlink()
    with pytest.raises(DataError) as error:
        load_index(spec(root, modalities=["rgb", "text"]), seed=0)
    one_line(error, "1 images without a labels file", "val/labels/pear/pear1.json")


def test_class_missing_from_train(make_folders, spec, one_line):
    root = make_folders({**BOTH, "test": {"apple": 1, "plum": 2}})
    with pytest.raises(DataError) as error:
        load_index(spec(root), seed=0)
    one_line(error, "2 samples of a class that is not in the training split", "plum0.png", "plum")


def test_one_class_only(make_folders, spec, one_line):
    root = make_folders({"train": {"apple": 5}})
    with pytest.raises(DataError) as error:
        load_index(spec(root), seed=0)
    one_line(error, "at least 2 classes", "found 1: apple")


def test_class_without_training_image(make_folders, spec, one_line):
    root = make_folders(BOTH)
    (root / "train/rgb/plum").mkdir()
    with pytest.raises(DataError) as error:
        load_index(spec(root), seed=0)
    one_line(error, "1 training class folders without an image", "train/rgb/plum/")


def test_stray_files(make_folders, spec, one_line):
    root = make_folders(BOTH)
    (root / "train/rgb/apple/notes.txt").write_text("hello")
    with pytest.raises(DataError) as error:
        load_index(spec(root), seed=0)
    one_line(error, "1 files that are not .png/.jpg/.jpeg images", "train/rgb/apple/notes.txt")
    (root / "train/rgb/apple/notes.txt").unlink()
    (root / "train/rgb/loose.png").write_bytes(b"")
    with pytest.raises(DataError) as error:
        load_index(spec(root), seed=0)
    one_line(error, "1 files outside a class folder", "train/rgb/loose.png")


@pytest.mark.parametrize(
    ("numeric", "needle"),
    [
        ([1.0, 2.0, 3.0], "numeric entries unlike the first one (keys width, weight)"),
        ({"width": 1.0}, "numeric entries unlike the first one (keys width, weight)"),
        ({"width": 1.0, "height": 2.0}, "unlike the first one"),
        ({"width": "wide", "weight": 1.0}, "non-numeric or non-finite"),
        ({"width": True, "weight": 1.0}, "non-numeric or non-finite"),
        ([], "empty, non-numeric"),
        ("12", "empty, non-numeric"),
    ],
)
def test_inconsistent_numeric_entries(make_folders, spec, one_line, numeric, needle):
    root = make_folders(BOTH)
    for name in ("pear2", "pear3"):
        path = root / f"train/labels/pear/{name}.json"
        path.write_text(json.dumps({"numeric": numeric, "text": ""}))
    with pytest.raises(DataError) as error:
        load_index(spec(root, modalities=["rgb", "numeric"]), seed=0)
    one_line(error, needle, "2 ", "train/labels/pear/pear2.json", "pear3.json")


def test_numeric_lists_of_different_lengths(make_folders, spec, one_line):
    root = make_folders(BOTH)
    for path in sorted(root.glob("*/labels/*/*.json")):
        path.write_text(json.dumps({"numeric": [1.0, 2.0], "text": ""}))
    (root / "val/labels/apple/apple1.json").write_text('{"numeric": [1.0], "text": ""}')
    with pytest.raises(DataError) as error:
        load_index(spec(root, modalities=["rgb", "numeric"]), seed=0)
    one_line(error, "1 numeric entries unlike the first one (2 values)", "val/labels/apple/apple1")


def test_malformed_json_names_file_and_line(make_folders, spec, one_line):
    root = make_folders(BOTH)
    (root / "train/labels/apple/apple4.json").write_text('{\n  "numeric": [1,\n  "text": }')
    with pytest.raises(DataError) as error:
        load_index(spec(root, modalities=["rgb", "numeric"]), seed=0)
    one_line(error, "1 malformed labels files", "train/labels/apple/apple4.json line 3")


def test_labels_without_the_modality_key(make_folders, spec, one_line):
    root = make_folders(BOTH)
    (root / "train/labels/apple/apple4.json").write_text('{"numeric": [1, 2]}')
    with pytest.raises(DataError) as error:
        load_index(spec(root, modalities=["rgb", "text"]), seed=0)
    one_line(error, "malformed labels files", "apple4.json: needs the keys text")


def _edit_csv(root: Path, split: str, line: int, text: str) -> None:
    path = root / f"{split}.csv"
    lines = path.read_text().splitlines()
    lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("img/train/apple0.png,apple", "train.csv line 3: expected 6 fields"),
        ("img/train/apple0.png,apple,dep/train/apple0.png,x,1,t", "train.csv line 3: could not"),
        ("img/train/gone.png,apple,dep/train/apple0.png,1,1,t", "missing image files"),
        (",apple,dep/train/apple0.png,1,1,t", "train.csv line 3: empty image or label"),
    ],
)
def test_bad_csv_rows_name_file_and_line(make_csv, spec, one_line, line, needle):
    root = make_csv(BOTH)
    _edit_csv(root, "train", 3, line)
    with pytest.raises(DataError) as error:
        load_index(spec(root, format="csv", modalities=["rgb", "numeric"]), seed=0)
    one_line(error, "1 ", needle)


def test_csv_missing_depth_file_and_column(make_csv, spec, one_line):
    root = make_csv(BOTH)
    (root / "dep/val/pear1.png").unlink()
    with pytest.raises(DataError) as error:
        load_index(spec(root, format="csv", modalities=["rgb", "depth"]), seed=0)
    one_line(error, "1 images without a depth file", "val.csv line 5", "dep/val/pear1.png")

    _edit_csv(root, "val", 1, "image,label,num_width,num_weight,text")
    with pytest.raises(DataError) as error:
        load_index(spec(root, format="csv", modalities=["rgb", "depth"]), seed=0)
    one_line(error, "CSV files without a required column", "val.csv: no depth")


def test_empty_val_split(make_csv, spec, one_line):
    root = make_csv(BOTH)
    (root / "val.csv").write_text("image,label\n")
    with pytest.raises(DataError) as error:
        load_index(spec(root, format="csv"), seed=0)
    one_line(error, "the val split", "has no samples")


def test_undecodable_csv(make_csv, spec, one_line):
    root = make_csv(BOTH)
    (root / "train.csv").write_bytes(b"image,label\n\xff\xfe,apple\n")
    with pytest.raises(DataError) as error:
        load_index(spec(root, format="csv"), seed=0)
    one_line(error, "malformed CSV files", "train.csv")


def test_unwritable_cache_is_a_data_error(make_folders, spec, one_line, tmp_path: Path):
    root = make_folders(BOTH)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache directory should be")
    index = load_index(spec(root), seed=0)
    with pytest.raises(DataError) as error:
        load_split_arrays(index, 8, blocker / "cache")
    one_line(error, "cannot use the cache directory", str(blocker / "cache"))
    shutil.rmtree(root)
