"""A training batch's poses, crop and normalisation in one pass, for a CPU "device".

On a GPU the per-batch ops are a few batched tensor ops (:mod:`augment.online`,
:mod:`augment.crop`) that cost next to nothing. On a CPU the same ops are separate passes
over the batch: 64 rgb + depth images at 224 px took 85 ms for the crop's ``grid_sample``
and 26 ms for the poses and normalisation on this project's 2-core machine, where an A100's
step is 25 ms. This module does what those ops do in one compiled loop (numba, as FFCV's
CPU pipeline does) that reads each source pixel it needs and writes each output value
once, split over the process's torch threads:

* the box is drawn on the posed image, as on a GPU; since a resize commutes with flips and
  transposes of a square output, the box is mapped back to the source image, cut and
  resized there (rows read in order), and the result is written in its pose;
* bilinear resize with the GPU path's geometry (``grid_sample``, pixel centres aligned,
  border clamp): output pixel k of a box samples ``left + (k + 0.5) * width / size - 0.5``;
* normalisation as ``x * scale + shift`` per channel (``scale = 1 / (255 std)``,
  ``shift = -mean / std``), one multiply-add where the GPU path divides: the two agree to a
  few float32 ulps.

Without a crop the box is the whole image at its own size: every weight is zero, so the
pixels come out exactly as the poses put them.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Mapping, Sequence

import numba
import numpy as np
import torch

from augment.crop import Boxes
from augment.online import Poses

# fastmath without "reassoc": reassociating ``(j + 0.5) * step - 0.5`` put whole-pixel
# coordinates a hair below the pixel, so a batch without a crop came out blended by 1e-4
# instead of exactly moved.
_FASTMATH = {"nnan", "ninf", "nsz", "contract"}


def _jit(function: Callable) -> Callable:
    """``numba.njit``, releasing the GIL (the threads of :func:`posed_crops` run at once),
    its compiled code cached on disk where numba can.

    numba keeps compiled code next to this file, or else under the user's cache folder
    (``NUMBA_CACHE_DIR``); it refuses ``cache=True`` at import when neither is writable (a
    read-only install for a user without a home). Then each process compiles (2-4 s).
    """
    def compiled(cache: bool) -> Callable:
        return numba.njit(function, cache=cache, nogil=True, boundscheck=False,
                          fastmath=_FASTMATH)

    try:
        return compiled(cache=True)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return compiled(cache=False)


@_jit
def _resample(images, picks, out, first, last, flip_cols, flip_rows, transpose,
              top, left, height, width, scale, shift, channels):
    """Output samples ``first`` to ``last``, from rows ``picks`` of ``images`` ``[M, H, W, C]``.

    ``channels`` is C, passed apart so the callers below can make it a compile-time
    constant: the channel loops then unroll (2x faster for depth, 1.2x for rgb).
    """
    u = np.uint64  # unsigned indices: numba skips its negative-index wraparound checks
    rows, cols = images.shape[1], images.shape[2]
    out_rows, out_cols = out.shape[1], out.shape[2]
    half = np.float32(0.5)
    column0 = np.empty(out_cols, np.int64)
    column1 = np.empty(out_cols, np.int64)
    weight_x = np.empty(out_cols, np.float32)
    blended = np.empty(cols * channels, np.float32)
    for k in range(first, last):
        # The box in source coordinates: undo the transpose, then the flips.
        box_top, box_left, box_h, box_w = top[k], left[k], height[k], width[k]
        if transpose[k]:
            box_top, box_left, box_h, box_w = box_left, box_top, box_w, box_h
        if flip_rows[k]:
            box_top = rows - box_top - box_h
        if flip_cols[k]:
            box_left = cols - box_left - box_w
        # Where source-oriented output pixel (i, j) goes: out = transpose(flips(resized)).
        row_step = out_cols * channels
        step_i, step_j = (channels, row_step) if transpose[k] else (row_step, channels)
        base = 0
        if flip_rows[k]:
            base += (out_rows - 1) * step_i
            step_i = -step_i
        if flip_cols[k]:
            base += (out_cols - 1) * step_j
            step_j = -step_j

        x_step = np.float32(box_w) / np.float32(out_cols)
        low, high = cols, 0
        for j in range(out_cols):
            x = np.float32(box_left) + (np.float32(j) + half) * x_step - half
            x = min(max(x, np.float32(0.0)), np.float32(cols - 1))
            x0 = int(x)
            x1 = min(x0 + 1, cols - 1)
            low, high = min(low, x0), max(high, x1)
            column0[j], column1[j], weight_x[j] = x0 * channels, x1 * channels, x - np.float32(x0)

        source = images[picks[k]]
        target = out[k].ravel()
        y_step = np.float32(box_h) / np.float32(out_rows)
        for i in range(out_rows):
            y = np.float32(box_top) + (np.float32(i) + half) * y_step - half
            y = min(max(y, np.float32(0.0)), np.float32(rows - 1))
            y0 = int(y)
            weight_y = y - np.float32(y0)
            above, below = source[y0].ravel(), source[min(y0 + 1, rows - 1)].ravel()
            # Rows first (contiguous, vectorised), over the box's columns only ...
            for p in range(low * channels, (high + 1) * channels):
                a = np.float32(above[u(p)])
                blended[u(p)] = a + weight_y * (np.float32(below[u(p)]) - a)
            # ... then columns, normalised, written where the pose puts them.
            at = base + i * step_i
            for j in range(out_cols):
                wx, c0, c1 = weight_x[j], column0[j], column1[j]
                for c in range(channels):
                    a = blended[u(c0 + c)]
                    target[u(at + c)] = (a + wx * (blended[u(c1 + c)] - a)) * scale[c] + shift[c]
                at += step_j


@_jit
def _rgb(images, picks, out, first, last, flip_cols, flip_rows, transpose,
         top, left, height, width, scale, shift):
    _resample(images, picks, out, first, last, flip_cols, flip_rows, transpose, top, left, height,
              width, scale, shift, 3)


@_jit
def _gray(images, picks, out, first, last, flip_cols, flip_rows, transpose,
          top, left, height, width, scale, shift):
    _resample(images, picks, out, first, last, flip_cols, flip_rows, transpose, top, left, height,
              width, scale, shift, 1)


@_jit
def _any(images, picks, out, first, last, flip_cols, flip_rows, transpose,
         top, left, height, width, scale, shift):
    _resample(images, picks, out, first, last, flip_cols, flip_rows, transpose, top, left, height,
              width, scale, shift, images.shape[3])


_KERNELS = {3: _rgb, 1: _gray}


class _Outputs:
    """The output arrays, reused once nothing holds them any more.

    A fresh 38 MB array per batch made in the prefetch thread was page-faulted in anew each
    time (720 faults, 22 instead of 9 ms for 64 rgb images at 224 px, on this project's
    CPU): glibc serves that thread from an arena of its own, which the thresholds of
    :func:`search.trial.prefetch.keep_freed_host_memory` do not rule. (One arena for all
    threads, ``M_ARENA_MAX`` 1, also cured it, but changes malloc for the whole process.)
    A batch's tensors hold a reference to their array (``torch.from_numpy``), so an array
    only this pool holds is free to reuse. At most ``KEEP`` arrays of each of the latest
    ``SHAPES`` shapes are kept (410 MB for full batches of 64 rgb + depth images at 224 px).
    """

    KEEP = 8  # per shape: the queue's batches, the one in training, the one being made
    SHAPES = 4  # the latest: rgb and depth, each a full batch and an epoch's last one

    def __init__(self) -> None:
        self._arrays: dict[tuple[int, ...], list[np.ndarray]] = {}  # oldest shape first
        self._lock = threading.Lock()
        self._free = 0  # what sys.getrefcount says of an array that only the pool holds

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        with self._lock:
            kept = self._arrays.pop(shape, [])
            self._arrays[shape] = kept
            while len(self._arrays) > self.SHAPES:  # another trial's sizes: let them go
                del self._arrays[next(iter(self._arrays))]
            for array in kept:
                if sys.getrefcount(array) <= self._free:
                    return array
            array = np.empty(shape, np.float32)
            if len(kept) < self.KEEP:
                kept.append(array)
                # Measured, not assumed: held by the list and a local name, as in the loop
                # above (interpreters differ in the references they count).
                self._free = sys.getrefcount(array)
            return array


_OUTPUTS = _Outputs()
_SHARE = 4  # samples per kernel call: 1-2 ms for 224 px rgb on this project's CPU


def posed_crops(images: Mapping[str, np.ndarray], poses: Poses, boxes: Boxes | None,
                size: int | None, normalise: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                *, rows: np.ndarray | None = None,
                threads: int | None = None) -> dict[str, torch.Tensor]:
    """Pose, crop and normalise every sample of a ``uint8`` batch, on the CPU.

    Args:
        images: Modality -> ``[M, H, W, C]`` uint8 (one H and W for all; square if any
            sample turns): the batch, or with ``rows`` the arrays it is read from (a cache's
            memory maps: no copy is made).
        poses: The batch's flips and turns (:func:`augment.online.draw_poses`).
        boxes: The batch's crops on the posed images (:func:`augment.crop.draw_boxes`), or
            None for no crop.
        size: The output side with ``boxes``; ignored without.
        normalise: Modality -> (scale, shift) per channel: the output is
            ``pixel * scale + shift``.
        rows: The batch's rows of the arrays (default: all, in order).
        threads: How many threads share the work (default: torch's intra-op threads).

    Returns:
        Modality -> float32 ``[N, size, size, C]`` (``[N, H, W, C]`` without a crop), as
        ``augment.crop_batch(augment.flip_batch(...))`` then normalised would give.
    """
    first_array = next(iter(images.values()))
    picks = np.arange(len(first_array)) if rows is None else np.asarray(rows, np.int64)
    n, (height_px, width_px) = len(picks), first_array.shape[1:3]
    if n and not 0 <= picks.min() <= picks.max() < len(first_array):
        raise IndexError(f"rows out of range for {len(first_array)} images")
    flip_cols, flip_rows, transpose = (mask.numpy() for mask in poses.folded())
    if transpose.any() and height_px != width_px:
        raise ValueError(f"rotate90 per batch needs square images, got {first_array.shape}")
    if boxes is None:
        top = left = np.zeros(n, np.float32)
        height, width = top + height_px, top + width_px
        out_rows, out_cols = height_px, width_px
    else:
        assert size is not None, "a crop needs its output size"
        top, left, height, width = (v.numpy().astype(np.float32) for v in
                                    (boxes.top, boxes.left, boxes.height, boxes.width))
        out_rows = out_cols = size
    draws = (flip_cols, flip_rows, transpose, top, left, height, width)

    outputs, jobs = {}, []
    for name, array in images.items():
        source, source_rows = np.asarray(array), picks  # a memory map's buffer, not copied
        if not source.flags.c_contiguous:
            source, source_rows = np.ascontiguousarray(source[picks]), np.arange(n)
        channels = source.shape[3]
        outputs[name] = _OUTPUTS.take((n, out_rows, out_cols, channels))
        scale, shift = (np.asarray(v, np.float32) for v in normalise[name])
        jobs.append((_KERNELS.get(channels, _any), source, source_rows, outputs[name], scale,
                     shift))
    # Short-lived threads (the kernel releases the GIL): no pool outlives the batch. They
    # take a few samples of one modality at a time, every modality from one list: a thread
    # the OS pauses (the training thread waking up) delays the batch by one share, and the
    # last share of rgb does not leave a thread idle while depth waits.
    shares = iter([(job, first) for job in jobs for first in range(0, n, _SHARE)])
    errors: list[BaseException] = []

    def work() -> None:
        try:  # next() on the shared iterator is atomic under the GIL
            for (kernel, source, source_rows, out, scale, shift), first in shares:
                kernel(source, source_rows, out, first, min(first + _SHARE, n), *draws, scale,
                       shift)
        except BaseException as error:  # raised again in the calling thread
            errors.append(error)

    helpers = [threading.Thread(target=work)
               for _ in range(min(threads or torch.get_num_threads(), len(jobs) * n) - 1)]
    for helper in helpers:
        helper.start()
    work()
    for helper in helpers:
        helper.join()
    if errors:
        raise errors[0]
    return {name: torch.from_numpy(out) for name, out in outputs.items()}
