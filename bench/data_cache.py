"""Cold vs warm loading of the demo set through the decoded-image cache.

Generates the demo apples (1040 samples, rgb + depth) into a temporary directory and
times ``load_split_arrays`` with an empty cache (decode and resize every image, with 1
and with 2 decoding threads) and with a warm one (open the memory-mapped ``.npy``
files). Run: ``.venv/bin/python bench/data_cache.py [--resolution 64] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import search.data.cache as cache
from search.data.cache import load_split_arrays
from search.data.demo import generate_apples
from search.data.index import load_index


def _best(repeats: int, run: Callable[[], object], before: Callable[[], None]) -> float:
    """The best of ``repeats`` timings of ``run``, calling ``before`` untimed each time."""
    times = []
    for _ in range(repeats):
        before()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        root, cache_dir = Path(tmp) / "apples", Path(tmp) / "cache"
        print(f"load average (other processes skew wall times): {os.getloadavg()[0]:.1f}")
        start, cpu = time.perf_counter(), os.times()
        generate_apples(root)
        used = sum(os.times()[:2]) - sum(cpu[:2])
        print(
            f"generate demo set (1040 samples, 3120 files): {time.perf_counter() - start:.2f} s"
            f" (CPU {used:.2f} s)"
        )

        data = SimpleNamespace(
            root=root, format="folders", modalities=["rgb", "depth"],
            val_fraction=0.15, test_fraction=0.15,
        )  # fmt: skip
        start = time.perf_counter()
        index = load_index(data, seed=0)
        print(f"load_index (scan, stat, validate):            {time.perf_counter() - start:.3f} s")

        def clear() -> None:
            shutil.rmtree(cache_dir, ignore_errors=True)

        def load() -> object:
            return load_split_arrays(index, args.resolution, cache_dir)

        cold = {}
        for threads in (1, 2):
            # The cache looks decode_threads() up at each build: fix it for this run.
            cache.decode_threads = lambda *_, n=threads: n  # type: ignore[assignment]
            cold[threads] = _best(args.repeats, load, clear)
            label = f"cold, {threads} decoding thread{'s' if threads > 1 else ''}"
            print(f"load_split_arrays {label + ':':<28} {cold[threads]:.3f} s")
        warm = _best(args.repeats, load, lambda: None)
        print(f"load_split_arrays {'warm:':<28} {warm * 1000:.1f} ms")
        print(f"warm speed-up: {min(cold.values()) / warm:.0f}x")


if __name__ == "__main__":
    main()
