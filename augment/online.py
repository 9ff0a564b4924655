"""Flips and quarter turns drawn afresh for every training batch, as tensor ops on the device.

Augmentor generates the oversampled copies once (:mod:`augment.balance`); these three ops
only permute pixels, so they can also run on every batch. Without them a class-weighted
trial would see each training image in the same pose every epoch. They run on the batch
after it reaches the device (the GPU, where they cost next to nothing), so the host only
gathers ``uint8`` rows. Every image modality of a sample gets the same draw, so a depth map
stays aligned with its RGB image.

The draws come from a CPU ``torch.Generator``: the same seed gives the same poses on any
device, and the host knows each mask without waiting for the device.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

ONLINE_OPS = ("flip_left_right", "flip_top_bottom", "rotate90")


def online_ops(ops: Iterable[str]) -> tuple[str, ...]:
    """The ops of a study's list that can run per batch (the others stay in Augmentor)."""
    return tuple(op for op in ops if op in ONLINE_OPS)


@dataclass(frozen=True)
class Poses:
    """One batch's draws: flip left-right (p = 1/2), flip top-bottom (p = 1/2), then turn by
    ``turns`` quarter turns (0-3, uniform), in that order. CPU tensors of length N."""

    left_right: torch.Tensor
    top_bottom: torch.Tensor
    turns: torch.Tensor

    def folded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(flip columns, flip rows, transpose) masks that put a sample in its pose, in
        that order: ``rot90`` by k flips columns if k is 1 or 2, rows if k is 2 or 3, then
        transposes if k is odd."""
        k = self.turns
        return (self.left_right ^ ((k == 1) | (k == 2)), self.top_bottom ^ ((k == 2) | (k == 3)),
                k % 2 == 1)


def draw_poses(n: int, ops: Iterable[str], generator: torch.Generator) -> Poses:
    """Draw the poses of ``n`` samples for ``ops`` (names from :data:`ONLINE_OPS`)."""
    ops = set(ops)
    unknown = ops - set(ONLINE_OPS)
    if unknown:
        raise ValueError(f"not a per-batch op: {sorted(unknown)}; allowed: {list(ONLINE_OPS)}")
    never = torch.zeros(n, dtype=torch.bool)
    left_right = (torch.rand(n, generator=generator) < 0.5
                  if "flip_left_right" in ops else never)
    top_bottom = (torch.rand(n, generator=generator) < 0.5
                  if "flip_top_bottom" in ops else never)
    turns = (torch.randint(0, 4, (n,), generator=generator)
             if "rotate90" in ops else torch.zeros(n, dtype=torch.int64))
    return Poses(left_right, top_bottom, turns)


def apply_poses(batch: torch.Tensor, poses: Poses) -> torch.Tensor:
    """Put each sample of ``[N, H, W, C]`` ``batch`` in its pose; a new tensor, same device.

    The flips and turns are folded into at most one flip of each axis and one transpose per
    sample (:meth:`Poses.folded`); each of the three is one batched op over the whole batch,
    ``where(mask, moved, batch)``: a few kernels whatever the draws. That suits a GPU; a
    CPU device gets the same poses from :mod:`augment.fused` instead, in one pass with the
    crop and normalisation.
    """
    flip_cols, flip_rows, transpose = poses.folded()
    if bool(transpose.any()) and batch.shape[1] != batch.shape[2]:
        raise ValueError(f"rotate90 per batch needs square images, got {tuple(batch.shape)}")
    out = batch
    for mask, move in ((flip_cols, lambda x: x.flip(2)), (flip_rows, lambda x: x.flip(1)),
                       (transpose, lambda x: x.transpose(1, 2))):
        if bool(mask.any()):
            chosen = mask.to(batch.device, non_blocking=True).view(-1, 1, 1, 1)
            out = torch.where(chosen, move(out), out)
    return batch.clone() if out is batch else out


def flip_batch(images: Mapping[str, torch.Tensor], ops: Iterable[str],
               generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Flip and turn each sample of a batch at random, identically in every modality.

    Args:
        images: Modality -> ``[N, H, W, C]`` tensor of one batch, on any device; not modified.
        ops: Names from :data:`ONLINE_OPS`: each flip happens with probability 1/2,
            ``rotate90`` turns by 0, 90, 180 or 270 degrees (square images only).
        generator: A CPU generator; the same state gives the same batch.

    Returns:
        Modality -> new tensor of the input's shape, on the input's device.
    """
    n = len(next(iter(images.values())))
    poses = draw_poses(n, ops, generator)
    return {name: apply_poses(batch, poses) for name, batch in images.items()}
