"""Validation of what ``augment.balance`` is given, with one clear message per mistake."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from augment.pipeline import COLOUR_MODALITIES


def check_labels(labels: np.ndarray, num_classes: int | None) -> tuple[np.ndarray, int]:
    """Return the labels as int64 ``[N]`` and the number of classes.

    Args:
        labels: Class indices ``[N]``, non-negative integers.
        num_classes: The number of classes; ``labels.max() + 1`` when None.

    Raises:
        ValueError: If the labels are empty, not 1-D integers, negative, or not below
            ``num_classes``.
    """
    array = np.asarray(labels)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise ValueError(f"labels must be a 1-D integer array, got {array.dtype} {array.shape}")
    if array.size == 0:
        raise ValueError("labels are empty: the training split has no samples")
    if array.min() < 0:
        raise ValueError(f"labels must be non-negative, got {array.min()}")
    needed = int(array.max()) + 1
    if num_classes is None:
        num_classes = needed
    elif isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise ValueError(f"num_classes must be an integer, got {num_classes!r}")
    elif num_classes < needed:
        raise ValueError(f"num_classes={num_classes} but labels go up to {needed - 1}")
    return array.astype(np.int64, copy=False), int(num_classes)


def check_images(images: Mapping[str, np.ndarray], n: int) -> None:
    """Check the image modalities: ``uint8 [n, H, W, C]``, one H and W for all, C in {1, 3}.

    Raises:
        ValueError: Naming the modality at fault.
    """
    if not isinstance(images, Mapping) or not images:
        raise ValueError("images must be a non-empty dict: modality -> uint8 [N, H, W, C] array")
    sizes = set()
    for name, array in images.items():
        if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 4:
            got = f"{getattr(array, 'dtype', type(array).__name__)} {getattr(array, 'shape', '')}"
            raise ValueError(f"images[{name!r}] must be uint8 [N, H, W, C], got {got}")
        if array.shape[0] != n:
            raise ValueError(f"images[{name!r}] has {array.shape[0]} rows but labels has {n}")
        channels = 3 if name in COLOUR_MODALITIES else array.shape[-1]
        if array.shape[-1] != channels or channels not in (1, 3):
            raise ValueError(
                f"images[{name!r}] has {array.shape[-1]} channels; expected "
                + ("3" if name in COLOUR_MODALITIES else "1 or 3")
            )
        sizes.add(array.shape[1:3])
    if len(sizes) > 1:
        raise ValueError(f"image modalities differ in height and width: {sorted(sizes)}")


def check_target(target: int | str) -> int | str:
    """Return ``target`` if it is ``"max"`` or a positive integer, else raise ValueError."""
    if target == "max":
        return target
    if isinstance(target, bool) or not isinstance(target, int | np.integer) or target < 1:
        raise ValueError(f"target_per_class must be 'max' or a positive integer, got {target!r}")
    return int(target)
