"""Random-resized crop drawn afresh for every training batch, as one batched op on the device.

The standard scale augmentation for photos (torchvision's ``RandomResizedCrop``): each
sample is cut to a box of random area and aspect ratio at a random place, then resized to
the training size. The training images are cached with a margin (decoded at
:func:`source_size`, the same view with more pixels), so most crops are shrunk, not blown
up. Every image modality of a sample gets the same box, so a depth map stays aligned with
its RGB image; the boxes come from a CPU ``torch.Generator`` like the flips
(:mod:`augment.online`): the same seed gives the same crops on any device.

All boxes of a batch are resized at once by ``grid_sample`` on an affine grid (bilinear,
pixel centres aligned as in a plain resize), so the cost does not depend on the draws. That
is the GPU's path; a CPU device gets the same boxes and geometry from :mod:`augment.fused`,
one pass per sample with the poses and normalisation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch.nn import functional

MARGIN = 1.25
"""The cached training images' side over the training resolution."""

SCALE = (0.25, 1.0)
"""The box's share of the image's area. torchvision's default starts at 0.08; a trial here
is a few epochs of fine-tuning on a small set, where boxes of a twelfth of the photo mostly
cut the object away."""

RATIO = (3 / 4, 4 / 3)
"""The box's width over its height (torchvision's default), drawn log-uniformly."""

_ATTEMPTS = 10  # as torchvision: draws until the box fits, then the whole image


def source_size(resolution: int) -> int:
    """The side the training images are cached at when crops are on."""
    return round(resolution * MARGIN)


@dataclass(frozen=True)
class Boxes:
    """One batch's crops in source pixels: float CPU tensors of length N."""

    left: torch.Tensor
    top: torch.Tensor
    width: torch.Tensor
    height: torch.Tensor


def draw_boxes(n: int, height: int, width: int, generator: torch.Generator, *,
               scale: tuple[float, float] = SCALE,
               ratio: tuple[float, float] = RATIO) -> Boxes:
    """Draw ``n`` boxes in a ``height x width`` image, as ``RandomResizedCrop.get_params``.

    Each sample tries up to ten (area, aspect) draws and keeps the first box that fits;
    one that never fits gets the whole image. The place is uniform over where it fits.
    """
    area = scale[0] + (scale[1] - scale[0]) * torch.rand(n, _ATTEMPTS, generator=generator)
    area = area * (height * width)
    low, high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(low + (high - low) * torch.rand(n, _ATTEMPTS, generator=generator))
    box_w = torch.sqrt(area * aspect).round()
    box_h = torch.sqrt(area / aspect).round()
    fits = (box_w >= 1) & (box_h >= 1) & (box_w <= width) & (box_h <= height)
    first = fits.int().argmax(dim=1)  # the first attempt that fits (0 if none does)
    rows = torch.arange(n)
    found = fits.any(dim=1)
    box_w = torch.where(found, box_w[rows, first], float(width))
    box_h = torch.where(found, box_h[rows, first], float(height))
    left = torch.floor(torch.rand(n, generator=generator) * (width - box_w + 1))
    top = torch.floor(torch.rand(n, generator=generator) * (height - box_h + 1))
    return Boxes(left, top, box_w, box_h)


def resize_boxes(batch: torch.Tensor, boxes: Boxes, size: int) -> torch.Tensor:
    """Cut each sample of ``[N, H, W, C]`` ``batch`` to its box, resized to ``size``.

    Returns a float32 ``[N, size, size, C]`` tensor (values in the input's range, not
    rounded) on the input's device.
    """
    n, height, width, channels = batch.shape
    device = batch.device
    # grid_sample's coordinates run from -1 to 1 over the image's edges (align_corners=False):
    # output pixel k of the box then samples source x = left + (k + 0.5) * width / size - 0.5.
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = boxes.width / width
    theta[:, 0, 2] = (2 * boxes.left + boxes.width) / width - 1
    theta[:, 1, 1] = boxes.height / height
    theta[:, 1, 2] = (2 * boxes.top + boxes.height) / height - 1
    grid = functional.affine_grid(theta.to(device, non_blocking=True), [n, channels, size, size],
                                  align_corners=False)
    pixels = batch.permute(0, 3, 1, 2).float()
    out = functional.grid_sample(pixels, grid, mode="bilinear", padding_mode="border",
                                 align_corners=False)
    return out.permute(0, 2, 3, 1)


def crop_batch(images: Mapping[str, torch.Tensor], size: int,
               generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random-resized crop of every sample of a batch, the same box in every modality.

    Args:
        images: Modality -> ``[N, H, W, C]`` tensor of one batch (one H and W for all), on
            any device; not modified.
        size: The side of the output (the training resolution).
        generator: A CPU generator; the same state gives the same boxes.

    Returns:
        Modality -> float32 ``[N, size, size, C]`` tensor on the input's device.
    """
    first = next(iter(images.values()))
    boxes = draw_boxes(len(first), first.shape[1], first.shape[2], generator)
    return {name: resize_boxes(batch, boxes, size) for name, batch in images.items()}
