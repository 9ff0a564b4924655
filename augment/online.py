"""Flips and quarter turns drawn afresh for every training batch, on the cached arrays.

Augmentor generates the oversampled copies once (:mod:`augment.balance`); these three ops
only permute pixels, so they can also run on every batch of the cached ``uint8`` arrays at
almost no cost. Without them a class-weighted trial would see each training image in the
same pose every epoch. Every image modality of a sample gets the same draw, so a depth map
stays aligned with its RGB image.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

ONLINE_OPS = ("flip_left_right", "flip_top_bottom", "rotate90")


def online_ops(ops: Iterable[str]) -> tuple[str, ...]:
    """The ops of a study's list that can run per batch (the others stay in Augmentor)."""
    return tuple(op for op in ops if op in ONLINE_OPS)


def flip_batch(images: Mapping[str, np.ndarray], ops: Iterable[str],
               rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Flip and turn each sample of a batch at random, identically in every modality.

    Args:
        images: Modality -> ``[N, H, W, C]`` array of one batch; not modified.
        ops: Names from :data:`ONLINE_OPS`: each flip happens with probability 1/2,
            ``rotate90`` turns by 0, 90, 180 or 270 degrees (square images only).
        rng: The draws; the same generator state gives the same batch.

    Returns:
        Modality -> new array of the input's shape.
    """
    ops = set(ops)
    unknown = ops - set(ONLINE_OPS)
    if unknown:
        raise ValueError(f"not a per-batch op: {sorted(unknown)}; allowed: {list(ONLINE_OPS)}")
    n = len(next(iter(images.values())))
    left_right = rng.random(n) < 0.5 if "flip_left_right" in ops else np.zeros(n, bool)
    top_bottom = rng.random(n) < 0.5 if "flip_top_bottom" in ops else np.zeros(n, bool)
    turns = rng.integers(0, 4, n) if "rotate90" in ops else np.zeros(n, int)
    out = {}
    for name, batch in images.items():
        if turns.any() and batch.shape[1] != batch.shape[2]:
            raise ValueError(f"rotate90 per batch needs square images ({name}: {batch.shape})")
        batch = np.array(batch)  # a copy: the input may be a read-only memory map
        batch[left_right] = batch[left_right, :, ::-1]
        batch[top_bottom] = batch[top_bottom, ::-1]
        for k in (1, 2, 3):
            batch[turns == k] = np.rot90(batch[turns == k], k, axes=(1, 2))
        out[name] = batch
    return out
