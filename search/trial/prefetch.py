"""Training batches assembled by a background thread while the current one trains.

The host's share of a batch (gathering ``uint8`` rows, pinning them) and the device's
(copy over, flips and turns, normalisation) run in one producer thread, a few batches
ahead of the training step, through a small bounded queue. On a CUDA device the producer
works on its own stream and hands each batch over with an event, so its copies and
augmentation overlap the step's kernels. On the CPU the producer makes each batch with
:meth:`~search.data.prepared.Split.assemble` (a training split: one compiled pass that reads
the cached rows, poses, crops and normalises them, :mod:`augment.fused`), whose work
releases the GIL.

The consumer stops the producer whatever ends the loop: the last batch, a ``break``
(early stopping), an exception (``optuna.TrialPruned``, ``KeyboardInterrupt``). An error
in the producer is raised again in the consumer. Use it as a context manager::

    with DeviceBatches(split, row_batches, device=device, channels_last=True) as batches:
        for inputs, labels in batches:
            ...
"""

from __future__ import annotations

import ctypes
import ctypes.util
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

import numpy as np
import torch

from search.data.prepared import Split

Item = TypeVar("Item")
Result = TypeVar("Result")

DEPTH = 3
"""Batches assembled ahead: enough to ride out one slow gather, little pinned memory held."""

_POLL_S = 0.05  # how often a blocked put/get looks up (stop requested, Ctrl-C delivered)
_DONE, _VALUE, _ERROR = "done", "value", "error"


# glibc's mallopt parameters (malloc.h) and the size above which freed memory is kept.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 1 << 30


def keep_freed_host_memory() -> bool:
    """Let glibc's malloc reuse a freed batch's memory instead of returning it to the OS.

    glibc serves a block over its mmap threshold (32 MB at most) with a fresh ``mmap`` and
    unmaps it on free, so each batch's float32 copy (38 MB for 64 rgb images at 224 px), and
    on a CPU device every activation that large, page-faults its way into memory again, a
    fault per 4 kB page. With both thresholds at 1 GB the freed blocks stay in the heap for
    the next batch: on this project's 2-core CPU, assembling a 224 px rgb + depth batch of 64
    (poses, normalisation) went from 27 to 15 ms. The price is a heap that keeps a few such
    blocks: a 40 MB tensor made and freed 60 times grew the resident set by 190 MB over the
    first 10 rounds, then not at all, with no page fault after that (against 9,800 faults a
    round without this). Process-wide; a worker calls it once its data is cached (the cache
    build keeps its small footprint). These thresholds rule glibc's main arena, not the
    arenas of other threads: the CPU pass's outputs, made in the prefetch thread, reuse
    their own arrays (:mod:`augment.fused`).

    Returns:
        Whether the C library took the settings (False off glibc, e.g. macOS or musl).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc: musl's mallopt does nothing
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)
                and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))


class Prefetcher(Generic[Item, Result]):
    """Iterate over ``produce(item)`` for ``items``, computed ``depth`` ahead in a thread."""

    def __init__(self, items: Iterable[Item], produce: Callable[[Item], Result], *,
                 depth: int = DEPTH, name: str = "prefetch") -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._run, args=(iter(items), produce),
                                        name=name, daemon=True)
        self._thread.start()

    def _run(self, items: Iterator[Item], produce: Callable[[Item], Result]) -> None:
        try:
            for item in items:
                if self._stop.is_set() or not self._put((_VALUE, produce(item))):
                    return
            self._put((_DONE, None))
        except BaseException as error:  # handed to the consumer, which raises it
            self._put((_ERROR, error))

    def _put(self, entry: tuple) -> bool:
        """Queue ``entry`` unless the consumer stops us first; False when it did."""
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Prefetcher[Item, Result]:
        return self

    def __next__(self) -> Result:
        if self._finished:
            raise StopIteration
        while True:
            try:
                # A timed wait, so Ctrl-C reaches a consumer that waits on a slow producer.
                kind, value = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._finished = True  # closed (or died without a word): nothing more
                    raise StopIteration from None
        if kind == _DONE:
            self._finished = True
            raise StopIteration
        if kind == _ERROR:
            self._finished = True
            raise value
        return value

    def close(self, timeout: float = 30.0) -> None:
        """Stop the producer and wait for its thread to end.

        A producer in the middle of one ``produce`` call finishes that call first.

        Raises:
            RuntimeError: The thread is still running after ``timeout`` seconds.
        """
        self._stop.set()
        self._finished = True
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            self._drain()  # a producer blocked on a full queue sees the stop at once
            self._thread.join(_POLL_S)
        self._drain()  # let go of the batches (pinned and device memory) it made
        if self._thread.is_alive():
            raise RuntimeError(f"prefetch thread {self._thread.name!r} did not stop "
                               f"within {timeout:g} s")

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    @property
    def alive(self) -> bool:
        """Whether the producer thread still runs."""
        return self._thread.is_alive()

    def __enter__(self) -> Prefetcher[Item, Result]:
        return self

    def __exit__(self, kind: type | None, *exc_info: object) -> None:
        try:
            self.close()
        except RuntimeError:
            if kind is None:  # never hide the exception that ended the loop
                raise


class DeviceBatches:
    """Model batches and labels of ``split`` for each array of rows, made ahead on ``device``.

    Iterating yields ``(inputs, labels)`` ready to use on the current stream.
    """

    def __init__(self, split: Split, row_batches: Iterable[np.ndarray], *,
                 device: torch.device, channels_last: bool, depth: int = DEPTH) -> None:
        self.device = device
        cuda = device.type == "cuda"
        # The producer's own stream: its copies and augmentation overlap the training step.
        stream = torch.cuda.Stream(device) if cuda else None

        def produce(rows: np.ndarray):
            if stream is None:
                return split.assemble(rows, device, channels_last), None
            host = split.gather(rows, pin=True)
            with torch.cuda.stream(stream):
                batch = split.to_device(host, device, channels_last, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(stream)
            return batch, ready

        self._prefetcher: Prefetcher = Prefetcher(row_batches, produce, depth=depth,
                                                  name="device-batches")

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        for (inputs, labels), ready in self._prefetcher:
            if ready is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(ready)
                # Memory made on the producer's stream and used on this one: tell the
                # caching allocator, so it is not reused before this stream is done with it.
                for tensor in (*inputs.values(), labels):
                    tensor.record_stream(current)
            yield inputs, labels

    def close(self) -> None:
        self._prefetcher.close()

    @property
    def alive(self) -> bool:
        return self._prefetcher.alive

    def __enter__(self) -> DeviceBatches:
        return self

    def __exit__(self, kind: type | None, *exc_info: object) -> None:
        self._prefetcher.__exit__(kind, *exc_info)

