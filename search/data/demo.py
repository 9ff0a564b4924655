"""The built-in demo data sets: drawn on first use by :func:`ensure_demo`.

This module draws the apples (``data.demo = "apples"``); :mod:`search.data.demo_garbage` the
garbage set. The apples are procedurally drawn apples of five varieties.

Each sample has an RGB photo, a depth map and measurements (diameter, height, weight,
firmness) with a picker's note. The classes are imbalanced like orchard data (500 /
250 / 150 / 90 / 50). ``fuji`` and ``rockit`` are drawn from the *same* colour and
pattern distribution and appear at the same random size in the picture (the camera
distance varies), so RGB alone cannot tell them apart: a rockit is a miniature apple
(about 50 mm against 84 mm) with a taller, rounder dome. The measurements say so
directly, and the depth map does too: its background level gives the camera distance,
which with the apparent size gives the true size, and the dome's height and profile
differ. The other three varieties differ in colour, stripes and speckles.

Everything comes from a seeded NumPy generator per sample, so a seed always gives
byte-identical files.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
from filelock import FileLock
from PIL import Image, ImageDraw

from search.errors import DataError

NUMERIC_NAMES = ("diameter_mm", "height_mm", "weight_g", "firmness_kg")
_FOCAL = 2.2  # apparent radius (fraction of the image) = _FOCAL * true radius / distance
_NEAR_MM, _FAR_MM = 100.0, 600.0  # depth 255 at _NEAR_MM, 0 at _FAR_MM
_SPLIT_FRACTIONS = (("test", 0.15), ("val", 0.15))
_BACKGROUNDS = ((120, 86, 52), (92, 110, 64), (150, 150, 146), (226, 222, 210), (70, 90, 120))
_NOTES = ("firm", "crisp", "a bit soft", "clean skin", "slight russet", "small bruise", "stem on")


@dataclass(frozen=True)
class Variety:
    """How a variety looks (RGB), how big it is and how it is shaped in 3D."""

    name: str
    count: int
    skin: tuple[int, int, int]
    overlay: tuple[int, int, int]  # colour of stripes and blush
    stripes: float  # strength of the red streaks, 0..1
    stripe_freq: tuple[float, float]
    blush: float  # strength of the cheek blush, 0..1
    speckles: tuple[int, int]  # lenticel count range
    speckle_colour: tuple[int, int, int]
    aspect: tuple[float, float]  # outline width / height
    lobes: float  # amplitude of the five-lobed outline
    diameter_mm: tuple[float, float]  # mean, sd
    height_ratio: float  # height / diameter
    dome: float  # depth profile (1 - r^2) ** dome: small is flat-topped, 0.5 a sphere
    firmness_kg: tuple[float, float]


_FUJI = Variety(
    "fuji", 250, skin=(214, 196, 104), overlay=(198, 66, 86), stripes=0.3,
    stripe_freq=(8, 12), blush=0.85, speckles=(15, 30), speckle_colour=(238, 224, 170),
    aspect=(0.9, 1.06), lobes=0.02, diameter_mm=(84, 4), height_ratio=0.78, dome=0.3,
    firmness_kg=(7.4, 0.9),
)  # fmt: skip
VARIETIES: tuple[Variety, ...] = (
    Variety(
        "gala", 500, skin=(230, 182, 70), overlay=(192, 44, 34), stripes=0.9,
        stripe_freq=(16, 26), blush=0.25, speckles=(4, 12), speckle_colour=(240, 220, 150),
        aspect=(0.94, 1.06), lobes=0.01, diameter_mm=(70, 4), height_ratio=0.9, dome=0.5,
        firmness_kg=(7.4, 0.9),
    ),
    _FUJI,
    Variety(
        "granny_smith", 150, skin=(118, 186, 70), overlay=(160, 170, 60), stripes=0.0,
        stripe_freq=(8, 12), blush=0.15, speckles=(30, 60), speckle_colour=(232, 244, 214),
        aspect=(0.94, 1.06), lobes=0.0, diameter_mm=(73, 4), height_ratio=0.92, dome=0.5,
        firmness_kg=(7.9, 0.9),
    ),
    Variety(
        "golden_delicious", 90, skin=(226, 206, 86), overlay=(222, 150, 66), stripes=0.0,
        stripe_freq=(8, 12), blush=0.3, speckles=(30, 60), speckle_colour=(140, 110, 50),
        aspect=(0.84, 0.94), lobes=0.04, diameter_mm=(71, 4), height_ratio=0.95, dome=0.6,
        firmness_kg=(7.0, 0.9),
    ),
    # Same picture as fuji; only true size and 3D shape differ (see the module docstring).
    replace(
        _FUJI, name="rockit", count=50, diameter_mm=(50, 3), height_ratio=1.0, dome=0.62,
        firmness_kg=(7.8, 0.9),
    ),
)  # fmt: skip


class DemoSpec(Protocol):
    """What :func:`ensure_demo` reads from the study's ``[data]`` table."""

    root: Path

    # Read-only properties, so that DataConfig's Literal-typed fields satisfy them.
    @property
    def format(self) -> str: ...
    @property
    def demo(self) -> str | None: ...


@dataclass(frozen=True)
class _Scene:
    """One photo: the apple's true size, the camera distance, where the apple lies."""

    canvas: int  # image side, pixels
    diameter: float  # mm
    height: float  # mm
    distance: float  # camera to table, mm
    cx: float  # centre and half-axes, pixels
    cy: float
    rx: float
    ry: float
    angle: float
    lobe_phase: float


@dataclass(frozen=True)
class _Shape:
    """The canvas box the apple can cover and, for its pixels, apple coordinates."""

    box: tuple[slice, slice]
    u: np.ndarray  # along the apple's axes, in half-axes
    w: np.ndarray
    rho: np.ndarray  # 1 on the outline


def _scene(variety: Variety, rng: np.random.Generator, size: int) -> _Scene:
    diameter = max(30.0, rng.normal(*variety.diameter_mm))
    # The picker frames each apple, so its size in the picture says nothing of its real
    # size; the camera distance is whatever that framing needs.
    radius_frac = rng.uniform(0.2, 0.33)
    aspect = rng.uniform(*variety.aspect)
    cx, cy = rng.uniform(radius_frac + 0.06, 0.94 - radius_frac, size=2) * size
    return _Scene(
        canvas=size,
        diameter=diameter,
        height=diameter * variety.height_ratio * rng.uniform(0.95, 1.05),
        distance=_FOCAL * (diameter / 2) / radius_frac,
        cx=float(cx),
        cy=float(cy),
        rx=radius_frac * size * math.sqrt(aspect),
        ry=radius_frac * size / math.sqrt(aspect),
        angle=rng.uniform(0, 2 * math.pi),
        lobe_phase=rng.uniform(0, 2 * math.pi),
    )


@functools.cache
def _grid(canvas: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), float32 for speed; shared, so never written to."""
    yy, xx = np.mgrid[0:canvas, 0:canvas].astype(np.float32) + np.float32(0.5)
    return yy, xx


def _shape(scene: _Scene, lobes: float, box: tuple[slice, slice] | None = None) -> _Shape:
    """Apple coordinates of the pixels in ``box`` (by default, all the apple can cover)."""
    if box is None:
        reach = max(scene.rx, scene.ry) * (1 + lobes) + 2
        low = [max(0, int(c - reach)) for c in (scene.cy, scene.cx)]
        high = [min(scene.canvas, int(c + reach) + 1) for c in (scene.cy, scene.cx)]
        box = (slice(low[0], high[0]), slice(low[1], high[1]))
    yy, xx = (g[box] for g in _grid(scene.canvas))
    dx, dy = xx - np.float32(scene.cx), yy - np.float32(scene.cy)
    cos, sin = np.float32(math.cos(scene.angle)), np.float32(math.sin(scene.angle))
    u = (dx * cos + dy * sin) / np.float32(scene.rx)
    w = (-dx * sin + dy * cos) / np.float32(scene.ry)
    rho = np.hypot(u, w)
    if lobes:
        rho /= 1 + np.float32(lobes) * np.cos(5 * np.arctan2(w, u) + np.float32(scene.lobe_phase))
    return _Shape(box, u, w, rho)


def _to_image(scene: _Scene, u: float, w: float) -> tuple[float, float]:
    """Canvas pixel of the apple-local point (u, w)."""
    x, y = u * scene.rx, w * scene.ry
    cos, sin = math.cos(scene.angle), math.sin(scene.angle)
    return scene.cx + x * cos - y * sin, scene.cy + x * sin + y * cos


def _background(rng: np.random.Generator, canvas: int) -> np.ndarray:
    """A table, crate or tray: a colour, blotchy texture, sometimes wood grain."""
    colour = np.array(_BACKGROUNDS[rng.integers(len(_BACKGROUNDS))], np.float32)
    colour += rng.normal(0, 12, size=3).astype(np.float32)
    blotches = Image.fromarray(rng.normal(0, 1, size=(5, 5)).astype(np.float32))
    shade = 1 + 0.08 * np.asarray(blotches.resize((canvas, canvas), Image.Resampling.BICUBIC))
    if rng.random() < 0.4:
        rows = np.arange(canvas, dtype=np.float32)
        shade = shade + 0.06 * np.sin(rows * rng.uniform(0.3, 0.8) + rng.uniform(0, 6))[:, None]
    return colour * shade[..., None]


def _skin(variety: Variety, rng: np.random.Generator, shape: _Shape) -> np.ndarray:
    """Skin colour with streaks (running stem to calyx) and a blushed cheek."""
    u, w = shape.u, shape.w
    skin = (np.array(variety.skin) + rng.normal(0, 8, size=3)).astype(np.float32)
    overlay = (np.array(variety.overlay) + rng.normal(0, 8, size=3)).astype(np.float32)
    # Streaks follow meridians: the angle across the apple at each height.
    across = np.clip(u / np.sqrt(np.clip(1 - w**2, 1e-3, 1)), -1, 1)
    wobble = 0.6 * np.sin(3 * w + rng.uniform(0, 6))
    streak = 0.5 + 0.5 * np.sin(rng.uniform(*variety.stripe_freq) * np.arcsin(across) + wobble)
    bx, by = (float(c) for c in rng.uniform(-0.5, 0.5, size=2))
    cheek = np.exp(-((u - bx) ** 2 + (w - by) ** 2) / (2 * rng.uniform(0.4, 0.8) ** 2))
    mix = variety.stripes * streak**2 + variety.blush * cheek * (0.7 + 0.3 * streak)
    mix = np.clip(mix * rng.uniform(0.8, 1.1), 0, 1)[..., None]
    return skin * (1 - mix) + overlay * mix


def _speckles(variety: Variety, scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    """Lenticels: small dots drawn with ImageDraw; returns their coverage, 0..1."""
    layer = Image.new("L", (scene.canvas, scene.canvas), 0)
    draw = ImageDraw.Draw(layer)
    for _ in range(rng.integers(*variety.speckles)):
        theta, r = rng.uniform(0, 2 * math.pi), 0.9 * math.sqrt(rng.random())
        x, y = _to_image(scene, r * math.cos(theta), r * math.sin(theta))
        size = rng.uniform(0.2, 0.55) * scene.canvas / 64
        draw.ellipse((x - size, y - size, x + size, y + size), fill=int(rng.integers(150, 230)))
    return np.asarray(layer, dtype=np.float32)[..., None] / np.float32(255)


def _shade(
    colour: np.ndarray, shape: _Shape, light: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Lambert shading of a dome plus a specular highlight; ``light`` in apple axes."""
    radial = np.clip(shape.rho, 0, 1)
    nz = np.sqrt(1 - radial**2)
    scale = np.maximum(np.hypot(shape.u, shape.w), 1e-6) / np.maximum(radial, 1e-6)
    nx, ny = shape.u / scale, shape.w / scale
    lx, ly, lz = light.tolist()
    diffuse = np.clip(nx * lx + ny * ly + nz * lz, 0, 1)
    half = light + np.array([0.0, 0.0, 1.0])  # Blinn's half vector (light is an array)
    hx, hy, hz = half / np.linalg.norm(half)
    spec = np.clip(nx * hx + ny * hy + nz * hz, 0, 1) ** rng.uniform(20, 60)
    return colour * (0.3 + 0.8 * diffuse)[..., None] + 255 * rng.uniform(0.3, 0.7) * spec[..., None]


def _stem_and_leaf(image: Image.Image, scene: _Scene, rng: np.random.Generator) -> None:
    """The stem cavity, usually a stem, sometimes a leaf."""
    draw = ImageDraw.Draw(image)
    base, tip = _to_image(scene, 0, -0.72), _to_image(scene, rng.uniform(-0.3, 0.3), -1.15)
    pit = 0.1 * scene.rx
    draw.ellipse((base[0] - pit, base[1] - pit, base[0] + pit, base[1] + pit), fill=(70, 60, 30))
    if rng.random() < 0.85:
        draw.line((base, tip), fill=(92, 64, 34), width=max(1, round(scene.rx * 0.09)))
    if rng.random() < 0.3:
        side = float(rng.choice([-1.0, 1.0]))
        ts = np.linspace(0, 1, 6)
        vein = [_to_image(scene, side * 0.25 * t, -1.15 - 0.5 * t) for t in ts]
        edge = [
            _to_image(scene, side * (0.25 * t + 0.25 * math.sin(math.pi * t)), -1.15 - 0.5 * t)
            for t in ts[::-1]
        ]
        green = (int(rng.integers(40, 80)), int(rng.integers(110, 160)), int(rng.integers(30, 60)))
        draw.polygon(vein + edge, fill=green)


def _render(
    variety: Variety, rng: np.random.Generator, size: int
) -> tuple[np.ndarray, np.ndarray, dict[str, float], str]:
    """Draw one apple: RGB [size, size, 3], depth [size, size], measurements and a note."""
    scene = _scene(variety, rng, size)
    shape = _shape(scene, variety.lobes)
    rgb = _photo(variety, rng, scene, shape)
    depth = _depth(variety, rng, scene, shape)
    return rgb, depth, _measure(variety, rng, scene), _note(rng, scene.diameter)


def _photo(variety: Variety, rng: np.random.Generator, scene: _Scene, shape: _Shape) -> np.ndarray:
    """The RGB picture: background, shadow, shaded apple, light falloff, sensor noise."""
    canvas = scene.canvas
    azimuth, elevation = rng.uniform(0, 2 * math.pi), rng.uniform(0.5, 1.1)
    turned, flat = azimuth - scene.angle, math.cos(elevation)
    light = np.array([math.cos(turned) * flat, math.sin(turned) * flat, math.sin(elevation)])
    picture = _background(rng, canvas)
    # A soft shadow cast away from the light.
    away = replace(
        scene,
        cx=scene.cx - 0.35 * scene.rx * math.cos(azimuth),
        cy=scene.cy - 0.35 * scene.ry * math.sin(azimuth),
    )
    everywhere = (slice(None), slice(None))
    shadow = np.clip(1.35 - _shape(away, 0.0, everywhere).rho, 0, 1) ** 1.5
    picture *= (1 - 0.45 * shadow)[..., None]
    skin = _skin(variety, rng, shape)
    dots = _speckles(variety, scene, rng)[shape.box]
    skin = skin * (1 - dots) + np.array(variety.speckle_colour, np.float32) * dots
    # Coverage of each edge pixel by the outline, so edges are smooth without supersampling.
    cover = np.clip((1 - shape.rho) * min(scene.rx, scene.ry) + 0.5, 0, 1)[..., None]
    apple = _shade(skin, shape, light, rng)
    picture[shape.box] = cover * apple + (1 - cover) * picture[shape.box]
    yy, xx = (g / canvas - 0.5 for g in _grid(canvas))
    tilt = rng.uniform(0, 2 * math.pi)
    falloff = 1 + rng.uniform(0, 0.5) * (xx * math.cos(tilt) + yy * math.sin(tilt))
    picture *= falloff[..., None] * np.float32(rng.uniform(0.85, 1.12))
    image = Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8))
    _stem_and_leaf(image, scene, rng)
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 2.5, (canvas, canvas, 3))
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _depth(variety: Variety, rng: np.random.Generator, scene: _Scene, shape: _Shape) -> np.ndarray:
    """8-bit depth (near is bright): a slightly tilted table and the apple's dome."""
    size = scene.canvas
    yy, xx = (g / size - 0.5 for g in _grid(size))
    gx, gy = (np.float32(g) for g in rng.normal(0, 0.04, size=2))
    table = np.float32(scene.distance) * (1 + gx * xx + gy * yy)
    dome = np.clip(1 - shape.rho**2, 0, 1) ** np.float32(variety.dome)
    table[shape.box] -= np.float32(scene.height) * dome
    depth = (_FAR_MM - table) * np.float32(255 / (_FAR_MM - _NEAR_MM))
    depth += rng.normal(0, 1.2, (size, size)).astype(np.float32)
    depth[rng.random((size, size)) < 0.002] = 0  # sensor drop-outs
    return np.clip(np.rint(depth), 0, 255).astype(np.uint8)


def _measure(variety: Variety, rng: np.random.Generator, scene: _Scene) -> dict[str, float]:
    """What the grading line measures, with its noise."""
    diameter, height = scene.diameter, scene.height
    weight = rng.uniform(0.8, 0.88) * math.pi / 6 * diameter**2 * height / 1000
    values = (
        diameter + rng.normal(0, 0.8),
        height + rng.normal(0, 0.8),
        weight,
        max(2.0, rng.normal(*variety.firmness_kg)),
    )
    return {name: round(float(v), 1) for name, v in zip(NUMERIC_NAMES, values, strict=True)}


def _note(rng: np.random.Generator, diameter: float) -> str:
    """A picker's note; its size word is an eyeballed (noisy) guess."""
    guess = diameter + rng.normal(0, 6)
    size = "small" if guess < 62 else "large" if guess > 79 else "medium"
    note = _NOTES[rng.integers(len(_NOTES))]
    return f"{size}, {note}; row {rng.integers(1, 40)} tree {rng.integers(1, 120)}"


def assign_splits(count: int, rng: np.random.Generator) -> list[str]:
    """70/15/15 of one class, at least one sample in each split."""
    splits = ["train"] * count
    order = iter(rng.permutation(count).tolist())
    for split, fraction in _SPLIT_FRACTIONS:
        for _ in range(max(1, round(fraction * count))):
            splits[next(order)] = split
    return splits


def generate_apples(
    root: Path, *, fmt: str = "folders", seed: int = 0, size: int = 64, scale: float = 1.0
) -> None:
    """Draw the demo set into ``root`` (70/15/15 train/val/test per class).

    Args:
        root: Where to write; created if missing.
        fmt: ``"folders"`` (``<split>/{rgb,depth,labels}/<class>/<id>``) or ``"csv"``
            (``images/{rgb,depth}/<class>/<id>.png`` and ``train.csv``/``val.csv``/``test.csv``
            with columns image, label, depth, num_<name>..., text).
        seed: The same seed gives byte-identical files.
        size: Image side in pixels.
        scale: Multiplies the class counts (at least 5 per class), e.g. 0.1 for tests.
    """
    if fmt not in ("folders", "csv"):
        raise ValueError(f"unknown format {fmt!r}")
    jobs = []
    for v_index, variety in enumerate(VARIETIES):
        count = max(5, round(variety.count * scale))
        splits = assign_splits(count, np.random.default_rng([seed, v_index, 1 << 30]))
        jobs += [(v_index, i, split) for i, split in enumerate(splits)]
        for split in set(splits):
            for folder in _folders(fmt, split, variety.name):
                (root / folder).mkdir(parents=True, exist_ok=True)

    def make(job: tuple[int, int, str]) -> list[object]:
        v_index, i, split = job
        variety = VARIETIES[v_index]
        # One generator per sample: a sample does not depend on how many came before.
        sample = _render(variety, np.random.default_rng([seed, v_index, i]), size)
        return _write_sample(root, fmt, split, variety.name, f"{variety.name}_{i:04d}", sample)

    # Two threads overlap drawing (NumPy and PIL release the GIL) with the slow file creation.
    with ThreadPoolExecutor(2) as pool:
        rows = list(pool.map(make, jobs))
    if fmt == "csv":
        header = ["image", "label", "depth", *(f"num_{n}" for n in NUMERIC_NAMES), "text"]
        for split in ("train", "val", "test"):
            with (root / f"{split}.csv").open("w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle, lineterminator="\n")
                writer.writerow(header)
                writer.writerows(row[1:] for row in rows if row[0] == split)


def _folders(fmt: str, split: str, label: str) -> list[str]:
    if fmt == "folders":
        return [f"{split}/{modality}/{label}" for modality in ("rgb", "depth", "labels")]
    return [f"images/rgb/{label}", f"images/depth/{label}"]


def _write_sample(
    root: Path,
    fmt: str,
    split: str,
    label: str,
    sample_id: str,
    sample: tuple[np.ndarray, np.ndarray, dict[str, float], str],
) -> list[object]:
    """Write one sample's files; return its CSV row, after its split."""
    rgb, depth, numeric, text = sample
    if fmt == "folders":
        rgb_path, depth_path = (f"{split}/{m}/{label}/{sample_id}.png" for m in ("rgb", "depth"))
        labels = root / split / "labels" / label / f"{sample_id}.json"
        labels.write_text(json.dumps({"numeric": numeric, "text": text}, indent=1) + "\n")
    else:
        rgb_path, depth_path = (f"images/{m}/{label}/{sample_id}.png" for m in ("rgb", "depth"))
    Image.fromarray(rgb).save(root / rgb_path, format="PNG")
    Image.fromarray(depth).save(root / depth_path, format="PNG")
    return [split, rgb_path, label, depth_path, *numeric.values(), text]


def ensure_demo(data: DemoSpec, *, seed: int = 0) -> bool:
    """Generate the demo set into ``data.root`` if asked for and the root is missing or empty.

    The set is drawn in a temporary directory next to the root and renamed into place,
    so a crash never leaves half a set. A lock file next to the root makes processes
    that start together wait for the one drawing the set rather than draw it too.

    Returns:
        Whether this call generated the set.

    Raises:
        DataError: the set cannot be written.
    """
    root = Path(data.root)
    if data.demo is None or _has_content(root):
        return False
    generate = demo_generator(data.demo)
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(root.parent / f".{root.name}.lock"):  # one process draws the set
            if _has_content(root):
                return False  # another process drew it while we waited
            tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
            try:
                generate(tmp, fmt=data.format, seed=seed)
                os.rename(tmp, root)  # atomic; also replaces an empty root directory
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # still there only if not renamed
    except OSError as exc:
        raise DataError(f"cannot generate the demo data set in {root}: {exc}") from exc
    return True


def demo_generator(name: str) -> Callable[..., None]:
    """The generator of the built-in demo set ``name`` (``"apples"`` or ``"garbage"``)."""
    # Imported here: the garbage set reuses this module's background and split helpers.
    from search.data.demo_garbage import generate_garbage

    generators = {"apples": generate_apples, "garbage": generate_garbage}
    if name not in generators:
        raise ValueError(f"unknown demo set {name!r}; choose from {sorted(generators)}")
    return generators[name]


def _has_content(root: Path) -> bool:
    return root.exists() and (not root.is_dir() or any(root.iterdir()))
