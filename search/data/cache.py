"""Arrays built once per machine and reused: decoded images, the balanced training set.

:func:`cached_arrays` is the generic mechanism: a directory of ``.npy`` files per key,
built under a file lock into a temporary directory and renamed into place, so that
concurrent worker processes neither corrupt it nor all build it. :func:`streamed_arrays`
is the same for arrays written a block of rows at a time as they are made:
:func:`load_split_arrays` uses it for the decoded, resized images of every split, so a data
set larger than the memory can be cached (see docs/INTERNALS.md, "Arrays").
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
_BLOCK_BYTES = 8 * 2**20  # rows decoded before they are written: the build's memory


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
    are returned as read-only memory maps (``np.load(mmap_mode="r")``). ``build`` holds its
    arrays in memory; :func:`streamed_arrays` writes them as they are made instead.

    Args:
        cache_dir: Directory holding one sub-directory per key.
        key: Names the sub-directory; letters, digits and ``_.=-`` only.
        build: Makes the arrays; names must follow the same rule as ``key``, arrays must
            not be object arrays.

    Raises:
        DataError: the cache directory cannot be created or written.
    """
    def fill(entry: NewEntry) -> None:
        for name, array in build().items():
            entry.save(name, array)

    return streamed_arrays(cache_dir, key, fill)


def streamed_arrays(
    cache_dir: Path, key: str, fill: Callable[[NewEntry], None]
) -> dict[str, np.ndarray]:
    """Like :func:`cached_arrays`, but ``fill`` writes into the new entry as it goes.

    ``fill`` declares each array (:meth:`NewEntry.create`) and writes its rows in blocks, so
    a cache larger than the memory can be built. The entry is a temporary directory until
    ``fill`` returns; then its marker is written and it is renamed into place, so a reader
    never sees a half-written entry (a builder that dies leaves only the temporary
    directory, which the next builder removes).

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
            _build(cache_dir, final, fill)
            arrays = _open(final)
    if arrays is None:
        raise DataError(f"the cache entry {final} is unreadable right after it was written")
    return arrays


class NewEntry:
    """A cache entry being built: one ``.npy`` file per array in a temporary directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._meta: dict[str, dict[str, object]] = {}
        self._open: list[_Rows] = []

    def save(self, name: str, array: np.ndarray) -> None:
        """Store a whole array at once (the small ones)."""
        array = np.ascontiguousarray(array)
        with self._writing():
            np.save(self._path(name, array.shape, array.dtype), array, allow_pickle=False)

    def create(self, name: str, shape: tuple[int, ...], dtype: np.dtype | type) -> _Rows:
        """Lay out an array on disk (header, full size, zeros) and return its row writer."""
        with self._writing():
            path = self._path(name, shape, np.dtype(dtype))
            # open_memmap writes the .npy header and sizes the (sparse) file; the rows are
            # then written with pwrite, not through the mapping: pages written through a
            # shared mapping stay in this process's resident set (VmRSS) until evicted.
            layout = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
            offset = layout.offset
            del layout
            rows = _Rows(path, offset, shape, np.dtype(dtype))
        self._open.append(rows)
        return rows

    def _path(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> Path:
        if not _NAME.match(name) or name in self._meta:
            raise ValueError(f"invalid or repeated array name {name!r}")
        self._meta[name] = {"shape": list(shape), "dtype": str(dtype)}
        return self.directory / f"{name}.npy"

    def finish(self, final: Path) -> None:
        """Close the files, write the marker (last), and rename the entry into place."""
        with self._writing():
            for rows in self._open:
                rows.close()
            (self.directory / _MARKER).write_text(json.dumps({"arrays": self._meta}, indent=1))
            os.rename(self.directory, final)

    def close(self) -> None:
        for rows in self._open:
            rows.close()

    @contextmanager
    def _writing(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise DataError(f"cannot write the cache in {self.directory.parent}: {exc}") from exc


class _Rows:
    """Writes blocks of rows of one ``.npy`` file in place (``os.pwrite``, GIL released)."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.shape, self.dtype = path, tuple(shape), dtype
        self._offset = offset
        self._row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self._fd: int | None = os.open(path, os.O_WRONLY)

    def write(self, start: int, block: np.ndarray) -> None:
        """Write ``block`` as rows ``start, start + 1, ...``."""
        if block.dtype != self.dtype or block.shape[1:] != self.shape[1:] or (
                start < 0 or start + len(block) > self.shape[0]):
            raise ValueError(f"rows {start}..{start + len(block)} of {block.dtype} "
                             f"{block.shape} do not fit {self.dtype} {self.shape}")
        assert self._fd is not None, "written after close"
        data = np.ascontiguousarray(block).data.cast("B")
        position = self._offset + start * self._row_bytes
        try:
            while data:  # pwrite may write less than asked (large blocks)
                done = os.pwrite(self._fd, data, position)
                data, position = data[done:], position + done
        except OSError as exc:
            raise DataError(f"cannot write the cache file {self.path}: {exc}") from exc

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


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


def _build(cache_dir: Path, final: Path, fill: Callable[[NewEntry], None]) -> None:
    """Run ``fill`` on a new temporary entry, then move it to ``final`` (we hold the lock)."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache_dir))
    except OSError as exc:
        raise DataError(f"cannot write the cache in {cache_dir}: {exc}") from exc
    entry = NewEntry(tmp)
    try:
        fill(entry)
        entry.finish(final)
    except BaseException:
        entry.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def split_cache_key(index: DatasetIndex, resolution: int, resize: str = DEFAULT_RESIZE,
                    depth_range: tuple[float, float] | None = None,
                    splits: tuple[str, ...] = SPLITS) -> str:
    """The cache key of the decoded ``splits`` of ``index`` at ``resolution``.

    Everything that changes the decoded bytes is in it: the files (the fingerprint), the
    resolution, the resize mode, the depth range and the decoder's version; and which
    splits the entry holds, when not all of them (the training images decoded with a
    margin for crops: ``train-...``).
    """
    depth = "" if depth_range is None else f"-depth{depth_range[0]!r}_{depth_range[1]!r}"
    held = "splits" if tuple(splits) == SPLITS else "-".join(splits)
    return (f"{held}-{index.fingerprint[:24]}-{resolution}px-{resize}{depth}"
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
    index: DatasetIndex, resolution: int, cache_dir: Path, resize: str = DEFAULT_RESIZE, *,
    splits: tuple[str, ...] = SPLITS, fit_resolution: int | None = None,
) -> dict[str, SplitArrays]:
    """Decode and resize every image of ``index`` once, and return the splits as arrays.

    The images are cached under :func:`split_cache_key`, so every later trial and every
    process on the machine reuses them, and any change to a data file (which changes the
    fingerprint) rebuilds them. They are written to disk as they are decoded and read back
    as memory maps: the data set never has to fit in memory. Depth is scaled into
    :func:`depth_range`, fitted at ``fit_resolution`` (default: ``resolution``), so images
    decoded at another size for the same study share its range. Labels, numeric values,
    texts and ids come from the index, which already holds them.

    Raises:
        DataError: some images cannot be decoded; names the first files and the count.
    """
    fitted = depth_range(index, fit_resolution or resolution, resize, cache_dir)
    images = streamed_arrays(
        Path(cache_dir),
        split_cache_key(index, resolution, resize, fitted, splits),
        lambda entry: _decode_splits(index, resolution, resize, fitted, entry, splits),
    )
    return {name: arrays for name, arrays in split_arrays(index, images).items()
            if name in splits}


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
                   fitted: tuple[float, float] | None, entry: NewEntry,
                   splits: tuple[str, ...] = SPLITS) -> None:
    """Decode the images of ``splits`` of ``index`` into ``entry``, a block of rows at a time.

    Only one block per array is in memory (about :data:`_BLOCK_BYTES`), so the peak memory
    does not grow with the data set. All undecodable images are reported at once.
    """
    def decode_into(job: tuple[Path, str, np.ndarray, int]) -> str | None:
        path, modality, block, row = job
        try:
            block[row] = decode_image(path, modality, resolution, resize=resize,
                                      depth_range=fitted)
        except ImageError as error:
            return f"{os.path.relpath(path, index.root)} ({error.reason})"
        return None

    threads = decode_threads()
    bad: list[str] = []
    with ThreadPoolExecutor(threads) as pool:
        for split in splits:
            samples = index.splits[split]
            for modality, channels in (("rgb", 3), ("depth", 1)):
                if modality not in index.modalities:
                    continue
                shape = (len(samples), resolution, resolution, channels)
                rows = entry.create(f"{split}.{modality}", shape, np.uint8)
                # Blocks of many rows keep every thread busy and the writes large.
                step = max(4 * threads, _BLOCK_BYTES // (resolution * resolution * channels))
                buffer = np.empty((min(step, len(samples)), *shape[1:]), np.uint8)  # reused
                for start in range(0, len(samples), step):
                    block = buffer[:len(samples) - start]
                    jobs = [(getattr(sample, modality), modality, block, row)
                            for row, sample in enumerate(samples[start:start + len(block)])]
                    bad += [problem for problem in pool.map(decode_into, jobs) if problem]
                    rows.write(start, block)
    if bad:
        fail("unreadable or corrupt images", bad, index.root)
