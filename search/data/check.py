"""``search data check``: validate a data set, warm its cache, print per-class counts and
warn about exact duplicates across splits or classes."""

from __future__ import annotations

import os
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from rich.console import Console
from rich.table import Table

from search.data.cache import depth_range, load_split_arrays, split_cache_key
from search.data.decode import DEFAULT_RESIZE, ImageError, pixel_hash
from search.data.demo import ensure_demo
from search.data.index import SPLITS, DatasetIndex, Sample, load_index

_SHOWN = 3  # duplicate groups named in the warning
_HASH_THREADS = min(2, os.cpu_count() or 1)


class CheckSpec(Protocol):
    """The parts of the study's ``[data]`` table (``DataConfig``) the check reads."""

    root: Path
    modalities: list[str]
    cache_dir: Path
    val_fraction: float
    test_fraction: float

    # Read-only properties, so that DataConfig's Literal-typed fields satisfy them.
    @property
    def format(self) -> str: ...
    @property
    def demo(self) -> str | None: ...


@dataclass(frozen=True)
class DataReport:
    """What the check found; ``counts`` is split -> class -> number of samples."""

    root: Path
    format: str
    modalities: list[str]
    classes: list[str]
    counts: dict[str, dict[str, int]]
    imbalance: float  # largest / smallest training class
    numeric_names: list[str] | None
    fingerprint: str
    cache_path: Path
    generated_demo: bool
    seconds: float
    # Groups of samples whose photos have the same pixels, in two splits or two classes;
    # each sample as "<split>/<class>: <file relative to root>".
    duplicates: list[list[str]]


def check_data(data: CheckSpec, *, resolution: int, seed: int, console: Console,
               resize: str = DEFAULT_RESIZE) -> DataReport:
    """Generate the demo set if asked for, validate the data set, decode it into the cache.

    Decoding every image here means corrupt files are reported before any trial starts,
    and the trials then start from a warm cache. Photos with the same pixels in two
    splits (which inflates every score) or two classes are reported as a warning.

    Raises:
        DataError: the data set is invalid (see :func:`search.data.index.load_index`).
    """
    start = time.perf_counter()
    generated = ensure_demo(data, seed=seed)  # the same call as search.data.prepared.prepare_data
    if generated:
        console.print(f"generated the demo set [bold]{data.demo}[/] in {data.root}")
    index = load_index(data, seed=seed)
    load_split_arrays(index, resolution, data.cache_dir, resize)
    fitted = depth_range(index, resolution, resize, data.cache_dir)
    counts = index.counts()
    train = counts["train"].values()
    report = DataReport(
        root=index.root,
        format=index.format,
        modalities=index.modalities,
        classes=index.classes,
        counts=counts,
        imbalance=max(train) / min(train),
        numeric_names=index.numeric_names,
        fingerprint=index.fingerprint,
        cache_path=Path(data.cache_dir) / split_cache_key(index, resolution, resize, fitted),
        generated_demo=generated,
        seconds=time.perf_counter() - start,
        duplicates=find_duplicates(index),
    )
    _print(report, index, console)
    return report


def find_duplicates(index: DatasetIndex) -> list[list[str]]:
    """Groups of samples whose photos decode to the same pixels, across splits or classes.

    The photos are compared by a hash of their full-size decoded RGB pixels
    (:func:`~search.data.decode.pixel_hash`), so a copy under another name or format
    (PNG of the same pixels) is found, while a re-encoded JPEG is not. Duplicates within
    one split and one class are left alone: they only weigh a sample twice.
    """
    samples = [(split, s) for split in SPLITS for s in index.splits[split]]

    def digest(item: tuple[str, Sample]) -> str | None:
        try:
            return pixel_hash(item[1].rgb)
        except ImageError:  # the cache already failed on undecodable files
            return None

    groups: dict[str, list[tuple[str, Sample]]] = defaultdict(list)
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        for item, key in zip(samples, pool.map(digest, samples), strict=True):
            if key is not None:
                groups[key].append(item)
    found = []
    for members in groups.values():
        if len({split for split, _ in members}) > 1 or len({s.label for _, s in members}) > 1:
            found.append([f"{split}/{s.label}: {os.path.relpath(s.rgb, index.root)}"
                          for split, s in members])
    return found


def _print(report: DataReport, index: DatasetIndex, console: Console) -> None:
    table = Table(title=f"{report.root} ({report.format}: {', '.join(report.modalities)})")
    table.add_column("class")
    for split in SPLITS:
        table.add_column(split, justify="right")
    table.add_column("total", justify="right")
    for name in report.classes:
        row = [report.counts[split][name] for split in SPLITS]
        table.add_row(name, *map(str, row), str(sum(row)))
    table.add_section()
    totals = [len(index.splits[split]) for split in SPLITS]
    table.add_row("[bold]all", *map(str, totals), str(sum(totals)))
    console.print(table)
    console.print(
        f"imbalance (largest / smallest training class): [bold]{report.imbalance:.1f}x[/]"
    )
    if report.numeric_names is not None:
        console.print(f"numeric features: {', '.join(report.numeric_names)}")
    if report.duplicates:
        shown = "; ".join(" = ".join(group) for group in report.duplicates[:_SHOWN])
        more = (f"; and {len(report.duplicates) - _SHOWN} more"
                if len(report.duplicates) > _SHOWN else "")
        console.print(f"warning: {len(report.duplicates)} sets of photos with the same pixels "
                      f"in two splits or two classes: {shown}{more} (a photo in both train and "
                      "test inflates every score we report)", style="yellow", markup=False,
                      highlight=False, soft_wrap=True)
    console.print(f"fingerprint: {report.fingerprint[:16]}")
    console.print(f"cache: {report.cache_path}")
    console.print(f"checked in {report.seconds:.2f} s")
