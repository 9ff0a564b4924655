"""Augmentor pipelines that transform every image modality of a sample together.

A sample is a list of images, colour images first (RGB), then the others (depth). This is
Augmentor's multi-image mechanism (``DataPipeline``, made for images with ground-truth masks):
one random draw per operation, applied to every image of the list, so a depth map stays aligned
with its RGB image. Colour operations are wrapped in :class:`ColourOnly` so they touch only the
colour images of the list.

Everything here works on in-memory ``uint8`` arrays; nothing reads or writes files.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping, Sequence

import Augmentor
import numpy as np
from Augmentor.Operations import Operation
from PIL import Image

from augment.ops import OPS, validate_ops
from augment.seeding import seeded_global_rngs

COLOUR_MODALITIES = frozenset({"rgb"})
"""Image modalities whose pixel values are appearance; colour ops apply to these only."""

DEFAULT_PROBABILITY = 0.5
"""Chance that each listed op runs on a generated copy (Augmentor's per-operation rule)."""


class ColourOnly(Operation):
    """Apply a colour operation to the first ``colour_images`` images of a sample only.

    Args:
        operation: The Augmentor colour operation to wrap; its probability is kept.
        colour_images: How many images at the head of the sample list are colour images.
    """

    def __init__(self, operation: Operation, colour_images: int) -> None:
        super().__init__(operation.probability)
        self.operation = operation
        self.colour_images = colour_images

    def __str__(self) -> str:
        return f"ColourOnly({self.operation})"

    def perform_operation(self, images: list[Image.Image]) -> list[Image.Image]:
        # Always let the wrapped op draw its random factor, so the random stream (and hence the
        # geometric ops that follow) does not depend on whether an RGB image is present.
        head = self.operation.perform_operation(images[: self.colour_images])
        return list(head[: self.colour_images]) + list(images[self.colour_images :])


def build_pipeline(
    ops: Sequence[str],
    *,
    size: tuple[int, int],
    colour_images: int = 1,
    probability: float = DEFAULT_PROBABILITY,
) -> Augmentor.Pipeline:
    """Build an Augmentor pipeline from op names, through the table in :mod:`augment.ops`.

    Args:
        ops: Op names in application order; see :func:`augment.list_ops`.
        size: Image size ``(height, width)``; some ops scale their strength with it.
        colour_images: How many images at the head of each sample are colour images.
        probability: Chance that each op runs on a sample, in ``(0, 1]``.

    Returns:
        A pipeline holding one operation per op name (its ``operations`` list).

    Raises:
        ValueError: If an op name is unknown or ``probability`` is out of range.
    """
    if not 0 < probability <= 1:
        raise ValueError(f"augment probability must be in (0, 1], got {probability}")
    pipeline = Augmentor.Pipeline()
    for name in validate_ops(ops):
        spec = OPS[name]
        operation = spec.make(probability, size)
        if spec.kind == "colour":
            operation = ColourOnly(operation, colour_images)
        pipeline.add_operation(operation)
    return pipeline


def _to_pil(array: np.ndarray) -> Image.Image:
    # PIL has no [H, W, 1] mode: a one-channel map becomes an "L" image.
    channels = array[..., 0] if array.shape[-1] == 1 else array
    return Image.fromarray(np.ascontiguousarray(channels))


def _to_array(image: Image.Image, shape: tuple[int, ...]) -> np.ndarray:
    height, width = shape[0], shape[1]
    # rotate90 on a non-square image swaps H and W; bring every output back to the input size
    # so augmented rows stack with the originals.
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8).reshape(shape)


def augment_sample(pipeline: Augmentor.Pipeline, images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Run one sample (its images, colour first) through the pipeline.

    Uses the same per-operation draw as ``Augmentor.DataPipeline.sample``, but on a sample
    chosen by the caller: ``DataPipeline.sample`` picks rows at random with replacement and does
    not say which, while balancing needs to spread copies evenly and record their source row.

    Args:
        pipeline: From :func:`build_pipeline`.
        images: ``uint8`` arrays ``[H, W, C]`` with C in {1, 3}, all of the same H and W.

    Returns:
        New arrays with the input shapes and dtype ``uint8``; the inputs are not modified.
    """
    pil_images = [_to_pil(image) for image in images]
    with warnings.catch_warnings():
        # Augmentor's Skew builds an np.matrix; the warning is about Augmentor's code, not ours.
        warnings.filterwarnings("ignore", "the matrix subclass", PendingDeprecationWarning)
        for operation in pipeline.operations:
            if round(random.uniform(0, 1), 1) <= operation.probability:
                pil_images = operation.perform_operation(pil_images)
    return [_to_array(pil, image.shape) for pil, image in zip(pil_images, images, strict=True)]


def ordered_modalities(images: Mapping[str, np.ndarray]) -> list[str]:
    """Return the image modalities in sample-list order: colour ones first, then the rest."""
    return sorted(images, key=lambda name: (name not in COLOUR_MODALITIES, name))


def augment_rows(
    images: Mapping[str, np.ndarray],
    rows: np.ndarray,
    *,
    ops: Sequence[str],
    seed: int,
    probability: float = DEFAULT_PROBABILITY,
) -> dict[str, np.ndarray]:
    """Make one augmented copy of each listed row, every modality through the same draw.

    Args:
        images: Modality -> ``uint8`` array ``[N, H, W, C]``; read only (may be a memmap).
        rows: Indices into the arrays, one per copy to make; repeats make several copies.
        ops: Op names, see :func:`augment.list_ops`. With no ops the copies are exact.
        seed: Seeds Augmentor's global random draws, restored afterwards.
        probability: Chance that each op runs on a copy.

    Returns:
        Modality -> new ``uint8`` array ``[len(rows), H, W, C]``.
    """
    names = ordered_modalities(images)
    first = images[names[0]]
    size = (int(first.shape[1]), int(first.shape[2]))
    colour_images = sum(name in COLOUR_MODALITIES for name in names)
    pipeline = build_pipeline(ops, size=size, colour_images=colour_images, probability=probability)
    out = {name: np.empty((len(rows), *images[name].shape[1:]), np.uint8) for name in names}
    with seeded_global_rngs(seed):
        for i, row in enumerate(rows):
            copies = augment_sample(pipeline, [images[name][row] for name in names])
            for name, copy in zip(names, copies, strict=True):
                out[name][i] = copy
    return out
