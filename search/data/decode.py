"""Everything that turns a sample's files into model input, without PyTorch.

Training (the cache in :mod:`search.data.cache`, the batches in :mod:`search.data.prepared`)
and serving (``search predict``) call the same functions here, so a bundle scores what its
trial scored (tests/bundle/test_parity.py checks it byte for byte):

* :func:`read_folder_sample` and :func:`read_csv_sample` read one sample's modality files
  and values from the two data-set layouts (see README, "Data set layout");
* :func:`decode_image` decodes, EXIF-rotates and resizes an image, and scales 16-bit depth;
* :func:`normalize_pixels`, :func:`standardize_numeric` and :func:`tokenize` turn uint8
  pixels, numeric values and texts into the arrays the network takes;
* :class:`Preprocess` holds the numbers of all that and writes ``model.json``'s
  ``preprocess`` section, which :func:`normalize_pixels` and friends read back.

Imports only numpy and Pillow, so ``search predict`` runs where PyTorch is not installed.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

MODALITIES = ("rgb", "depth", "numeric", "text")
IMAGE_MODES = {"rgb": "RGB", "depth": "L"}  # Pillow mode of each image modality
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "val", "test")
# Bump when decoding changes (resampling, colour handling), so old caches are not reused.
DECODE_VERSION = 1
# ImageNet statistics, in RGB order, for images scaled to [0, 1]: what b0..b7's weights expect
# and the default. A trial uses its backbone's (models.input_normalization; lite: 0.5, 0.5).
RGB_MEAN = (0.485, 0.456, 0.406)
RGB_STD = (0.229, 0.224, 0.225)
PIXEL_SCALE = 1 / 255
DEPTH_MEAN, DEPTH_STD = 0.5, 0.25
TEXT_BUCKETS = 4096
TEXT_LENGTH = 32
_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class Preprocess:
    """How raw inputs become model inputs; stored with every checkpoint and exported."""

    resolution: int
    rgb_mean: tuple[float, ...] = RGB_MEAN
    rgb_std: tuple[float, ...] = RGB_STD
    numeric_mean: tuple[float, ...] | None = None
    numeric_std: tuple[float, ...] | None = None
    numeric_names: tuple[str, ...] | None = None
    text_buckets: int = TEXT_BUCKETS
    text_length: int = TEXT_LENGTH

    def to_dict(self) -> dict:
        """The checkpoint's (and, reduced to the model's inputs, ``model.json``'s) preprocess."""
        return {
            "resolution": self.resolution,
            "channel_order": "RGB",
            "layout": "NCHW",
            "rgb": {"scale": PIXEL_SCALE, "mean": list(self.rgb_mean), "std": list(self.rgb_std)},
            "depth": {"scale": PIXEL_SCALE, "mean": DEPTH_MEAN, "std": DEPTH_STD,
                      "mode": IMAGE_MODES["depth"]},
            "numeric": None if self.numeric_mean is None else {
                "names": list(self.numeric_names or ()),
                "mean": list(self.numeric_mean), "std": list(self.numeric_std or ()),
            },
            "text": {"tokenizer": "lowercase [a-z0-9]+ words, crc32(word) % (buckets-1) + 1, "
                     "padded with 0", "buckets": self.text_buckets, "length": self.text_length},
        }


def bundle_preprocess_section(preprocess: dict, input_names: Sequence[str]) -> dict:
    """``model.json``'s ``preprocess``: :meth:`Preprocess.to_dict` reduced to the model's
    inputs, with the rules of :func:`decode_image` and :func:`tokenize` spelled out."""
    result = {key: preprocess[key] for key in ("resolution", "channel_order", "layout")}
    result["resize"] = "bilinear, straight to resolution x resolution (no crop, no padding)"
    for name in input_names:
        result[name] = dict(preprocess[name])
    if "depth" in result:
        result["depth"]["high_bit_depth"] = "16/32-bit images keep their top 8 bits (value / 256)"
    if "text" in result:
        result["text"]["truncation"] = "the first `length` words are kept"
    return result


# --- images -----------------------------------------------------------------------------

class ImageError(Exception):
    """An image that cannot be decoded; ``reason`` is one line without the path."""

    def __init__(self, reason: str, *, kind: str, missing: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind  # the exception type Pillow raised
        self.missing = missing


def decode_image(path: Path, modality: str, resolution: int) -> np.ndarray:
    """Decode one image to uint8 ``[resolution, resolution, C]`` (C = 3 for rgb, 1 for depth).

    JPEGs decode at a reduced scale when they are large, the EXIF orientation of phone
    photos is applied, 16/32-bit depth maps keep their top 8 bits (value / 256), and the
    image is resized bilinearly straight to ``resolution`` x ``resolution``.

    Raises:
        ImageError: the file is missing, or Pillow cannot decode it.
    """
    mode = IMAGE_MODES[modality]
    try:
        with Image.open(path) as image:
            # JPEG only: let libjpeg decode at a reduced scale; far faster for big photos.
            image.draft(mode, (resolution, resolution))
            image = ImageOps.exif_transpose(image)  # phone photos store rotation in EXIF
            if image.mode.startswith("I"):
                # 16/32-bit depth maps: keep the top 8 bits rather than clipping at 255.
                image = image.convert("I").point(lambda v: v * (1 / 256))
            image = image.convert(mode).resize((resolution, resolution), Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8).reshape(resolution, resolution, -1)
    except Exception as exc:  # PIL raises many types for bad files; all of them mean "corrupt"
        reason = str(exc).replace(f"'{path}'", "").replace(str(path), "").strip(" :")
        kind = type(exc).__name__
        raise ImageError(f"{kind}: {reason}" if reason else kind, kind=kind,
                         missing=isinstance(exc, FileNotFoundError)) from None


def normalize_pixels(pixels: np.ndarray, rule: dict) -> np.ndarray:
    """uint8 ``[N, H, W, C]`` -> float32 ``[N, C, H, W]``: ``(x * scale - mean) / std``.

    ``rule`` is a modality's entry of the preprocess section. The scaling divides by
    ``1 / scale`` (255), the float32 operation the training batches do on the device;
    multiplying by the rounded ``scale`` would differ in the last bit.
    """
    x = pixels.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(1 / rule["scale"])
    mean = np.asarray(rule["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(rule["std"], np.float32).reshape(1, -1, 1, 1)
    return (x - mean) / std


def standardize_numeric(values: np.ndarray, rule: dict) -> np.ndarray:
    """float32 ``[N, F]`` standardized with the training split's mean and std."""
    mean = np.asarray(rule["mean"], dtype=np.float32)
    std = np.asarray(rule["std"], dtype=np.float32)
    return ((np.asarray(values, np.float32) - mean) / std).astype(np.float32)


def tokenize(texts: Sequence[str], buckets: int, length: int) -> np.ndarray:
    """Turn texts into fixed-length int64 word ids, shape ``(len(texts), length)``.

    The rule, so that anyone can reproduce it without this package:

    1. lowercase the text (``str.lower``);
    2. words are the matches of the regex ``[a-z0-9]+``; everything else, non-ASCII letters
       included, separates words;
    3. a word's id is ``zlib.crc32(word.encode("utf-8")) % (buckets - 1) + 1``, so ids are in
       ``[1, buckets - 1]`` and 0 is left for padding;
    4. keep the first ``length`` words and pad the rest of the row with 0.

    Args:
        texts: The texts, one per sample (a sequence, not a single string).
        buckets: Number of ids including the padding id 0 (``ModelSpec.text_buckets``).
        length: Tokens per text (``ModelSpec.text_length``).

    Returns:
        An int64 array; the same input always gives the same ids, on any machine.

    Raises:
        TypeError: ``texts`` is a single string.
        ValueError: ``buckets < 2`` or ``length < 1``.
    """
    if isinstance(texts, str):
        raise TypeError("tokenize takes a sequence of texts, not a single string")
    if buckets < 2 or length < 1:
        raise ValueError(f"need buckets >= 2 and length >= 1, got {buckets} and {length}")
    ids = np.zeros((len(texts), length), dtype=np.int64)
    for row, text in enumerate(texts):
        words = _WORD.findall(text.lower())[:length]
        ids[row, : len(words)] = [zlib.crc32(w.encode("utf-8")) % (buckets - 1) + 1 for w in words]
    return ids


# --- a sample's files ---------------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    """Something wrong with one sample's files.

    ``kind`` groups problems of many samples (the data check names the first few and the
    count); ``item`` names the file or row; ``detail`` is one whole line about this sample
    alone (what ``search predict`` prints).
    """

    kind: str
    item: str
    detail: str


@dataclass
class RawSample:
    """A sample as read from its files; ``numeric`` as written (a list or an object)."""

    id: str
    label: str | None
    rgb: Path
    where: str  # what to name in a message: a file, or "train.csv line 4"
    depth: Path | None = None
    labels: Path | None = None  # the JSON file of the folders layout
    numeric: Any = None
    text: str | None = None
    problems: list[Problem] = field(default_factory=list)


def read_folder_sample(base: Path, label: str, rgb: Path, modalities: Sequence[str],
                       name: Any = str) -> RawSample:
    """The sample of ``<base>/rgb/<label>/<id>.<ext>`` and its other modalities' files.

    Depth is ``<base>/depth/<label>/<id>.png``; numeric values and text are the ``numeric``
    and ``text`` keys of ``<base>/labels/<label>/<id>.json``. ``name(path)`` is how a file
    is named in problems (the data set names them relative to its root).
    """
    sample = RawSample(id=rgb.stem, label=label, rgb=rgb, where=name(rgb))
    if "depth" in modalities:
        sample.depth = base / "depth" / label / f"{rgb.stem}.png"
        if not sample.depth.is_file():
            sample.problems.append(Problem(
                "images without a depth file", name(sample.depth),
                f"{rgb}: no depth image at {sample.depth}; the model needs depth"))
    wanted = [m for m in ("numeric", "text") if m in modalities]
    if not wanted:
        return sample
    sample.labels = base / "labels" / label / f"{rgb.stem}.json"
    where = name(sample.labels)
    unreadable = (f"{rgb}: no readable labels file at {sample.labels}; the model needs "
                  f"{' and '.join(wanted)}")
    if not sample.labels.is_file():
        sample.problems.append(Problem("images without a labels file", where, unreadable))
        return sample
    try:
        payload = json.loads(sample.labels.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        sample.problems.append(Problem("malformed labels files",
                                       f"{where} line {exc.lineno}: {exc.msg}", unreadable))
        return sample
    except (OSError, UnicodeDecodeError) as exc:
        sample.problems.append(Problem("unreadable labels files", f"{where}: {exc}", unreadable))
        return sample
    if not isinstance(payload, dict) or any(m not in payload for m in wanted):
        keys = f"needs the keys {', '.join(wanted)}"
        sample.problems.append(Problem("malformed labels files", f"{where}: {keys}",
                                       f"{sample.labels}: {keys}"))
        return sample
    sample.numeric = payload["numeric"] if "numeric" in wanted else None
    sample.text = payload["text"] if "text" in wanted else None
    if "text" in wanted and not isinstance(sample.text, str):
        sample.problems.append(Problem("malformed labels files", f"{where}: 'text' is not a string",
                                       f"{sample.labels}: 'text' is not a string"))
    return sample


def missing_csv_columns(header: Sequence[str], modalities: Sequence[str], *,
                        label: bool = True) -> list[str]:
    """The columns a CSV of the data-set layout lacks for ``modalities``."""
    needed = ["image", *(["label"] if label else []),
              *(m for m in ("depth", "text") if m in modalities)]
    missing = [c for c in needed if c not in header]
    if "numeric" in modalities and not any(c.startswith("num_") for c in header):
        missing.append("num_*")
    return missing


def read_csv_sample(root: Path, record: dict[Any, Any], header: Sequence[str], where: str,
                    modalities: Sequence[str], *, label: bool = True) -> RawSample | Problem:
    """One row of a CSV (``image, label, depth, num_*, text``; paths relative to ``root``).

    Returns the sample, whose ``problems`` list files that are missing, or a
    :class:`Problem` when the row itself is malformed. ``label=False`` makes the label
    column optional (a CSV to predict).
    """
    if None in record or any(v is None for v in record.values()):
        return Problem("malformed CSV rows", f"{where}: expected {len(header)} fields",
                       f"{where}: malformed row (wrong number of fields)")
    # Stray spaces around a value would otherwise make "apple " a class of its own.
    record = {k: v.strip() for k, v in record.items()}
    if not record["image"] or (label and not record["label"]):
        return Problem("malformed CSV rows", f"{where}: empty image or label",
                       f"{where}: malformed row (empty image)")
    rgb = root / record["image"]
    sample = RawSample(id=rgb.stem, label=record.get("label") or None, rgb=rgb, where=where)
    if not rgb.is_file():
        sample.problems.append(Problem("missing image files", f"{where}: {record['image']}",
                                       f"{rgb}: no such image"))
    if "depth" in modalities:
        sample.depth = root / record["depth"]
        if not record["depth"] or not sample.depth.is_file():
            sample.problems.append(Problem(
                "images without a depth file", f"{where}: {record['depth']!r}",
                f"{where}: no depth image at {record['depth']!r}, which the model needs"))
    if "text" in modalities:
        sample.text = record["text"]
    if "numeric" in modalities:
        try:
            sample.numeric = {c[4:]: float(record[c]) for c in header if c.startswith("num_")}
        except ValueError as exc:
            sample.problems.append(Problem("malformed CSV rows", f"{where}: {exc}",
                                           f"{where}: num_* values must be numbers"))
    return sample
