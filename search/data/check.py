"""``search data check``: validate a data set, warm its cache and print per-class counts."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from rich.console import Console
from rich.table import Table

from search.data.cache import load_split_arrays, split_cache_key
from search.data.demo import ensure_demo
from search.data.index import SPLITS, DatasetIndex, load_index


class CheckSpec(Protocol):
    """The parts of the study's ``[data]`` table (``DataConfig``) the check reads."""

    root: Path
    format: str
    modalities: list[str]
    demo: str | None
    cache_dir: Path
    val_fraction: float
    test_fraction: float


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


def check_data(data: CheckSpec, *, resolution: int, seed: int, console: Console) -> DataReport:
    """Generate the demo set if asked for, validate the data set, decode it into the cache.

    Decoding every image here means corrupt files are reported before any trial starts,
    and the trials then start from a warm cache.

    Raises:
        DataError: the data set is invalid (see :func:`search.data.index.load_index`).
    """
    start = time.perf_counter()
    generated = ensure_demo(data, seed=seed)  # the same call as search.data.prepared.prepare_data
    if generated:
        console.print(f"generated the demo set [bold]{data.demo}[/] in {data.root}")
    index = load_index(data, seed=seed)
    load_split_arrays(index, resolution, data.cache_dir)
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
        cache_path=Path(data.cache_dir) / split_cache_key(index, resolution),
        generated_demo=generated,
        seconds=time.perf_counter() - start,
    )
    _print(report, index, console)
    return report


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
    console.print(f"fingerprint: {report.fingerprint[:16]}")
    console.print(f"cache: {report.cache_path}")
    console.print(f"checked in {report.seconds:.2f} s")
