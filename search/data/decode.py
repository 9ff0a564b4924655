"""Everything that turns a sample's files into model input, without PyTorch.

Training (the cache in :mod:`search.data.cache`, the batches in :mod:`search.data.prepared`)
and serving (``search predict``) call the same functions here, so a bundle scores what its
trial scored (tests/bundle/test_parity.py checks it byte for byte):

* :func:`read_folder_sample` and :func:`read_csv_sample` read one sample's modality files
  and values from the two data-set layouts (see README, "Data set layout");
* :func:`decode_image` decodes an image to RGB (EXIF rotation, transparency on white,
  palette, grayscale, 16-bit and CMYK images), fits it to a square by ``resize`` (squash,
  center crop or pad) and scales depth into the range fitted on the training split;
* :func:`fit_depth_range` fits that range; :func:`csv_reader` reads the CSV layout;
* :func:`normalize_pixels`, :func:`standardize_numeric` and :func:`tokenize` turn uint8
  pixels, numeric values and texts into the arrays the network takes;
* :class:`Preprocess` holds the numbers of all that and writes ``model.json``'s
  ``preprocess`` section, which :func:`normalize_pixels` and friends read back.

Imports only numpy and Pillow, so ``search predict`` runs where PyTorch is not installed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from PIL import Image, ImageOps

MODALITIES = ("rgb", "depth", "numeric", "text")
IMAGE_MODES = {"rgb": "RGB", "depth": "L"}  # Pillow mode of each image modality
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "val", "test")
# Bump when decoding changes (resampling, colour handling), so old caches are not reused.
# 2: transparency composited on white, center crop / pad, depth range.
DECODE_VERSION = 2
# How a non-square image becomes resolution x resolution ([train] resize).
RESIZE_MODES = ("squash", "center_crop", "pad")
DEFAULT_RESIZE = "center_crop"  # what timm does at evaluation: short side, then center crop
RESIZE_RULES = {
    "squash": "bilinear, straight to resolution x resolution (the aspect ratio is not kept)",
    "center_crop": "crop the centered square (side = min(width, height), left = (width - side) "
                   "// 2, top = (height - side) // 2), then resize it bilinearly to resolution "
                   "x resolution: the short side resized to resolution, the center cropped",
    "pad": "the long side resized bilinearly to resolution (short side round(short * "
           "resolution / long)), centered on a resolution x resolution canvas of 0 (black "
           "for rgb, 0 for depth); the offset is (resolution - size) // 2",
}
# Depth maps: the percentiles of the training split's depth values that become 0 and 255.
DEPTH_PERCENTILES = (1.0, 99.0)
# Pixels per training depth map that enter the fit (a fixed stride over the resized map).
_DEPTH_FIT_PIXELS = 4096
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
    resize: str = DEFAULT_RESIZE
    depth_range: tuple[float, float] | None = None  # None: 8-bit depth used as it is
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
            "resize": self.resize,
            "channel_order": "RGB",
            "layout": "NCHW",
            "rgb": {"scale": PIXEL_SCALE, "mean": list(self.rgb_mean), "std": list(self.rgb_std)},
            "depth": {"scale": PIXEL_SCALE, "mean": DEPTH_MEAN, "std": DEPTH_STD,
                      "mode": IMAGE_MODES["depth"],
                      "range": None if self.depth_range is None else list(self.depth_range)},
            "numeric": None if self.numeric_mean is None else {
                "names": list(self.numeric_names or ()),
                "mean": list(self.numeric_mean), "std": list(self.numeric_std or ()),
            },
            "text": {"tokenizer": "lowercase [a-z0-9]+ words, crc32(word) % (buckets-1) + 1, "
                     "padded with 0", "buckets": self.text_buckets, "length": self.text_length},
        }


def bundle_preprocess_section(preprocess: dict, input_names: Sequence[str]) -> dict:
    """``model.json``'s ``preprocess``: :meth:`Preprocess.to_dict` reduced to the model's
    inputs, with the rules of :func:`decode_image` and :func:`tokenize` spelled out.

    Checkpoints written before ``resize`` and the depth range existed were squashed and
    kept the top 8 bits of 16-bit depth; their bundles say so.
    """
    result = {key: preprocess[key] for key in ("resolution", "channel_order", "layout")}
    mode = preprocess.get("resize", "squash")
    result["resize"] = {"mode": mode, "rule": RESIZE_RULES[mode]}
    result["decode"] = ("apply the EXIF orientation; images with transparency (RGBA, LA, "
                        "palette with transparency) are composited on white; palette, "
                        "grayscale and CMYK images are converted to RGB by Pillow; 16-bit "
                        "grayscale rgb images keep their top 8 bits (value / 256)")
    for name in input_names:
        result[name] = dict(preprocess[name])
    if "depth" in result:
        depth = result["depth"]
        depth["range"] = depth.get("range")
        if depth["range"] is None:
            depth["values"] = ("8-bit depth as it is; 16/32-bit depth keeps its top 8 bits "
                               "(value / 256), resized as 8-bit")
        else:
            depth["values"] = ("the raw values v (any bit depth, as 32-bit floats) are resized "
                               "bilinearly as floats, then stored as uint8 clip(rint((v - low) "
                               "* float32(255 / (high - low))), 0, 255) in float32, with "
                               "[low, high] = range (the 1st and 99th percentiles of the "
                               "training split's non-zero depth values)")
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


def decode_image(path: Path, modality: str, resolution: int, *, resize: str = DEFAULT_RESIZE,
                 depth_range: tuple[float, float] | None = None) -> np.ndarray:
    """Decode one image to uint8 ``[resolution, resolution, C]`` (C = 3 for rgb, 1 for depth).

    JPEGs decode at a reduced scale when they are large and the EXIF orientation of phone
    photos is applied. An rgb image becomes RGB as :func:`_to_rgb` says. Depth without a
    ``depth_range`` keeps today's 8-bit rule (16/32-bit maps keep their top 8 bits); with
    one, the raw values are resized as floats and ``[low, high]`` is stretched to 0..255,
    so 16-bit millimetres keep 256 levels over the scene instead of the few their top
    byte holds. ``resize`` (:data:`RESIZE_MODES`) decides how a non-square image becomes
    square; a square image is resized bilinearly whatever it says.

    Raises:
        ImageError: the file is missing, or Pillow cannot decode it.
    """
    if resize not in RESIZE_RULES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    mode = IMAGE_MODES[modality]
    try:
        with Image.open(path) as file:
            # JPEG only: let libjpeg decode at a reduced scale; far faster for big photos.
            file.draft(mode, (resolution, resolution))
            image = ImageOps.exif_transpose(file)  # phone photos store rotation in EXIF
            if modality == "depth" and depth_range is not None:
                values = _fit_square(_as_float(image), resolution, resize)
                return scale_depth(np.asarray(values, np.float32), depth_range)[..., None]
            image = _top_8_bits(image)
            image = _to_rgb(image) if modality == "rgb" else image.convert(mode)
            image = _fit_square(image, resolution, resize)
            return np.asarray(image, dtype=np.uint8).reshape(resolution, resolution, -1)
    except Exception as exc:  # PIL raises many types for bad files; all of them mean "corrupt"
        reason = str(exc).replace(f"'{path}'", "").replace(str(path), "").strip(" :")
        kind = type(exc).__name__
        raise ImageError(f"{kind}: {reason}" if reason else kind, kind=kind,
                         missing=isinstance(exc, FileNotFoundError)) from None


def pixel_hash(path: Path) -> str:
    """A hash of the image's full-size RGB pixels as :func:`decode_image` sees them (before
    resizing): two files with the same pixels have the same hash, whatever their names.

    Raises:
        ImageError: the file is missing, or Pillow cannot decode it.
    """
    try:
        with Image.open(path) as file:
            image = _to_rgb(_top_8_bits(ImageOps.exif_transpose(file)))
            digest = hashlib.blake2b(f"{image.size}".encode(), digest_size=16)
            digest.update(image.tobytes())
            return digest.hexdigest()
    except Exception as exc:  # as in decode_image: every Pillow error means "corrupt"
        kind = type(exc).__name__
        raise ImageError(kind, kind=kind, missing=isinstance(exc, FileNotFoundError)) from None


def _top_8_bits(image: Image.Image) -> Image.Image:
    """16/32-bit integer images keep their top 8 bits (value / 256) rather than clipping."""
    if image.mode.startswith("I"):
        return image.convert("I").point(lambda v: v * (1 / 256))
    return image


def _as_float(image: Image.Image) -> Image.Image:
    """The raw values of a one-channel image as 32-bit floats (mode F), whatever its bit depth."""
    if image.mode.startswith("I;16"):
        image = image.convert("I")  # Pillow converts I;16 to F only through I
    return image.convert("F")


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB as a viewer shows the image: transparency composited on white.

    A transparent pixel's colour channels are whatever the editor left there (often black,
    sometimes the removed background), not what anyone sees; cut-out product photos are
    viewed, and usually photographed, on white. Palette, grayscale (L, I;16) and CMYK
    images are converted by Pillow (CMYK: Pillow's naive formula, Adobe's inverted CMYK
    JPEGs included).
    """
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
            image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _fit_square(image: Image.Image, resolution: int, resize: str) -> Image.Image:
    """``image`` as ``resolution`` x ``resolution``, by :data:`RESIZE_RULES`."""
    width, height = image.size
    size = (resolution, resolution)
    if resize == "squash" or width == height:
        return image.resize(size, Image.Resampling.BILINEAR)
    if resize == "center_crop":
        # Cropping the central square and resizing it is resizing the short side and cropping
        # the center, without resampling twice; integer offsets, so any client can repeat it.
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return image.crop((left, top, left + side, top + side)).resize(
            size, Image.Resampling.BILINEAR)
    long = max(width, height)
    inner = (max(1, round(width * resolution / long)), max(1, round(height * resolution / long)))
    canvas = Image.new(image.mode, size, 0)
    canvas.paste(image.resize(inner, Image.Resampling.BILINEAR),
                 ((resolution - inner[0]) // 2, (resolution - inner[1]) // 2))
    return canvas


def scale_depth(values: np.ndarray, depth_range: Sequence[float]) -> np.ndarray:
    """float32 depth values -> uint8 with ``[low, high]`` stretched to ``0..255`` (clipped)."""
    low, high = (float(v) for v in depth_range)
    factor = np.float32(255 / (high - low))
    scaled = np.rint((values.astype(np.float32) - np.float32(low)) * factor)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def is_high_bit_depth(path: Path) -> bool:
    """Whether an image stores more than 8 bits per value (16-bit PNG, 32-bit int or float)."""
    with Image.open(path) as image:
        return image.mode.startswith("I") or image.mode == "F"


def fit_depth_range(paths: Iterable[Path], resolution: int, resize: str = DEFAULT_RESIZE
                    ) -> tuple[float, float] | None:
    """The 1st and 99th percentiles of the depth values of ``paths`` (the training split).

    Returns None when every map is 8-bit: those were already scaled to 0..255 by whoever
    wrote them, and stretching them again would only re-quantize (today's behaviour stays).
    The values are taken from the maps resized to ``resolution`` as the cache resizes them
    (a fixed stride of up to 4096 pixels each); zeros are left out, since depth sensors
    write 0 where they have no reading.

    Raises:
        ImageError: a map cannot be decoded.
    """
    paths = list(paths)
    if not any(is_high_bit_depth(p) for p in paths):
        return None
    samples = []
    for path in paths:
        try:
            with Image.open(path) as file:
                image = ImageOps.exif_transpose(file)
                values = np.asarray(_fit_square(_as_float(image), resolution, resize),
                                    np.float32).ravel()
        except Exception as exc:  # the cache's decoder names the file; here one line is enough
            raise ImageError(f"{type(exc).__name__}: {exc}", kind=type(exc).__name__) from None
        stride = max(1, values.size // _DEPTH_FIT_PIXELS)
        samples.append(values[::stride])
    values = np.concatenate(samples)
    values = values[values != 0]
    if values.size == 0:
        return None
    low, high = (float(v) for v in np.percentile(values, DEPTH_PERCENTILES))
    if high <= low:  # a flat scene: any range that holds it
        high = low + 1.0
    return low, high


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


CSV_ENCODING = "utf-8-sig"  # a spreadsheet's byte-order mark is not part of the first name


def csv_reader(handle: TextIO) -> csv.DictReader:
    """A DictReader on a CSV of the data-set layout, opened with :data:`CSV_ENCODING`.

    Column names are stripped like the values (:func:`read_csv_sample`), so ``" label"``
    is the label column; training and ``search predict`` both read through here.
    """
    reader = csv.DictReader(handle)
    if reader.fieldnames is not None:
        reader.fieldnames = [name.strip() for name in reader.fieldnames]
    return reader


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
