"""``search predict`` reads real inputs as training does: BOM CSVs, bundles of every age."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from search.bundle.predict import Bundle, check_meta, csv_samples, load_pixels
from search.data.decode import Preprocess, bundle_preprocess_section, decode_image
from search.errors import BundleError


def bundle(names: tuple[str, ...] = ("rgb", "numeric")) -> Bundle:
    prep = Preprocess(8, numeric_mean=(0.0, 0.0), numeric_std=(1.0, 1.0),
                      numeric_names=("width", "weight"))
    meta = {"labels": {"0": "apple", "1": "pear"},
            "inputs": [{"name": n, "modality": n, "dtype": "float32"} for n in names],
            "preprocess": bundle_preprocess_section(prep.to_dict(), names)}
    return Bundle(Path("no-bundle"), meta, session=None)  # reading samples needs no session


def write_images(folder: Path) -> None:
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / name)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig"])
def test_a_csv_with_a_byte_order_mark_and_padded_cells_reads_as_a_plain_one(encoding, tmp_path):
    write_images(tmp_path)
    (tmp_path / "p.csv").write_text(
        " image , label ,num_width, num_weight\n a.png , apple ,1, 2\nb.png,pear , 3 ,4\n",
        encoding=encoding)
    samples = csv_samples(tmp_path / "p.csv", bundle())
    assert [(s.rgb, s.label, s.numeric) for s in samples] == [
        (tmp_path / "a.png", "apple", [1.0, 2.0]), (tmp_path / "b.png", "pear", [3.0, 4.0])]


def test_a_bundle_from_before_resize_modes_is_squashed(tmp_path):
    pixels = np.zeros((8, 16, 3), np.uint8)
    pixels[:, :4] = 255
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    old = {"resolution": 8, "resize": "bilinear, straight to resolution x resolution "
           "(no crop, no padding)", "depth": {"mode": "L"}}
    got = load_pixels(tmp_path / "wide.png", "rgb", old)
    assert got.tobytes() == decode_image(tmp_path / "wide.png", "rgb", 8,
                                         resize="squash").tobytes()
    assert got.tobytes() != decode_image(tmp_path / "wide.png", "rgb", 8).tobytes()


@pytest.mark.parametrize(("path", "value", "message"), [
    (("resize", "mode"), "stretch",
     "preprocess.resize.mode must be one of squash, center_crop, pad"),
    (("depth", "range"), [5, 5], "preprocess.depth.range must be null or [low, high]"),
    (("depth", "range"), "1..2", "preprocess.depth.range must be null or [low, high]"),
])
def test_a_bad_resize_mode_or_depth_range_is_one_line(path, value, message):
    meta = json.loads(json.dumps(bundle(("rgb", "depth")).meta))
    meta["preprocess"][path[0]][path[1]] = value
    with pytest.raises(BundleError) as error:
        check_meta(meta, Path("model.json"))
    assert str(error.value).startswith(f"model.json: {message}")
    assert "\n" not in str(error.value)
