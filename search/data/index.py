"""Data set index: which samples exist, in which split, with which modality files.

Two layouts are read (see DESIGN.md, "Dataset layout"): ``folders``
(``<root>/<split>/<modality>/<class>/<id>.<ext>``) and ``csv``
(``<root>/<split>.csv``). Everything is validated before any training starts; each
problem is a :class:`~search.errors.DataError` whose one-line message names the first
offending files and how many there are in all. Images are decoded later, by
:mod:`search.data.cache`, which reports corrupt images the same way.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Protocol

from search.data.decode import (
    CSV_ENCODING,
    IMAGE_SUFFIXES,
    SPLITS,
    Problem,
    RawSample,
    csv_reader,
    missing_csv_columns,
    read_csv_sample,
    read_folder_sample,
)
from search.errors import DataError

# Bump when the meaning of the index changes, so that caches keyed by the fingerprint are rebuilt.
INDEX_VERSION = 1


class DataSpec(Protocol):
    """What :func:`load_index` reads from the study's ``[data]`` table (``DataConfig``)."""

    root: Path
    modalities: list[str]
    val_fraction: float
    test_fraction: float

    # Read-only property, so that DataConfig's Literal-typed field satisfies it.
    @property
    def format(self) -> str: ...


@dataclass(frozen=True)
class Sample:
    """One sample: its files and values for every modality of the study."""

    id: str
    label: str
    rgb: Path
    depth: Path | None = None
    numeric: tuple[float, ...] | None = None
    text: str | None = None


@dataclass(frozen=True)
class DatasetIndex:
    """A validated data set, split into train/val/test.

    ``classes`` are the sorted class names of the training split; a label's index in it
    is the class id used everywhere downstream. ``fingerprint`` changes whenever any
    file used changes (path, size or mtime), or the layout options change.
    """

    root: Path
    format: str
    modalities: list[str]
    classes: list[str]
    splits: dict[str, list[Sample]]
    numeric_names: list[str] | None
    fingerprint: str

    def counts(self) -> dict[str, dict[str, int]]:
        """Samples per class in each split, classes in ``classes`` order."""
        counts = {}
        for split, samples in self.splits.items():
            per_class = Counter(s.label for s in samples)
            counts[split] = {c: per_class[c] for c in self.classes}
        return counts


_Row = RawSample  # a sample as read, before numeric values are checked against each other


def _label(row: _Row) -> str:
    # Both readers below require the label (only `search predict` reads unlabelled rows).
    assert row.label is not None, row.where
    return row.label


@dataclass
class Problems:
    """Problems found while reading, grouped by kind in the order they were first met."""

    root: Path
    found: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, item: str) -> None:
        """Record one offending file (or row) under ``kind``."""
        self.found.setdefault(kind, []).append(item)

    def add_problems(self, problems: list[Problem]) -> None:
        """Record the problems :mod:`search.data.decode` found in one sample's files."""
        for problem in problems:
            self.add(problem.kind, problem.item)

    def raise_first(self) -> None:
        """Raise a DataError for the first kind of problem found, if any."""
        for kind, items in self.found.items():
            fail(kind, items, self.root)


def fail(kind: str, items: list[str], root: Path) -> NoReturn:
    """Raise a one-line DataError naming the first three of ``items`` and their count."""
    shown = "; ".join(items[:3])
    more = f"; and {len(items) - 3} more" if len(items) > 3 else ""
    message = f"{len(items)} {kind} in {root}: {shown}{more}"
    # One line, whatever the file names contain.
    raise DataError(message.replace("\r", "\\r").replace("\n", "\\n"))


def load_index(data: DataSpec, *, seed: int) -> DatasetIndex:
    """Read and validate the data set described by ``data``.

    Missing ``val``/``test`` splits are drawn from ``train`` by a seeded stratified split
    (see :func:`holdout`), so that ``val_fraction`` and ``test_fraction`` are fractions
    of all the data.

    Raises:
        DataError: the root is missing, a file is missing or malformed, a class is
            unknown or empty, or there are fewer than two classes.
    """
    root = Path(data.root)
    if not root.is_dir():
        raise DataError(f"data root not found: {root} "
                        '(set [data] root, or demo = "apples" or "garbage")')
    modalities = list(data.modalities)
    problems = Problems(root)
    used: list[Path] = []
    read = _read_csv_split if data.format == "csv" else _read_folder_split
    rows: dict[str, list[_Row] | None] = {
        split: read(root, split, modalities, problems, used) for split in SPLITS
    }
    problems.raise_first()
    classes = _check_classes(root, data.format, rows, problems)
    numeric_names = _check_numeric(root, rows, problems) if "numeric" in modalities else None
    problems.raise_first()
    generated = [split for split in ("test", "val") if rows[split] is None]
    splits = _fill_splits(rows, data, seed)
    options: dict[str, Any] = {"format": data.format, "modalities": modalities}
    if generated:
        # Seed and fractions only decide anything when splits are drawn here.
        options |= {"seed": seed, "val": data.val_fraction, "test": data.test_fraction}
    return DatasetIndex(
        root=root,
        format=data.format,
        modalities=modalities,
        classes=classes,
        splits={
            split: [Sample(r.id, _label(r), r.rgb, r.depth, r.numeric, r.text) for r in rows]
            for split, rows in splits.items()
        },
        numeric_names=numeric_names,
        fingerprint=fingerprint(root, used, options),
    )


def _rel(path: Path, root: Path) -> str:
    return os.path.relpath(path, root)


def _read_folder_split(
    root: Path, split: str, modalities: list[str], problems: Problems, used: list[Path]
) -> list[_Row] | None:
    """Read ``<root>/<split>/rgb/<class>/<id>.<ext>`` and the files of the other modalities."""
    rgb_dir = root / split / "rgb"
    if not rgb_dir.is_dir():
        return None
    rows: list[_Row] = []
    for class_dir in sorted(rgb_dir.iterdir()):
        if class_dir.name.startswith("."):
            continue
        if not class_dir.is_dir():
            problems.add("files outside a class folder", _rel(class_dir, root))
            continue
        files = sorted(p for p in class_dir.iterdir() if not p.name.startswith("."))
        if not files and split == "train":
            problems.add("training class folders without an image", _rel(class_dir, root) + "/")
        seen: set[str] = set()
        for path in files:
            if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
                problems.add("files that are not .png/.jpg/.jpeg images", _rel(path, root))
            elif path.stem in seen:
                problems.add("images sharing a sample id", _rel(path, root))
            else:
                seen.add(path.stem)
                used.append(path)
                rows.append(read_folder_sample(root / split, class_dir.name, path, modalities,
                                               name=lambda p: _rel(p, root)))
                problems.add_problems(rows[-1].problems)
                used.extend(p for p in (rows[-1].depth, rows[-1].labels) if p and p.is_file())
    return rows


def _read_csv_split(
    root: Path, split: str, modalities: list[str], problems: Problems, used: list[Path]
) -> list[_Row] | None:
    """Read ``<root>/<split>.csv`` (columns image, label, depth, num_*, text)."""
    path = root / f"{split}.csv"
    if not path.is_file():
        return None
    used.append(path)
    rows: list[_Row] = []
    try:
        with path.open(newline="", encoding=CSV_ENCODING) as handle:
            reader = csv_reader(handle)
            header = list(reader.fieldnames or [])
            if not _check_header(path.name, header, modalities, problems):
                return []
            for record in reader:
                where = f"{path.name} line {reader.line_num}"
                row = read_csv_sample(root, record, header, where, modalities)
                if isinstance(row, Problem):
                    problems.add(row.kind, row.item)
                else:
                    problems.add_problems(row.problems)
                    rows.append(row)
    except (csv.Error, UnicodeDecodeError) as exc:
        problems.add("malformed CSV files", f"{path.name}: {exc}")
        return []
    for row in rows:
        used.extend(p for p in (row.rgb, row.depth) if p is not None and p.is_file())
    return rows


def _check_header(name: str, header: list[str], modalities: list[str], problems: Problems) -> bool:
    missing = missing_csv_columns(header, modalities)
    if missing:
        problems.add("CSV files without a required column", f"{name}: no {', '.join(missing)}")
    return not missing


def _check_classes(
    root: Path, fmt: str, rows: dict[str, list[_Row] | None], problems: Problems
) -> list[str]:
    """Return the sorted training classes; record samples of classes train does not have."""
    train = rows["train"]
    if train is None:
        expected = "train.csv" if fmt == "csv" else "train/rgb/<class>/<id>.png"
        raise DataError(f"no training split in {root}: expected {expected}")
    classes = sorted({_label(r) for r in train})
    known = set(classes)
    if len(classes) < 2:
        raise DataError(
            f"need at least 2 classes in the training split of {root}, "
            f"found {len(classes)}: {', '.join(classes) or 'none'}"
        )
    for split in ("val", "test"):
        split_rows = rows[split]
        if split_rows is not None and not split_rows:
            raise DataError(
                f"the {split} split of {root} has no samples: fill it, or remove it "
                "to have it drawn from train"
            )
        for row in split_rows or []:
            if row.label not in known:
                problems.add(
                    "samples of a class that is not in the training split",
                    f"{row.where} (class {row.label!r})",
                )
    return classes


def _numeric_shape(value: Any) -> str | None:
    """Describe a numeric entry's shape ("3 values" / "keys a, b"), or None when malformed."""
    if isinstance(value, dict):
        values, shape = list(value.values()), f"keys {', '.join(map(str, value))}"
    elif isinstance(value, list):
        values, shape = value, f"{len(value)} values"
    else:
        return None
    ok = all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values
    )
    return shape if values and ok else None


def _check_numeric(root: Path, rows: dict[str, list[_Row] | None], problems: Problems) -> list[str]:
    """Check every numeric entry has the first one's shape; store it as a tuple on the row.

    Returns:
        The feature names: the keys of the first entry when entries are objects (CSV
        columns ``num_<name>`` give ``<name>``), else ``x0, x1, ...`` for lists.
    """
    every = [r for split in SPLITS for r in rows[split] or []]
    first = every[0].numeric
    reference = _numeric_shape(first)
    if isinstance(first, dict):
        names = [str(k) for k in first]
    else:
        names = [f"x{i}" for i in range(len(first or []))]
    for row in every:
        where = _rel(row.labels, root) if row.labels else row.where
        shape, value = _numeric_shape(row.numeric), row.numeric
        if shape is None:
            problems.add("empty, non-numeric or non-finite numeric entries", where)
            continue
        # Objects may list their keys in any order; only the set of keys matters.
        same_keys = isinstance(value, dict) and isinstance(first, dict) and set(value) == set(first)
        if shape != reference and not same_keys:
            problems.add(f"numeric entries unlike the first one ({reference})", where)
            continue
        if isinstance(value, dict):
            row.numeric = tuple(float(value[n]) for n in names)
        else:
            row.numeric = tuple(float(x) for x in value)
    return names


def holdout(rows: list[_Row], fraction: float, seed: int) -> tuple[list[_Row], list[_Row]]:
    """Draw a seeded, stratified ``fraction`` of ``rows`` out; return (kept, held).

    Uses sklearn's ``train_test_split(stratify=labels)``. Fallbacks for small data:
    a class with a single sample cannot be stratified and stays whole in the kept part;
    when the held part would be smaller than the number of classes, stratifying is
    impossible and the draw is unstratified. Either way a class never loses its last
    kept sample (one is moved back from the held part), so every training class keeps
    at least one training image; in such tiny data sets a class may be absent from val
    or test.
    """
    # Imported here: sklearn takes seconds to import, and most data sets bring their splits.
    from sklearn.model_selection import train_test_split

    rows = sorted(rows, key=_order)
    counts = Counter(r.label for r in rows)
    keep = [r for r in rows if counts[r.label] < 2]
    many = [r for r in rows if counts[r.label] >= 2]
    if len(many) < 2:
        return rows, []
    try:
        kept, held = train_test_split(
            many, test_size=fraction, random_state=seed, stratify=[r.label for r in many]
        )
    except ValueError:
        kept, held = train_test_split(many, test_size=fraction, random_state=seed)
    keep += kept
    present = {r.label for r in keep}
    for row in sorted(held, key=_order):
        if row.label not in present:
            held.remove(row)
            keep.append(row)
            present.add(row.label)
    return sorted(keep, key=_order), sorted(held, key=_order)


def _order(row: _Row) -> tuple[str, str, str]:
    return _label(row), row.id, str(row.rgb)


def _fill_splits(
    rows: dict[str, list[_Row] | None], data: DataSpec, seed: int
) -> dict[str, list[_Row]]:
    """Draw the missing val/test splits from train so their fractions are of all the data."""
    fractions = {"val": data.val_fraction, "test": data.test_fraction}
    out = {split: sorted(r, key=_order) for split, r in rows.items() if r is not None}
    # The share of all the data the train pool stands for: train plus the missing splits.
    share = 1.0 - sum(f for split, f in fractions.items() if rows[split] is not None)
    pool = out["train"]
    for offset, split in enumerate(("test", "val")):
        if rows[split] is None:
            pool, out[split] = holdout(pool, fractions[split] / share, seed + offset)
            share -= fractions[split]
    out["train"] = pool
    return out


def fingerprint(root: Path, used: list[Path], options: dict[str, Any]) -> str:
    """Hash the options and the (relative path, size, mtime_ns) of every file used."""
    digest = hashlib.sha256(
        json.dumps({"version": INDEX_VERSION, **options}, sort_keys=True).encode()
    )
    gone: list[str] = []
    for path in sorted(set(used)):
        try:
            st = path.stat()
        except OSError:
            gone.append(_rel(path, root))
            continue
        digest.update(
            os.fsencode(_rel(path, root)) + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode()
        )
    if gone:
        fail("files that vanished while the data set was read", gone, root)
    return digest.hexdigest()
