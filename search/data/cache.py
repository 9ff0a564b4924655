"""Arrays built once per machine and reused: decoded images, the balanced training set.

:func:`cached_arrays` is the generic mechanism: a directory of ``.npy`` files per key,
built under a file lock into a temporary directory and renamed into place, so that
concurrent worker processes neither corrupt it nor all build it. :func:`load_split_arrays`
uses it for the decoded, resized images of every split (see docs/INTERNALS.md, "Arrays").
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

from search.data.decode import (
    DECODE_VERSION,
    DEFAULT_RESIZE,
    SPLITS,
    ImageError,
    decode_image,
    fit_depth_range,
)
from search.data.index import DatasetIndex, fail
from search.errors import DataError

_MARKER = "meta.json"  # written last: a directory without it is incomplete
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=-]*$")
# PIL decodes and resizes with the GIL released, so threads use both cores without the
# start-up cost (and fork-safety worries) of a process pool. Measured on 2 busy cores:
# 1024x768 JPEG 4.5 -> 2.8 ms, 64 px PNG 0.8 -> 0.63 ms per image; see bench/data_cache.py.


def decode_threads(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """Threads to decode with: the CPUs this process may use, not the machine's.

    ``os.cpu_count()`` counts every core of the host; Slurm, taskset and Kubernetes' static CPU
    manager narrow the affinity mask, and a Kubernetes CPU limit is a cgroup quota
    (``cpu.max``: "200000 100000" is 2 CPUs). The cache is decoded by one process per host (the
    first to take its lock; ``search run`` before its workers start), so it may use them all.
    """
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        allowed = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            allowed = min(allowed, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota to honour
    return max(1, allowed)


@dataclass(frozen=True)
class SplitArrays:
    """One split in memory; image arrays are read-only memory maps of the cache."""

    labels: np.ndarray  # int64 [N], index into DatasetIndex.classes
    images: dict[str, np.ndarray]  # "rgb": uint8 [N, H, W, 3], "depth": uint8 [N, H, W, 1]
    numeric: np.ndarray | None  # float32 [N, F]
    text: list[str] | None
    ids: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def cached_arrays(
    cache_dir: Path, key: str, build: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Return the arrays stored under ``key``, building and storing them on first use.

    ``build`` runs at most once per key on this machine, even when several processes
    ask at the same time: the others wait on a lock and then read what it wrote. Arrays
    are returned as read-only memory maps (``np.load(mmap_mode="r")``).

    Args:
        cache_dir: Directory holding one sub-directory per key.
        key: Names the sub-directory; letters, digits and ``_.=-`` only.
        build: Makes the arrays; names must follow the same rule as ``key``, arrays must
            not be object arrays.

    Raises:
        DataError: the cache directory cannot be created or written.
    """
    if not _NAME.match(key):
        raise ValueError(f"invalid cache key {key!r}")
    final = cache_dir / key
    arrays = _open(final)
    if arrays is not None:
        return arrays
    with _locked(cache_dir, key):
        # Whoever held the lock before us may have built it meanwhile.
        arrays = _open(final)
        if arrays is None:
            _clear_leftovers(cache_dir, key)
            built = build()
            try:
                _store(cache_dir, final, built)
            except OSError as exc:
                raise DataError(f"cannot write the cache in {cache_dir}: {exc}") from exc
            arrays = _open(final)
    if arrays is None:
        raise DataError(f"the cache entry {final} is unreadable right after it was written")
    return arrays


@contextmanager
def _locked(cache_dir: Path, key: str) -> Iterator[None]:
    """Hold an exclusive lock for ``key`` (filelock: an OS lock the kernel drops if we die).

    No timeout: the holder is decoding the same entry, and waiting for it is cheaper than
    decoding twice.
    """
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(cache_dir / f".{key}.lock")
        lock.acquire()
    except OSError as exc:
        raise DataError(f"cannot use the cache directory {cache_dir}: {exc}") from exc
    try:
        yield
    finally:
        lock.release()


def _open(directory: Path) -> dict[str, np.ndarray] | None:
    """Open a complete entry, or return None when it is missing, partial or damaged."""
    try:
        meta = json.loads((directory / _MARKER).read_text())
        arrays = {}
        for name, spec in meta["arrays"].items():
            array = np.load(directory / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            if list(array.shape) != spec["shape"] or str(array.dtype) != spec["dtype"]:
                return None
            arrays[name] = array
        return arrays
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _clear_leftovers(cache_dir: Path, key: str) -> None:
    """Remove a damaged entry and temporary directories of builders that died (we hold the lock)."""
    for path in [cache_dir / key, *cache_dir.glob(f".{key}.tmp-*")]:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _store(cache_dir: Path, final: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` into a temporary directory, marker last, then rename it to ``final``."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache_dir))
    try:
        meta: dict[str, dict[str, object]] = {}
        for name, array in arrays.items():
            if not _NAME.match(name):
                raise ValueError(f"invalid array name {name!r}")
            array = np.ascontiguousarray(array)
            np.save(tmp / f"{name}.npy", array, allow_pickle=False)
            meta[name] = {"shape": list(array.shape), "dtype": str(array.dtype)}
        (tmp / _MARKER).write_text(json.dumps({"arrays": meta}, indent=1))
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def split_cache_key(index: DatasetIndex, resolution: int, resize: str = DEFAULT_RESIZE,
                    depth_range: tuple[float, float] | None = None) -> str:
    """The cache key of the decoded splits of ``index`` at ``resolution``.

    Everything that changes the decoded bytes is in it: the files (the fingerprint), the
    resolution, the resize mode, the depth range and the decoder's version.
    """
    depth = "" if depth_range is None else f"-depth{depth_range[0]!r}_{depth_range[1]!r}"
    return (f"splits-{index.fingerprint[:24]}-{resolution}px-{resize}{depth}"
            f"-v{DECODE_VERSION}")


def depth_range(index: DatasetIndex, resolution: int, resize: str,
                cache_dir: Path) -> tuple[float, float] | None:
    """The depth range fitted on the training split (:func:`~search.data.decode.fit_depth_range`).

    None without depth, or when every training depth map is 8-bit. Cached like the
    images, so every worker reads the same two numbers instead of decoding train again.

    Raises:
        DataError: a training depth map cannot be decoded.
    """
    if "depth" not in index.modalities:
        return None
    key = f"depthrange-{index.fingerprint[:24]}-{resolution}px-{resize}-v{DECODE_VERSION}"

    def build() -> dict[str, np.ndarray]:
        try:
            fitted = fit_depth_range([s.depth for s in index.splits["train"] if s.depth],
                                     resolution, resize)
        except ImageError as error:
            raise DataError(f"a training depth map of {index.root} cannot be decoded "
                            f"({error.reason})") from None
        # NaN stands for "not fitted" (8-bit depth), which .npy cannot store as None.
        return {"range": np.array(fitted if fitted else (np.nan, np.nan), np.float64)}

    low, high = (float(v) for v in cached_arrays(Path(cache_dir), key, build)["range"])
    return None if np.isnan(low) else (low, high)


def load_split_arrays(
    index: DatasetIndex, resolution: int, cache_dir: Path, resize: str = DEFAULT_RESIZE
) -> dict[str, SplitArrays]:
    """Decode and resize every image of ``index`` once, and return all splits as arrays.

    The images are cached under :func:`split_cache_key`, so every later trial and every
    process on the machine reuses them, and any change to a data file (which changes the
    fingerprint) rebuilds them. Depth is scaled into :func:`depth_range`. Labels, numeric
    values, texts and ids come from the index, which already holds them.

    Raises:
        DataError: some images cannot be decoded; names the first files and the count.
    """
    fitted = depth_range(index, resolution, resize, cache_dir)
    images = cached_arrays(
        Path(cache_dir),
        split_cache_key(index, resolution, resize, fitted),
        lambda: _decode_splits(index, resolution, resize, fitted),
    )
    return split_arrays(index, images)


def split_arrays(index: DatasetIndex, images: dict[str, np.ndarray]) -> dict[str, SplitArrays]:
    """Every split of ``index`` as arrays, with the decoded ``images`` keyed ``<split>.<modality>``.

    Labels, numeric values, texts and ids come from the index. Image modalities missing from
    ``images`` are left out, so passing ``{}`` gives splits without pixels.
    """
    class_id = {name: i for i, name in enumerate(index.classes)}
    result = {}
    for split, samples in index.splits.items():
        numeric = None
        if index.numeric_names is not None:
            numeric = np.array([s.numeric for s in samples], np.float32)
            numeric = numeric.reshape(len(samples), len(index.numeric_names))
        result[split] = SplitArrays(
            labels=np.array([class_id[s.label] for s in samples], np.int64),
            images={m: images[key] for m in ("rgb", "depth")
                    if (key := f"{split}.{m}") in images},
            numeric=numeric,
            text=[s.text or "" for s in samples] if "text" in index.modalities else None,
            ids=[s.id for s in samples],
        )
    return result


def _decode_splits(index: DatasetIndex, resolution: int, resize: str,
                   fitted: tuple[float, float] | None) -> dict[str, np.ndarray]:
    """Decode the images of every split of ``index``; report all undecodable ones at once."""
    arrays: dict[str, np.ndarray] = {}
    jobs: list[tuple[Path, str, np.ndarray, int]] = []
    for split in SPLITS:
        samples = index.splits[split]
        for modality, channels in (("rgb", 3), ("depth", 1)):
            if modality in index.modalities:
                stack = np.empty((len(samples), resolution, resolution, channels), np.uint8)
                arrays[f"{split}.{modality}"] = stack
                jobs += [(getattr(s, modality), modality, stack, i) for i, s in enumerate(samples)]

    def decode_into(job: tuple[Path, str, np.ndarray, int]) -> str | None:
        path, modality, stack, row = job
        try:
            stack[row] = decode_image(path, modality, resolution, resize=resize,
                                      depth_range=fitted)
        except ImageError as error:
            return f"{os.path.relpath(path, index.root)} ({error.reason})"
        return None

    with ThreadPoolExecutor(decode_threads()) as pool:
        bad = [problem for problem in pool.map(decode_into, jobs) if problem is not None]
    if bad:
        fail("unreadable or corrupt images", bad, index.root)
    return arrays
