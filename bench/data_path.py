"""Does the data path keep the device busy? Three measurements, one line per configuration.

* ``host``: images/s of the host's share of a training batch alone (gather the uint8 rows
  of cached arrays, pin them when the device is CUDA, enqueue: what the prefetcher's
  thread does before the copy), no model, for 1 and N workers (N threads gathering at once,
  N = the CPUs this process may use), at each resolution, rgb and rgb+depth.
* ``ratio``: end-to-end training images/s (prefetcher, device-side flips and turns,
  normalisation, step) over model-only images/s (the same step on synthetic batches
  already on the device) for one backbone on the current device. 1.00 means the data path
  costs the training nothing.
* ``stub``: the whole prefetcher, device-side flips and turns (and, with ``--crop``, the
  random-resized crop from images cached at 1.25x the size) included, feeding a stub
  "model" that sleeps 25 ms per 64 images (an A100's pace on b0 at 224 px) without using
  the CPU; prints the share of the stub's rate it achieved. On a CPU machine the "device"
  is the CPU, so the augmentation and normalisation (one numba pass, ``augment.fused``)
  compete with the gather for cores.

The cached arrays are synthetic: in RAM, or with ``--arrays memmap`` written to ``.npy``
files and read back as the read-only memory maps a trial trains from (the cache's own
format; the page cache is warm, as on a machine whose cache has been read once). Example,
from the repository root:
    .venv/bin/python -m bench.data_path --resolutions 224
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import augment
import models
from search.data.prepared import Split
from search.trial.prefetch import DEPTH, DeviceBatches, Prefetcher, keep_freed_host_memory
from search.trial.train import Speedups, make_scaler, train_step

MODALITIES = {"rgb": ("rgb",), "rgb+depth": ("rgb", "depth")}
CHANNELS = {"rgb": 3, "depth": 1}
STUB_S_PER_64 = 0.025


def synthetic_split(resolution: int, modalities: tuple[str, ...], rows: int, *,
                    flips: bool = False, folder: Path | None = None) -> Split:
    """A training split of random uint8 images (and labels of 10 classes).

    With ``folder``, the images are saved there as ``.npy`` files and mapped back read-only,
    as :func:`search.data.cache.cached_arrays` returns them.
    """
    rng = np.random.default_rng(0)
    images = {m: rng.integers(0, 256, (rows, resolution, resolution, CHANNELS[m]), np.uint8)
              for m in modalities}
    if folder is not None:
        for name, array in images.items():
            np.save(folder / f"{name}-{resolution}.npy", array, allow_pickle=False)
        images = {name: np.load(folder / f"{name}-{resolution}.npy", mmap_mode="r")
                  for name in images}
    split = Split(labels=np.arange(rows) % 10, images=images)
    if flips:
        split.flip_ops = augment.ONLINE_OPS
        split.generator = torch.Generator().manual_seed(0)
    return split


def row_batches(n_rows: int, batch: int, count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` random batches of row indices, as an epoch's permutation gives them."""
    rng = np.random.default_rng(seed)
    return [rng.choice(n_rows, batch, replace=False) for _ in range(count)]


def host_rate(split: Split, batch: int, count: int, workers: int, pin: bool) -> float:
    """Images/s of ``workers`` prefetch threads each gathering (+ pinning) ``count`` batches."""
    def consume(seed: int) -> None:
        batches = row_batches(len(split), batch, count, seed)
        with Prefetcher(batches, lambda rows: split.gather(rows, pin=pin)) as prefetched:
            for _ in prefetched:
                pass

    threads = [threading.Thread(target=consume, args=(seed,)) for seed in range(workers)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return workers * count * batch / (time.perf_counter() - start)


def stub_share(split: Split, batch: int, count: int,
               device: torch.device) -> tuple[float, float, float]:
    """(share of the stub's rate in %, images/s, the stub's images/s alone) of the
    prefetcher feeding a sleeping stub.

    The stub's rate is measured alone, in this process, over the same number of batches
    (a sleep overshoots by a fraction of a millisecond). The warm-up runs at the stub's
    pace long enough to fill the queue, so the heap has grown to hold the batches alive at
    once (a trial's first epoch pays that, once); the timed run still pays its first batch,
    made before the stub can start, as every epoch does.
    """
    batches = row_batches(len(split), batch, count)
    pause = STUB_S_PER_64 * batch / 64

    def fed(rows: list[np.ndarray]) -> float:
        """Seconds to feed ``rows`` to the stub, the prefetcher's start included."""
        start = time.perf_counter()
        with DeviceBatches(split, rows, device=device, channels_last=True) as prefetched:
            for inputs, _labels in prefetched:
                if device.type == "cuda":  # the batch really is there (not the next ones)
                    torch.cuda.current_stream(device).synchronize()
                time.sleep(pause)  # the stub: busy elsewhere, not on this CPU
                del inputs
        return time.perf_counter() - start

    fed(batches[:DEPTH + 3])
    start = time.perf_counter()
    for _ in batches:
        time.sleep(pause)
    alone = time.perf_counter() - start
    seconds = fed(batches)
    return 100 * alone / seconds, count * batch / seconds, count * batch / alone


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_ratio(backbone: str, resolution: int, batch: int, steps: int, device: torch.device,
                speed: Speedups) -> tuple[float, float]:
    """(end-to-end, model-only) training images/s of ``backbone`` on rgb at ``resolution``."""
    torch.manual_seed(0)
    spec = models.ModelSpec(backbone=backbone, fusion="none", num_classes=10,
                            resolution=resolution)
    model = models.create_model(spec).to(device)
    memory = torch.channels_last if speed.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn, scaler = nn.CrossEntropyLoss(), make_scaler(device, speed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    def step(inputs: dict, labels: torch.Tensor) -> None:
        train_step(model, inputs, labels, loss_fn=loss_fn, optimizer=optimizer, scaler=scaler,
                   device=device, speed=speed)

    split = synthetic_split(resolution, ("rgb",), max(4 * batch, 256), flips=True)
    fixed, labels = split.to_device(split.gather(np.arange(batch)), device, speed.channels_last)

    def model_only() -> float:
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step(fixed, labels)
        _sync(device)
        return steps * batch / (time.perf_counter() - start)

    def end_to_end() -> float:
        batches = row_batches(len(split), batch, steps, seed=1)
        start = time.perf_counter()
        with DeviceBatches(split, batches, device=device,
                           channels_last=speed.channels_last) as prefetched:
            for inputs, targets in prefetched:
                step(inputs, targets)
        _sync(device)
        return steps * batch / (time.perf_counter() - start)

    for _ in range(3):  # warm-up: kernel selection, allocator
        step(fixed, labels)
    # Model-only before and after: a drift in the machine's speed (other jobs) cancels out.
    before, through, after = model_only(), end_to_end(), model_only()
    return through, (before + after) / 2


def default_speed(device: torch.device) -> Speedups:
    """What a trial uses (search.trial.objective.pick_speedups with train defaults)."""
    amp = models.amp_dtype(device) if device.type == "cuda" else None
    return Speedups(channels_last=True, autocast_dtype=amp)


def host_and_stub_lines(args: argparse.Namespace, resolution: int, name: str,
                        modalities: tuple[str, ...], device: torch.device, skip: set[str],
                        folder: Path | None) -> None:
    """Print the host lines (and the stub line, for rgb + depth) of one configuration."""
    pin = device.type == "cuda"
    rows = max(4 * args.batch, 256)
    split = synthetic_split(resolution, modalities, rows, folder=folder)
    if "host" not in skip:
        host_rate(split, args.batch, 4, 1, pin)  # warm-up: first touches, pinned pool
        for workers in sorted({1, args.workers}):
            rate = host_rate(split, args.batch, args.batches, workers, pin)
            print(f"host   {resolution:4d} px  {name:<9}  batch {args.batch}  "
                  f"workers {workers:2d}  {args.arrays:<6}  gather{'+pin' if pin else ''}"
                  f"+enqueue  {rate:9.0f} img/s", flush=True)
    if "stub" not in skip and name == "rgb+depth":
        ops = "flips+turns"
        if args.crop:  # the images as cached for crops: 1.25x the side, cropped to it
            split = synthetic_split(augment.source_size(resolution), modalities, rows,
                                    folder=folder)
            split.crop_to, ops = resolution, "flips+turns+crop"
        split.flip_ops = augment.ONLINE_OPS
        split.generator = torch.Generator().manual_seed(0)
        share, rate, alone = stub_share(split, args.batch, args.stub_batches, device)
        print(f"stub   {resolution:4d} px  {name:<9}  batch {args.batch}  {args.arrays:<6}  "
              f"{ops} on {device.type}  {rate:7.0f} img/s = {share:5.1f}% "
              f"of the stub's {alone:.0f} img/s alone (nominal {64 / STUB_S_PER_64:.0f})",
              flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolutions", default="64,128,224,380",
                        help="comma-separated sizes in px for the host and stub lines")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=150, help="batches timed per host line")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="N of the N-worker host lines (default: the usable CPUs)")
    # 100 x 25 ms: the first batch, made before the stub starts, weighs about 1% (an epoch
    # at 224 px is hundreds of batches; 40 would charge it 2-3%).
    parser.add_argument("--stub-batches", type=int, default=100)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="b0")
    parser.add_argument("--ratio-resolution", type=int, default=None,
                        help="resolution of the ratio line (default: 64 on a CPU, 224 on a GPU)")
    parser.add_argument("--ratio-steps", type=int, default=None,
                        help="steps timed per ratio measurement (default 5 CPU, 50 GPU)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: host,stub,ratio")
    parser.add_argument("--arrays", choices=("ram", "memmap"), default="ram",
                        help="cached arrays in RAM, or .npy files mapped read-only (a trial's)")
    parser.add_argument("--crop", action="store_true",
                        help="stub lines: random-resized crops from images cached with a margin")
    parser.add_argument("--no-keep-freed", action="store_true",
                        help="leave glibc's malloc as it is (a worker keeps freed memory: "
                             "search.trial.prefetch.keep_freed_host_memory)")
    args = parser.parse_args(argv)
    kept = not args.no_keep_freed and keep_freed_host_memory()
    device = torch.device(args.device)
    resolutions = [int(r) for r in args.resolutions.split(",") if r]
    skip = set(args.skip.split(","))
    pin = device.type == "cuda"
    print(f"device {device} ({torch.cuda.get_device_name(device) if pin else 'CPU'}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
          f"{len(os.sched_getaffinity(0))} usable CPUs, batch {args.batch}, "
          f"freed host memory {'kept' if kept else 'returned (malloc defaults)'}")

    with tempfile.TemporaryDirectory(prefix="data-path-") as scratch:
        folder = Path(scratch) if args.arrays == "memmap" else None
        for resolution in resolutions:
            for name, modalities in MODALITIES.items():
                host_and_stub_lines(args, resolution, name, modalities, device, skip, folder)

    if "ratio" not in skip:
        on_gpu = device.type == "cuda"
        resolution = args.ratio_resolution or (224 if on_gpu else 64)
        steps = args.ratio_steps or (50 if on_gpu else 5)
        speed = default_speed(device)
        end_to_end, model_only = train_ratio(args.backbone, resolution, args.batch, steps,
                                             device, speed)
        amp = "fp32" if speed.autocast_dtype is None else str(speed.autocast_dtype)[6:]
        print(f"ratio  {resolution:4d} px  rgb        batch {args.batch}  {args.backbone} "
              f"{amp} channels_last on {device.type}  end-to-end {end_to_end:.1f} img/s / "
              f"model-only {model_only:.1f} img/s = {end_to_end / model_only:.2f}", flush=True)


if __name__ == "__main__":
    main()
