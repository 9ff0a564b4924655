"""The second built-in demo set: photos of waste items with a short note, six bins.

The set is built so that neither modality alone can sort it and the pair can. Each class
has a *look* (what the photo shows) and a *feel* (the words of its note), and the looks
and feels are paired in a cycle:

| class       | look                 | feel of the note              | count |
| ----------- | -------------------- | ----------------------------- | ----- |
| plastic     | bottle               | light, rinsed drink container | 400   |
| glass       | bottle               | heavy, rigid, clinks          | 100   |
| metal       | crushed, crumpled    | heavy, rigid, clinks          | 70    |
| paper       | crushed, crumpled    | dry, fibrous, tears           | 240   |
| cardboard   | box                  | dry, fibrous, tears           | 150   |
| tetra_pak   | box                  | light, rinsed drink container | 40    |

Two classes with the same look are drawn from the *same* picture distribution (a crushed
can and a ball of crumpled paper are both white-grey crumpled blobs here), so only the note
tells them apart; two classes with the same feel get notes from the same word distribution,
so only the picture does. A note never names its class, mixes in neutral words (where it
was found, how clean it is), and one in eight draws a feel word from another bin, as
people's notes do. The classes are imbalanced 10:1 like a sorting line's.

Everything comes from a seeded NumPy generator per sample, so a seed always gives
byte-identical files.
"""

from __future__ import annotations

import csv
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from search.data.demo import assign_splits

LOOKS = ("bottle", "crumpled", "box")
FEELS: dict[str, tuple[str, ...]] = {
    "drink": ("light", "rinsed", "squashed", "lid", "cap", "straw", "sticky", "juice",
              "hollow", "crinkles"),
    "rigid": ("heavy", "rigid", "clinks", "cold", "rattles", "dented", "sharp", "solid",
              "smooth", "rings"),
    "fibre": ("dry", "torn", "folded", "printed", "fibrous", "flattened", "tape", "soggy",
              "rough", "tears"),
}
_NEUTRAL = ("found", "near", "the", "kitchen", "bin", "office", "desk", "street", "bag",
            "left", "by", "door", "clean", "dirty", "wet", "small", "large", "old", "new",
            "item", "from", "a", "party", "shop", "yard")


@dataclass(frozen=True)
class Bin:
    """One class: its look, its feel and how many samples it has."""

    name: str
    look: str
    feel: str
    count: int


BINS: tuple[Bin, ...] = (
    Bin("plastic", "bottle", "drink", 400),
    Bin("glass", "bottle", "rigid", 100),
    Bin("metal", "crumpled", "rigid", 70),
    Bin("paper", "crumpled", "fibre", 240),
    Bin("cardboard", "box", "fibre", 150),
    Bin("tetra_pak", "box", "drink", 40),
)
_NOISY_WORD = 0.125  # chance that a feel word comes from another bin's feel


def note(feel: str, rng: np.random.Generator) -> str:
    """A short note: two or three feel words among two to four neutral ones, shuffled."""
    words = []
    for _ in range(rng.integers(2, 4)):
        source = feel
        if rng.random() < _NOISY_WORD:
            source = str(rng.choice([f for f in FEELS if f != feel]))
        words.append(str(rng.choice(FEELS[source])))
    words += [str(w) for w in rng.choice(_NEUTRAL, size=rng.integers(2, 5))]
    return " ".join(words[i] for i in rng.permutation(len(words)))


def _bottle(draw: ImageDraw.ImageDraw, rng: np.random.Generator, s: float) -> None:
    """Body, shoulder, neck and cap, seen from the side, with a highlight strip."""
    tint = rng.choice([(50, 150, 70), (60, 120, 210), (40, 160, 160)])
    body = tuple(int(np.clip(c + rng.normal(0, 15), 0, 255)) for c in tint)
    height, width = s * rng.uniform(0.55, 0.75), s * rng.uniform(0.2, 0.28)
    top = s / 2 - height / 2
    left, right = s / 2 - width / 2, s / 2 + width / 2
    neck = width * rng.uniform(0.3, 0.45)
    draw.rounded_rectangle((left, top + 0.3 * height, right, top + height), radius=width / 4,
                           fill=(*body, 235))
    draw.polygon([(left, top + 0.32 * height), (s / 2 - neck / 2, top + 0.12 * height),
                  (s / 2 + neck / 2, top + 0.12 * height), (right, top + 0.32 * height)],
                 fill=(*body, 235))
    draw.rectangle((s / 2 - neck / 2, top + 0.03 * height, s / 2 + neck / 2,
                    top + 0.14 * height), fill=(*body, 235))
    cap = tuple(int(v) for v in rng.integers(20, 235, size=3))
    draw.rectangle((s / 2 - neck / 1.6, top, s / 2 + neck / 1.6, top + 0.05 * height),
                   fill=(*cap, 255))
    glint = left + width * rng.uniform(0.15, 0.3)
    draw.rectangle((glint, top + 0.38 * height, glint + width * 0.1, top + 0.9 * height),
                   fill=(255, 255, 255, 120))


def _crumpled(draw: ImageDraw.ImageDraw, rng: np.random.Generator, s: float) -> None:
    """A jagged grey-white blob with dark creases."""
    grey = rng.uniform(195, 245)
    colour = tuple(int(np.clip(grey + rng.normal(0, 10), 0, 255)) for _ in range(3))
    radius = s * rng.uniform(0.2, 0.3)
    corners = rng.integers(11, 18)
    angles = np.sort(rng.uniform(0, 2 * math.pi, size=corners))
    radii = radius * rng.uniform(0.65, 1.0, size=corners)
    outline = [(s / 2 + r * math.cos(a), s / 2 + r * math.sin(a))
               for a, r in zip(angles, radii, strict=True)]
    draw.polygon(outline, fill=(*colour, 255))
    for _ in range(rng.integers(4, 9)):
        a, b = rng.integers(0, corners, size=2)
        shade = int(grey * rng.uniform(0.45, 0.7))
        draw.line((outline[a], (s / 2, s / 2), outline[b]), fill=(shade, shade, shade, 200),
                  width=max(1, round(s / 64)))


def _box(draw: ImageDraw.ImageDraw, rng: np.random.Generator, s: float) -> None:
    """A box in perspective: front face, top face, a fold line and a printed patch."""
    base = rng.choice([(176, 124, 68), (205, 150, 90), (150, 100, 55)])
    front = tuple(int(np.clip(c + rng.normal(0, 12), 0, 255)) for c in base)
    top_face = tuple(min(255, int(c * 1.15)) for c in front)
    w, h = s * rng.uniform(0.3, 0.45), s * rng.uniform(0.3, 0.5)
    depth = s * rng.uniform(0.08, 0.15)
    x0, y0 = s / 2 - w / 2, s / 2 - h / 2 + depth / 2
    draw.polygon([(x0, y0), (x0 + depth, y0 - depth), (x0 + w + depth, y0 - depth),
                  (x0 + w, y0)], fill=(*top_face, 255))
    draw.polygon([(x0 + w, y0), (x0 + w + depth, y0 - depth), (x0 + w + depth, y0 + h - depth),
                  (x0 + w, y0 + h)], fill=(*(int(c * 0.8) for c in front), 255))
    draw.rectangle((x0, y0, x0 + w, y0 + h), fill=(*front, 255))
    draw.line((x0, y0 + h * 0.5, x0 + w, y0 + h * 0.5), fill=(*(int(c * 0.7) for c in front), 255),
              width=max(1, round(s / 64)))
    print_colour = tuple(int(v) for v in rng.integers(0, 255, size=3))
    px, py = x0 + w * rng.uniform(0.1, 0.4), y0 + h * rng.uniform(0.55, 0.7)
    draw.rectangle((px, py, px + w * 0.4, py + h * 0.2), fill=(*print_colour, 255))


_DRAW = {"bottle": _bottle, "crumpled": _crumpled, "box": _box}


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """The dark, blotchy floor of a sorting line or bin, so every look stands out."""
    grey = rng.uniform(35, 90)
    colour = grey + rng.normal(0, 6, size=3)
    blotches = Image.fromarray(rng.normal(0, 1, size=(4, 4)).astype(np.float32))
    shade = 1 + 0.12 * np.asarray(blotches.resize((size, size), Image.Resampling.BICUBIC))
    return np.clip(colour * shade[..., None], 0, 255).astype(np.uint8)


def photo(look: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One photo [size, size, 3] of an item with ``look`` on a table, at a random angle.

    The item is drawn at twice the size and scaled down, so its edges are smooth.
    """
    picture = Image.fromarray(_background(rng, size))
    big = 2 * size
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    _DRAW[look](ImageDraw.Draw(layer), rng, big * rng.uniform(1.1, 1.4))
    layer = layer.rotate(rng.uniform(0, 360), resample=Image.Resampling.BICUBIC,
                         translate=tuple(rng.uniform(-0.12, 0.12, size=2) * big))
    layer = layer.resize((size, size), Image.Resampling.LANCZOS)
    shadow = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    shadow.putalpha(layer.getchannel("A").point(lambda a: a * 0.4).filter(
        ImageFilter.GaussianBlur(size / 40)))
    dx, dy = (int(v) for v in rng.integers(-2, 3, size=2))
    picture.paste(shadow, (dx, dy), shadow)
    picture.paste(layer, (0, 0), layer)
    noisy = np.asarray(picture, dtype=np.float32) * np.float32(rng.uniform(0.85, 1.12))
    noisy += rng.normal(0, 3.0, (size, size, 3)).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def generate_garbage(
    root: Path, *, fmt: str = "folders", seed: int = 0, size: int = 64, scale: float = 1.0
) -> None:
    """Draw the garbage set into ``root`` (70/15/15 train/val/test per class).

    Args:
        root: Where to write; created if missing.
        fmt: ``"folders"`` (``<split>/{rgb,labels}/<class>/<id>``, the note in the labels
            file's ``text``) or ``"csv"`` (``images/<class>/<id>.png`` and
            ``train.csv``/``val.csv``/``test.csv`` with columns image, label, text).
        seed: The same seed gives byte-identical files.
        size: Image side in pixels.
        scale: Multiplies the class counts (at least 5 per class), e.g. 0.1 for tests.
    """
    if fmt not in ("folders", "csv"):
        raise ValueError(f"unknown format {fmt!r}")
    jobs = []
    for b_index, item in enumerate(BINS):
        count = max(5, round(item.count * scale))
        # Stream 7 so the splits differ from the apples' at the same seed and index.
        splits = assign_splits(count, np.random.default_rng([seed, b_index, 7, 1 << 30]))
        jobs += [(b_index, i, split) for i, split in enumerate(splits)]
        folders = ([f"{split}/{m}/{item.name}" for split in set(splits) for m in ("rgb", "labels")]
                   if fmt == "folders" else [f"images/{item.name}"])
        for folder in folders:
            (root / folder).mkdir(parents=True, exist_ok=True)

    def make(job: tuple[int, int, str]) -> tuple[str, str, str, str]:
        b_index, i, split = job
        item = BINS[b_index]
        rng = np.random.default_rng([seed, b_index, 7, i])  # one generator per sample
        rgb, text = photo(item.look, rng, size), note(item.feel, rng)
        sample_id = f"{item.name}_{i:04d}"
        if fmt == "folders":
            image = f"{split}/rgb/{item.name}/{sample_id}.png"
            labels = root / split / "labels" / item.name / f"{sample_id}.json"
            labels.write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
        else:
            image = f"images/{item.name}/{sample_id}.png"
        Image.fromarray(rgb).save(root / image, format="PNG")
        return split, image, item.name, text

    with ThreadPoolExecutor(2) as pool:
        rows = list(pool.map(make, jobs))
    if fmt == "csv":
        for split in ("train", "val", "test"):
            with (root / f"{split}.csv").open("w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle, lineterminator="\n")
                writer.writerow(["image", "label", "text"])
                writer.writerows(row[1:] for row in rows if row[0] == split)
