"""Benchmark: Augmentor's generation rate when balancing, and cold vs cached balanced sets.

First on a random, imbalanced rgb + depth split synthesised in memory: the generation rate
of ``augment.balance("oversample", ...)``, per op, and a cold run (generate and ``np.save``)
against a reload (``np.load(mmap_mode="r")``). Then on the demo apples through ``search``'s
own cache: the balanced training set built cold, then found by a fresh ``prepare_data`` as a
later trial or another worker would (``--no-demo`` skips this part).

    .venv/bin/python bench/augment.py
    .venv/bin/python bench/augment.py --resolution 128 --per-class 300,120,60,30,15 --ops zoom,skew
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

DEFAULT_OPS = "flip_left_right,flip_top_bottom,rotate90,random_distortion"
PER_OP_ROWS = 200


def import_augment() -> ModuleType:
    """Import the ``augment`` package rather than this file.

    Python puts a script's own folder first on ``sys.path``, and this script is named
    ``augment.py``, so a plain ``import augment`` would import the script itself.
    """
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.path.insert(0, str(here.parent))
    return importlib.import_module("augment")


def synthesise(
    per_class: list[int], resolution: int, seed: int = 0
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Random uint8 rgb + depth images and int64 labels, ``per_class[c]`` rows of class ``c``."""
    rng = np.random.default_rng(seed)
    n = sum(per_class)
    images = {
        "rgb": rng.integers(0, 256, (n, resolution, resolution, 3), dtype=np.uint8),
        "depth": rng.integers(0, 256, (n, resolution, resolution, 1), dtype=np.uint8),
    }
    return images, np.repeat(np.arange(len(per_class)), per_class).astype(np.int64)


def timed(function: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """Return ``(result, seconds)``."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def per_op_rates(augment: ModuleType, images: dict, ops: list[str]) -> None:
    """Print copies/s for each op alone, every op forced to run (probability 1)."""
    rows = np.arange(PER_OP_ROWS) % len(next(iter(images.values())))
    for op in ops:
        _, seconds = timed(augment.augment_rows, images, rows, ops=[op], seed=0, probability=1.0)
        print(f"  {op:<18} {PER_OP_ROWS / seconds:8.0f} copies/s")


def flip_batch_cost(augment: ModuleType, resolution: int, repeats: int = 200) -> None:
    """Print what the per-batch flips and turns (``augment.online``) cost 32 images on the CPU."""
    images, _ = synthesise([32], resolution)
    images = {name: torch.from_numpy(array) for name, array in images.items()}
    generator = torch.Generator().manual_seed(0)
    _, seconds = timed(lambda: [augment.flip_batch(images, augment.ONLINE_OPS, generator)
                                for _ in range(repeats)])
    print(f"per-batch flips and quarter turns (augment.flip_batch), batch of 32 rgb + depth: "
          f"{seconds / repeats * 1e3:.2f} ms")


def save_arrays(folder: Path, balanced: Any) -> None:
    """Write the balanced set the way a cache would: one ``.npy`` per array."""
    for name, array in balanced.images.items():
        np.save(folder / f"{name}.npy", array)
    np.save(folder / "labels.npy", balanced.labels)
    np.save(folder / "source_index.npy", balanced.source_index)


def load_arrays(folder: Path) -> dict[str, np.ndarray]:
    """Reopen a saved balanced set as read-only memory maps."""
    return {path.stem: np.load(path, mmap_mode="r") for path in sorted(folder.glob("*.npy"))}


def read_all(arrays: dict[str, np.ndarray]) -> int:
    """Touch every byte, as one training epoch would; returns a checksum so nothing is skipped."""
    return sum(int(np.asarray(array).sum()) for array in arrays.values())


def demo_cold_vs_cached(resolution: int, ops: list[str]) -> None:
    """Balance the demo apples' training split through ``search``'s own cache, cold then warm.

    Cold: Augmentor generates the copies and ``cached_arrays`` stores them; warm: a fresh
    ``prepare_data`` (as a later trial or another worker would) finds and maps them.
    """
    from search.config import parse_study
    from search.data.prepared import prepare_data

    with tempfile.TemporaryDirectory(prefix="bench-augment-") as tmp:
        raw = {"study": {"name": "bench"},
               "data": {"root": f"{tmp}/apples", "demo": "apples", "modalities": ["rgb", "depth"],
                        "cache_dir": f"{tmp}/cache"},
               "augment": {"balance": "oversample", "ops": ops},
               "train": {"resolution": resolution}}
        config = parse_study(raw, Path(tmp) / "bench.toml")
        data = prepare_data(config)  # generates the demo set and decodes it (not timed)
        train = data.arrays["train"]
        (split, _), cold_s = timed(data.train_split, "oversample")
        copies = len(split) - len(train)
        (again, _), warm_s = timed(prepare_data(config).train_split, "oversample")
        assert np.array_equal(split.images["rgb"], again.images["rgb"])
        _, read_s = timed(read_all, again.images)
        print(f"demo apples, training split {len(train)} -> {len(split)} rows "
              f"({np.bincount(split.labels).tolist()}), {resolution}px rgb + depth:")
        print(f"  cold (Augmentor {copies} copies + store): {cold_s:.2f} s = "
              f"{2 * copies / cold_s:.0f} images/s")
        speedup = cold_s / (warm_s + read_s)
        print(f"  cached (fresh prepare_data + open): {warm_s * 1e3:.0f} ms, "
              f"+ read every byte {read_s * 1e3:.0f} ms -> {speedup:.0f}x faster")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=64, help="image side in pixels")
    parser.add_argument("--per-class", default="300,120,60,30,15", help="rows per class")
    parser.add_argument("--ops", default=DEFAULT_OPS, help="comma-separated augment ops")
    parser.add_argument("--no-demo", action="store_true", help="skip the demo-set part")
    args = parser.parse_args(argv)

    augment = import_augment()
    per_class = [int(count) for count in args.per_class.split(",")]
    ops = list(augment.validate_ops([op for op in args.ops.split(",") if op]))
    images, labels = synthesise(per_class, args.resolution)
    print(f"split: {labels.size} rows, per class {per_class}, {args.resolution}px rgb + depth")
    print(f"ops: {', '.join(ops) or '(none)'}")

    balanced, generate_s = timed(augment.balance, "oversample", images, labels, ops=ops, seed=0)
    copies = balanced.labels.size - labels.size
    print(f"oversample: {copies} copies to {np.bincount(balanced.labels).tolist()} "
          f"in {generate_s:.2f} s = {copies / generate_s:.0f} copies/s "
          f"({len(images) * copies / generate_s:.0f} images/s, rgb and depth)")
    print(f"per op alone ({PER_OP_ROWS} copies each, probability 1):")
    per_op_rates(augment, images, ops)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _, save_s = timed(save_arrays, folder, balanced)
        size_mb = sum(path.stat().st_size for path in folder.glob("*.npy")) / 1e6
        cold_s = generate_s + save_s
        cached, open_s = timed(load_arrays, folder)
        _, read_s = timed(read_all, cached)
        warm_s = open_s + read_s
        print(f"cold (generate + np.save, {size_mb:.1f} MB): {cold_s:.3f} s")
        print(f"cached np.load(mmap_mode='r'): open {open_s * 1e3:.2f} ms, "
              f"open + read every byte {warm_s * 1e3:.1f} ms -> {cold_s / warm_s:.0f}x faster")
    flip_batch_cost(augment, args.resolution)
    if not args.no_demo:
        demo_cold_vs_cached(args.resolution, ops)


if __name__ == "__main__":
    main()
