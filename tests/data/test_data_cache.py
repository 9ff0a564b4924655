"""cached_arrays and load_split_arrays: built once, reused, rebuilt on change, safe to share."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import search.data.cache as cache
from search.data.cache import cached_arrays, load_split_arrays, split_cache_key, streamed_arrays
from search.data.index import load_index


def _arrays() -> dict[str, np.ndarray]:
    return {"x": np.arange(12, dtype=np.float32).reshape(3, 4), "names": np.array(["a", "bc"])}


def test_built_once_then_reused_as_memory_maps(tmp_path: Path):
    calls = []

    def build():
        calls.append(1)
        return _arrays()

    first = cached_arrays(tmp_path, "k1", build)
    second = cached_arrays(tmp_path, "k1", build)
    assert len(calls) == 1
    for result in (first, second):
        assert isinstance(result["x"], np.memmap) and not result["x"].flags.writeable
        np.testing.assert_array_equal(result["x"], _arrays()["x"])
        assert result["names"].tolist() == ["a", "bc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".k1.lock", "k1"]


def test_half_written_entries_are_rebuilt(tmp_path: Path):
    cached_arrays(tmp_path, "k1", _arrays)
    (tmp_path / "k1" / "meta.json").unlink()  # as if the writer died before the marker
    (tmp_path / ".k1.tmp-dead").mkdir()  # a dead builder's leftovers
    calls = []
    result = cached_arrays(tmp_path, "k1", lambda: calls.append(1) or _arrays())
    assert calls == [1] and result["x"].shape == (3, 4)
    assert not (tmp_path / ".k1.tmp-dead").exists()


def test_damaged_arrays_are_rebuilt(tmp_path: Path):
    cached_arrays(tmp_path, "k1", _arrays)
    (tmp_path / "k1" / "x.npy").write_bytes(b"\x93NUMPY garbage")
    calls = []
    cached_arrays(tmp_path, "k1", lambda: calls.append(1) or _arrays())
    assert calls == [1]


def test_a_failing_build_leaves_nothing(tmp_path: Path):
    def build():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cached_arrays(tmp_path, "k1", build)
    assert [p.name for p in tmp_path.iterdir()] == [".k1.lock"]
    assert cached_arrays(tmp_path, "k1", _arrays)["x"].shape == (3, 4)


def test_a_streamed_entry_is_invisible_until_complete_and_byte_identical(tmp_path: Path):
    expected = np.arange(6 * 4, dtype=np.uint8).reshape(6, 2, 2)

    def dies_halfway(entry):
        rows = entry.create("x", expected.shape, np.uint8)
        rows.write(0, expected[:3])
        assert cached_arrays(tmp_path, "other", _arrays)  # the lock is per key
        assert not (tmp_path / "k1").exists()  # written rows are not an entry yet
        raise KeyboardInterrupt  # the builder is stopped midway

    with pytest.raises(KeyboardInterrupt):
        streamed_arrays(tmp_path, "k1", dies_halfway)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".k1.lock", ".other.lock", "other"]

    def fills(entry):
        rows = entry.create("x", expected.shape, np.uint8)
        rows.write(3, expected[3:])  # blocks in any order
        rows.write(0, expected[:3])
        with pytest.raises(ValueError):
            rows.write(5, expected[:3])  # past the end

    result = streamed_arrays(tmp_path, "k1", fills)
    np.testing.assert_array_equal(result["x"], expected)
    # The same bytes np.save writes: entries from before streaming stay valid (no new
    # DECODE_VERSION needed).
    np.save(tmp_path / "saved.npy", expected)
    assert (tmp_path / "k1" / "x.npy").read_bytes() == (tmp_path / "saved.npy").read_bytes()


def test_bad_keys_and_object_arrays_are_refused(tmp_path: Path):
    with pytest.raises(ValueError):
        cached_arrays(tmp_path, "../escape", _arrays)
    with pytest.raises(ValueError):
        cached_arrays(tmp_path, "k2", lambda: {"o": np.array([object()])})
    assert not (tmp_path / "k2").exists()


def _slow_build(counter: str) -> dict[str, np.ndarray]:
    with open(counter, "a") as handle:
        handle.write(f"{os.getpid()}\n")
    time.sleep(0.5)  # long enough for the other process to be waiting on the lock
    return _arrays()


def _worker(cache_dir: str, counter: str, barrier, results) -> None:
    barrier.wait()
    arrays = cached_arrays(Path(cache_dir), "shared", lambda: _slow_build(counter))
    results.put((os.getpid(), float(np.asarray(arrays["x"]).sum())))


def test_concurrent_builders_build_once(tmp_path: Path):
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    counter = tmp_path / "builds.txt"
    processes = [
        context.Process(target=_worker, args=(str(tmp_path / "c"), str(counter), barrier, results))
        for _ in range(2)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    sums = [results.get(timeout=5)[1] for _ in processes]
    assert sums == [66.0, 66.0]
    assert len(counter.read_text().splitlines()) == 1
    assert cached_arrays(tmp_path / "c", "shared", lambda: pytest.fail("rebuilt"))["x"].sum() == 66


def test_split_arrays_follow_internals_contract(make_folders, spec, tmp_path: Path):
    root = make_folders()
    for modality in ("rgb", "depth", "numeric", "text"):
        modalities = ["rgb"] if modality == "rgb" else ["rgb", modality]
        index = load_index(spec(root, modalities=modalities), seed=0)
        splits = load_split_arrays(index, 4, tmp_path / "cache")
        assert set(splits) == {"train", "val", "test"}
        train = splits["train"]
        assert train.labels.dtype == np.int64 and len(train) == len(index.splits["train"])
        assert train.images["rgb"].shape == (len(train), 4, 4, 3)
        assert train.images["rgb"].dtype == np.uint8
        assert train.ids == [s.id for s in index.splits["train"]]
        assert [index.classes[i] for i in train.labels] == [s.label for s in index.splits["train"]]
        assert ("depth" in train.images) == (modality == "depth")
        if modality == "depth":
            assert train.images["depth"].shape == (len(train), 4, 4, 1)
        if modality == "numeric":
            assert train.numeric is not None and train.numeric.dtype == np.float32
            assert train.numeric.shape == (len(train), 2)
        else:
            assert train.numeric is None
        assert (train.text is not None) == (modality == "text")
    # The colour survives the resize: apple is red.
    apple = splits["val"].labels.tolist().index(index.classes.index("apple"))
    assert tuple(splits["val"].images["rgb"][apple, 2, 2]) == (200, 30, 30)


def test_split_arrays_are_cached_and_rebuilt_on_change(make_folders, spec, tmp_path, monkeypatch):
    root = make_folders()
    builds = []
    real = cache._decode_splits
    monkeypatch.setattr(cache, "_decode_splits", lambda *a: builds.append(1) or real(*a))
    data = spec(root, modalities=["rgb", "depth"])

    index = load_index(data, seed=0)
    load_split_arrays(index, 8, tmp_path / "cache")
    load_split_arrays(load_index(data, seed=0), 8, tmp_path / "cache")
    assert len(builds) == 1
    load_split_arrays(index, 6, tmp_path / "cache")  # another resolution is another entry
    assert len(builds) == 2

    changed = root / "val/depth/pear/pear0.png"
    Image.new("L", (8, 8), 7).save(changed)
    new_index = load_index(data, seed=0)
    assert split_cache_key(new_index, 8) != split_cache_key(index, 8)
    splits = load_split_arrays(new_index, 8, tmp_path / "cache")
    assert len(builds) == 3
    row = splits["val"].ids.index("pear0")
    assert int(splits["val"].images["depth"][row].max()) == 7


def test_decode_threads_follow_the_affinity_mask_and_the_cgroup_quota(tmp_path):
    from search.data.cache import decode_threads

    mask = os.sched_getaffinity(0)
    allowed = len(mask)
    assert decode_threads(tmp_path / "missing") == allowed
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert decode_threads(tmp_path / "cpu.max") == allowed
    (tmp_path / "cpu.max").write_text("100000 100000\n")  # a Kubernetes limit of 1 CPU
    assert decode_threads(tmp_path / "cpu.max") == 1
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU still gets one thread
    assert decode_threads(tmp_path / "cpu.max") == 1
    os.sched_setaffinity(0, {min(mask)})  # as `taskset -c 0` or a Slurm allocation of 1 CPU
    try:
        assert decode_threads(tmp_path / "missing") == 1
    finally:
        os.sched_setaffinity(0, mask)


_PEAK_SCRIPT = """
import json, sys
from pathlib import Path
from search.config import DataConfig
from search.data.cache import load_split_arrays
from search.data.index import load_index

def status(field):
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(field))

root, cache_dir, resolution = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
data = DataConfig(root=root, modalities=["rgb", "depth"], cache_dir=cache_dir)
index = load_index(data, seed=0)
try:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # VmHWM := VmRSS now: the peak below is the build's alone
except OSError:
    pass  # not allowed here: the peak then includes the imports' (a stricter test)
before = status("VmRSS:")
splits = load_split_arrays(index, resolution, cache_dir)
total = sum(array.nbytes for split in splits.values() for array in split.images.values())
print(json.dumps({"growth": status("VmHWM:") - before, "total": total}))
"""


def _noise_set(root: Path, per_split: dict[str, int]) -> None:
    """Tiny (16 px) noise images: cheap to write, decoded up to the cache's resolution."""
    rng = np.random.default_rng(0)
    for split, count in per_split.items():
        for i in range(count):
            label = ("a", "b")[i % 2]
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8)).save(
                _mkdir(root / split / "rgb" / label) / f"s{i}.png")
            Image.fromarray(rng.integers(0, 256, (16, 16), np.uint8)).save(
                _mkdir(root / split / "depth" / label) / f"s{i}.png")


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.slow
def test_building_the_cache_keeps_the_peak_memory_below_a_quarter_of_the_arrays(tmp_path):
    # 1,000 samples, rgb + depth at 160 px: 102 MB of arrays, built whole in RAM by the
    # old code (growth >= 100%); streamed, one block of rows at a time, it must stay < 25%.
    root = tmp_path / "set"
    _noise_set(root, {"train": 700, "val": 150, "test": 150})
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(root), str(tmp_path / "c"),
                           "160"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.splitlines()[-1])
    assert figures["total"] == 1000 * 160 * 160 * 4
    assert figures["growth"] < 0.25 * figures["total"], figures
