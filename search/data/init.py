"""``search init``: look at a data set, then write a study file that fits it and this machine.

The data set is read by :func:`search.data.index.load_index` (the reader every command
uses), so a bad folder gets the same one-line errors as ``search data check``. This module
only decides which layout and modalities to ask it for, and what the settings should be;
the file it writes is validated by :func:`search.config.parse_study` before it is written.
"""

from __future__ import annotations

import csv
import json
import os
import random
import statistics
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image
from rich.console import Console

import models
from search.config import STUDIES_DIR, DataConfig, parse_study
from search.data.decode import missing_csv_columns, read_folder_sample
from search.data.index import DatasetIndex, fail, load_index
from search.errors import ConfigError, DataError

# Second modalities in the order init prefers them when a data set has several: a depth map
# first, as every fusion accepts it (early fusion stacks it onto the photo's channels).
SECOND_MODALITIES = ("depth", "numeric", "text")
# Image sizes are read from at most this many training images (headers only, seeded draw).
SIZE_SAMPLE = 200


@dataclass(frozen=True)
class Hardware:
    """What the settings are sized for: GPUs (count, memory of the first) and CPU cores."""

    gpus: int
    gpu_memory_gb: float
    cpus: int

    @classmethod
    def detect(cls) -> Hardware:
        import torch

        gpus = torch.cuda.device_count()
        memory = torch.cuda.get_device_properties(0).total_memory / 2**30 if gpus else 0.0
        return cls(gpus=gpus, gpu_memory_gb=memory, cpus=os.cpu_count() or 1)

    def describe(self) -> str:
        if self.gpus:
            return (f"{self.gpus} GPU(s) ({self.gpu_memory_gb:.0f} GiB on the first), "
                    f"{self.cpus} CPU cores")
        return f"no GPU, {self.cpus} CPU cores"


@dataclass(frozen=True)
class Survey:
    """What :func:`survey_data` found in a data set."""

    root: Path
    format: str
    modalities: list[str]  # the ones the study will use: "rgb" and at most one more
    also_present: list[str]  # second modalities found but not chosen (only one can be fused)
    index: DatasetIndex
    given_splits: list[str]  # splits found on disk; the others are drawn from train
    sizes: list[tuple[int, int]]  # (width, height) of up to SIZE_SAMPLE training images

    @property
    def short_side(self) -> int:
        """The median short side of the images, in pixels."""
        return int(statistics.median(min(w, h) for w, h in self.sizes))

    @property
    def square(self) -> bool:
        return all(w == h for w, h in self.sizes)

    @property
    def imbalance(self) -> float:
        train = self.index.counts()["train"].values()
        return max(train) / min(train)


def survey_data(path: Path, *, seed: int = 0) -> Survey:
    """Find the layout, the modalities and the image sizes of the data set at ``path``.

    ``path`` is a data-set folder (``folders`` or ``csv`` layout) or its ``train.csv``.

    Raises:
        DataError: Nothing there, or the data set is invalid (the reader's own message).
    """
    root = path.parent if path.suffix.lower() == ".csv" else path
    if root is not path and path.name != "train.csv":
        raise DataError(f"{path}: the csv layout reads {root / 'train.csv'} (and val.csv, "
                        "test.csv if there); name the training CSV train.csv")
    if not root.is_dir():
        raise DataError(f"data folder not found: {path}")
    fmt: Literal["csv", "folders"] = "csv" if (root / "train.csv").is_file() else "folders"
    present = [m for m in SECOND_MODALITIES if _has_modality(root, fmt, m)]
    modalities = ["rgb", *present[:1]]
    # The reader validates everything (and raises the errors `search data check` raises).
    index = load_index(DataConfig(root=root, format=fmt, modalities=modalities), seed=seed)
    given = [s for s in index.splits
             if (root / f"{s}.csv").is_file() or (root / s / "rgb").is_dir()]
    rng = random.Random(seed)
    train = index.splits["train"]
    picked = rng.sample(train, min(SIZE_SAMPLE, len(train)))
    return Survey(root=root, format=fmt, modalities=modalities, also_present=present[1:],
                  index=index, given_splits=given, sizes=_sizes([s.rgb for s in picked], root))


def _has_modality(root: Path, fmt: str, modality: str) -> bool:
    """Whether the data set carries ``modality``, judged on its CSV header or first sample."""
    if fmt == "csv":
        with (root / "train.csv").open(newline="", encoding="utf-8-sig") as handle:
            header = next(csv.reader(handle), [])
        return not missing_csv_columns([h.strip() for h in header], ["rgb", modality])
    rgb = root / "train" / "rgb"
    first = next((p for c in sorted(rgb.glob("*/")) for p in sorted(c.iterdir())
                  if not p.name.startswith(".")), None) if rgb.is_dir() else None
    if first is None:
        return False
    sample = read_folder_sample(root / "train", first.parent.name, first, ["rgb", modality])
    return not sample.problems


def _sizes(paths: list[Path], root: Path) -> list[tuple[int, int]]:
    """(width, height) of each image, from its header; bad files as the cache reports them."""
    sizes, bad = [], []
    for path in paths:
        try:
            with Image.open(path) as image:
                sizes.append(image.size)
        except (OSError, Image.DecompressionBombError) as error:
            bad.append(f"{os.path.relpath(path, root)} ({error})")
    if bad:
        fail("unreadable or corrupt images", bad, root)
    return sizes


@dataclass(frozen=True)
class Settings:
    """The study's settings, each with the reason written next to it in the file."""

    resolution: tuple[int, str]
    backbones: tuple[list[str], str]
    fusions: tuple[list[str], str]
    epochs: tuple[int, str]
    batch_size: tuple[int, str]
    n_trials: tuple[int, str]
    balance: tuple[str | list[str], str]


def choose_settings(survey: Survey, hardware: Hardware) -> Settings:
    """Settings that fit the data and the machine (pure: tests pass any ``Hardware``)."""
    gpu = hardware.gpus > 0
    side = survey.short_side
    cap = 224 if gpu else 64
    # Upscaling adds pixels, not detail: never above the images' own (median) short side.
    resolution = max(32, min(cap, side // 32 * 32))
    why_res = (f"images' median short side {side} px; "
               + ("224 px is what the ImageNet backbones were trained at" if gpu
                  else "a 2-core CPU trains b0 at 102 img/s at 64 px, 50 at 128 (bench/README.md)"))
    backbones: tuple[list[str], str]
    if gpu:
        backbones = ([b for b in ("b0", "b1", "b2") if b in models.list_backbones()],
                     "the smaller sizes fine-tuned on one GPU; add b3-b5 with a larger budget")
    else:
        backbones = (["lite0"], "EfficientNet-Lite0: its ImageNet weights ship with the package "
                     "(no download) and beat random weights by 0.22 test F1 at 64 px on a CPU "
                     "(bench/README.md, pretrained gain)")
    second = survey.modalities[1] if len(survey.modalities) > 1 else None
    if second is None:
        fusions = (["none"], "rgb only: no second modality found")
    else:
        accepting = [f for f in models.list_fusions()
                     if f != "none" and second in models.fusion_accepts(f)]
        fusions = (["none", *accepting], f"every fusion that accepts {second}, and rgb alone")
    n_train = len(survey.index.splits["train"])
    largest = 64 if gpu and hardware.gpu_memory_gb >= 12 else 32
    # Small sets get small batches: at least 4 optimizer steps per epoch.
    batch = min(largest, max(4, 2 ** (n_train // 4).bit_length() // 2))
    why_batch = (f"{n_train} training samples: at least 4 steps per epoch" if batch < largest
                 else "lower it if the GPU runs out of memory" if gpu
                 else "the shipped CPU studies' batch size")
    epochs = (30, "what studies/apples.toml advises on GPUs") if gpu else \
        (12, "the shipped CPU study's budget (studies/apples.toml)")
    n_trials = (max(20, 10 * hardware.gpus), "about 10 per worker") if gpu else \
        (12, "one CPU worker")
    if survey.imbalance <= 1.5:
        balance: tuple[str | list[str], str] = (
            "none", f"classes are balanced (largest / smallest = {survey.imbalance:.1f})")
    elif gpu:
        balance = (["class_weights", "oversample"],
                   f"{survey.imbalance:.1f}x imbalance; search both ways of balancing")
    else:
        balance = ("class_weights",
                   f"{survey.imbalance:.1f}x imbalance; oversampling trains on more images per "
                   "epoch, slow on a CPU")
    return Settings(
        resolution=(resolution, why_res), backbones=backbones, fusions=fusions,
        epochs=epochs, batch_size=(batch, why_batch), n_trials=n_trials, balance=balance)


def render_study(name: str, data_path: str, survey: Survey, settings: Settings,
                 hardware: Hardware) -> str:
    """The study file's text, every setting commented with why it is what it is."""
    counts = survey.index.counts()["train"]
    total = sum(len(samples) for samples in survey.index.splits.values())
    drawn = [s for s in ("val", "test") if s not in survey.given_splits]
    others = (f"; also found {', '.join(survey.also_present)} (only one modality can be "
              f"fused with rgb: swap it in to try)" if survey.also_present else "")
    shape = "square" if survey.square else "not all square"
    lines = [
        f"# Written by `search init --data {data_path}` for {hardware.describe()}.",
        f"# {len(survey.index.classes)} classes, {total} samples, {sum(counts.values())} "
        f"in train (smallest class {min(counts.values())}, largest {max(counts.values())}); "
        f"images {shape}, median short side {survey.short_side} px.",
        "# Check it with `search run --study " + name + " --dry-run`.",
        "",
        "[study]",
        f"name = {_toml(name)}  # the Optuna study's name",
        f"n_trials = {settings.n_trials[0]}  # {settings.n_trials[1]}",
        "seed = 0  # seeds the sampler, the splits drawn from train and the weights",
        f'# storage = "sqlite:///runs/{name}/study.db"  # the default; or postgresql://, mysql://',
        "",
        "[data]",
        f"root = {_toml(str(survey.root))}  # relative to the folder `search` runs in",
        f"format = {_toml(survey.format)}  # found "
        + ("train.csv" if survey.format == "csv" else "train/rgb/<class>/"),
        f"modalities = {_toml(survey.modalities)}  # found in the data{others}",
        "# splits on disk: " + ", ".join(survey.given_splits)
        + (f"; {' and '.join(drawn)} drawn from train (val_fraction, test_fraction = 0.15)"
           if drawn else ""),
        "",
        "[augment]",
        'ops = ["flip_left_right"]  # suits most photos; add "flip_top_bottom" and "rotate90"'
        " for photos taken from above (no up or down), as in the demo apples",
        "",
        "[train]",
        f"epochs = {settings.epochs[0]}  # {settings.epochs[1]}",
        f"batch_size = {settings.batch_size[0]}  # {settings.batch_size[1]}",
        f"resolution = {settings.resolution[0]}  # {settings.resolution[1]}",
        'device = "auto"  # the GPU when there is one',
        f'workers = "auto"  # one per GPU, else 1: {max(1, hardware.gpus)} here',
        *_pending_train_keys(survey),
        "",
        "[space]",
        f"backbone = {_toml(settings.backbones[0])}  # {settings.backbones[1]}",
        f"fusion = {_toml(settings.fusions[0])}  # {settings.fusions[1]}",
        "dropout = [0.0, 0.4]  # the range the shipped studies search",
        'optimizer = ["adam", "adamw"]  # sgd and rmsprop rarely win a short budget',
        "lr = { low = 1e-4, high = 1e-2, log = true }  # pretrained weights tend to want the"
        " low end, random weights the high end",
        f"balance = {_toml(settings.balance[0])}  # {settings.balance[1]}",
        "",
        "# Pruner, sampler and the first trial are the defaults (README, \"The study file\").",
    ]
    return "\n".join(lines) + "\n"


def _pending_train_keys(survey: Survey) -> list[str]:
    """``[train] pretrained`` and, for photos that are not square, ``resize``."""
    lines = ['pretrained = "imagenet"  # fine-tune ImageNet weights: b0-b7 download them once '
             '(README "Your own data"), lite0-lite2 ship them']
    if not survey.square:
        lines.append('resize = "center_crop"  # photos are not all square: short side, then crop')
    return lines


def _toml(value: str | list[str]) -> str:
    # JSON strings and lists of strings are valid TOML basic strings and arrays.
    return json.dumps(value)


def init_study(data: Path, *, name: str | None = None, force: bool = False,
               hardware: Hardware | None = None, console: Console | None = None) -> Path:
    """Survey ``data``, write ``studies/<name>.toml`` (name: the data folder's name) and
    say what was found and chosen.

    The text is validated with the study-file reader before anything is written.

    Raises:
        DataError: The data set is missing or invalid.
        ConfigError: The study file exists (and not ``force``), or the name is unusable.
    """
    survey = survey_data(data)
    name = name or survey.root.resolve().name
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"--name {name!r}: use a plain name such as 'apples'")
    path = STUDIES_DIR / f"{name}.toml"
    if path.exists() and not force:
        raise ConfigError(f"{path}: already exists; pass --force to overwrite it")
    hardware = hardware or Hardware.detect()
    settings = choose_settings(survey, hardware)
    text = render_study(name, str(data), survey, settings, hardware)
    parse_study(tomllib.loads(text), path)  # a file that does not validate is our bug
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    _report(path, survey, settings, hardware, console or Console())
    return path


def _report(path: Path, survey: Survey, settings: Settings, hardware: Hardware,
            console: Console) -> None:
    counts = survey.index.counts()["train"]
    widths = sorted({w for w, _ in survey.sizes})
    heights = sorted({h for _, h in survey.sizes})
    span = (f"{widths[0]}-{widths[-1]} x {heights[0]}-{heights[-1]}"
            if len(widths) > 1 or len(heights) > 1 else f"{widths[0]} x {heights[0]}")
    lines = [
        f"data: {survey.root} ({survey.format}), {len(counts)} classes ("
        + ", ".join(f"{c} {n}" for c, n in counts.items()) + " in train), modalities "
        + ", ".join(survey.modalities)
        + (f" (also found: {', '.join(survey.also_present)})" if survey.also_present else ""),
        f"images: {span} px (median short side {survey.short_side} px)",
        f"machine: {hardware.describe()} -> resolution {settings.resolution[0]}, backbones "
        f"{', '.join(settings.backbones[0])}, fusions {', '.join(settings.fusions[0])}, "
        f"{settings.epochs[0]} epochs, batch size {settings.batch_size[0]}, "
        f"{settings.n_trials[0]} trials",
        f"wrote {path}; check it with `search run --study {path.stem} --dry-run`",
    ]
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
