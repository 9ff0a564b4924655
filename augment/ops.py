"""The one table of augmentation ops a study may list in ``[augment] ops``.

Every op is an Augmentor operation with fixed, mild parameters: the study only chooses
*which* ops run, not their strength, so a search over balancing strategies stays small.
Each op has a kind:

* ``"geometric"`` ops move pixels; they are applied identically to every image modality of a
  sample (RGB and depth), so the depth map stays aligned with its RGB image.
* ``"colour"`` ops change pixel values; they are applied to RGB only, never to depth, whose
  values are distances rather than appearance.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from Augmentor.Operations import (
    Distort,
    Flip,
    Operation,
    RandomBrightness,
    RandomColor,
    RandomContrast,
    Rotate,
    RotateRange,
    Skew,
    Zoom,
)

OpKind = Literal["geometric", "colour"]

# Parameters shared by the table below. They are deliberately mild: apples (the demo) are
# roughly round and upright-invariant, and the augmented copies must stay in-distribution.
MAX_ROTATION_DEGREES = 10
ZOOM_RANGE = (1.05, 1.25)
SKEW_MAGNITUDE = 0.2
DISTORTION_GRID = 4
COLOUR_RANGE = (0.8, 1.2)


@dataclass(frozen=True)
class OpSpec:
    """One allowed op.

    Attributes:
        name: The name a study lists in ``[augment] ops``.
        kind: ``"geometric"`` (all image modalities) or ``"colour"`` (RGB only).
        make: Builds the Augmentor operation from a probability and the image size
            ``(height, width)``.
    """

    name: str
    kind: OpKind
    make: Callable[[float, tuple[int, int]], Operation]


def _distortion(probability: float, size: tuple[int, int]) -> Operation:
    # Augmentor's magnitude is in pixels; scale it with the image so 32 px test images and
    # 224 px training images get a comparable (gentle) elastic distortion.
    magnitude = max(1, min(size) // 16)
    return Distort(probability, DISTORTION_GRID, DISTORTION_GRID, magnitude)


_TABLE: tuple[OpSpec, ...] = (
    OpSpec(
        "flip_left_right", "geometric",
        lambda p, _: Flip(p, "LEFT_RIGHT"),
    ),
    OpSpec(
        "flip_top_bottom", "geometric",
        lambda p, _: Flip(p, "TOP_BOTTOM"),
    ),
    OpSpec(
        "rotate90", "geometric",
        lambda p, _: Rotate(p, -1),
    ),
    OpSpec(
        "rotate", "geometric",
        lambda p, _: RotateRange(p, MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES),
    ),
    OpSpec(
        "random_distortion", "geometric", _distortion,
    ),
    OpSpec(
        "zoom", "geometric",
        lambda p, _: Zoom(p, *ZOOM_RANGE),
    ),
    OpSpec(
        "skew", "geometric",
        lambda p, _: Skew(p, "RANDOM", SKEW_MAGNITUDE),
    ),
    OpSpec(
        "brightness", "colour",
        lambda p, _: RandomBrightness(p, *COLOUR_RANGE),
    ),
    OpSpec(
        "contrast", "colour",
        lambda p, _: RandomContrast(p, *COLOUR_RANGE),
    ),
    OpSpec(
        "color", "colour",
        lambda p, _: RandomColor(p, *COLOUR_RANGE),
    ),
)

OPS: dict[str, OpSpec] = {spec.name: spec for spec in _TABLE}


def list_ops(kind: OpKind | None = None) -> list[str]:
    """Return the names of the allowed ops, in table order.

    Args:
        kind: Only ops of this kind (``"geometric"`` or ``"colour"``); all ops when None.
    """
    return [spec.name for spec in _TABLE if kind is None or spec.kind == kind]


def validate_ops(ops: Iterable[str]) -> tuple[str, ...]:
    """Check a study's op list against the table.

    Args:
        ops: Op names, in the order the pipeline should apply them.

    Returns:
        The op names as a tuple, in the given order.

    Raises:
        TypeError: If ``ops`` is a single string rather than a list of names.
        ValueError: If an op is unknown (the message names it and lists the allowed ones) or
            listed twice.
    """
    # A bare string is iterable too; without this check "zoom" would become z, o, o, m.
    if isinstance(ops, str):
        raise TypeError(f"augment ops must be a list of op names, got the string {ops!r}")
    names = tuple(ops)
    seen: set[str] = set()
    for name in names:
        if name not in OPS:
            raise ValueError(
                f"unknown augment op {name!r}; allowed ops: {', '.join(list_ops())}"
            )
        if name in seen:
            raise ValueError(f"augment op {name!r} is listed more than once")
        seen.add(name)
    return names
