"""Class-balancing strategies for a training split, picked by name.

``balance(strategy, images, labels, ops=..., target=..., seed=...)`` returns a
:class:`BalancedSet`. The strategies:

* ``"oversample"``: keep every original row, then add augmented copies of minority-class rows
  until each class has ``target`` rows.
* ``"class_weights"``: leave the rows alone and return inverse-frequency class weights for the
  loss.
* ``"none"``: leave the rows alone, no weights.

Leak-free by construction: a strategy only ever sees the arrays it is given, and every output
row records the input row it came from. The caller must pass the **training split only**
(splits are made before any augmentation), so no augmented copy of a validation or test sample
can exist. Pure and deterministic: nothing is cached or written here; caching the balanced set
on disk is the caller's job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from sklearn.utils.class_weight import compute_class_weight

from augment.inputs import check_images, check_labels, check_target
from augment.ops import validate_ops
from augment.pipeline import augment_rows
from augment.seeding import check_seed

Target = int | str
"""Per-class row count for oversampling: ``"max"`` (the largest class) or a positive int."""


@dataclass(frozen=True, eq=False)
class BalancedSet:
    """A balanced training set.

    Attributes:
        images: Modality -> ``uint8`` array ``[M, H, W, C]`` with the input H, W and C.
        labels: int64 ``[M]``.
        source_index: int64 ``[M]``; row ``i`` was made from input row ``source_index[i]``, so
            the caller carries numeric and text features over unchanged.
        class_weights: float32 ``[num_classes]`` for ``"class_weights"``, else None.
    """

    images: dict[str, np.ndarray]
    labels: np.ndarray
    source_index: np.ndarray
    class_weights: np.ndarray | None


class Strategy(Protocol):
    """The signature every balancing strategy shares (inputs already validated)."""

    def __call__(
        self,
        images: Mapping[str, np.ndarray],
        labels: np.ndarray,
        *,
        ops: Sequence[str],
        target: Target,
        seed: int,
        num_classes: int,
    ) -> BalancedSet: ...


def oversample(
    images: Mapping[str, np.ndarray],
    labels: np.ndarray,
    *,
    ops: Sequence[str],
    target: Target,
    seed: int,
    num_classes: int,
) -> BalancedSet:
    """Keep all originals, then add augmented copies until every class has ``target`` rows.

    With ``target="max"`` every class ends at the size of the largest class. With an integer
    target, a class that already has more rows keeps all of them (nothing is dropped: the
    originals are the only real data), so it ends above the target.

    Copies of a class are spread evenly over its originals: each is copied either
    ``floor(k / n)`` or ``ceil(k / n)`` times, the ones copied once more chosen at random.

    Raises:
        ValueError: If a class below the target has no rows to copy.
    """
    counts = np.bincount(labels, minlength=num_classes)
    goal = int(counts.max()) if target == "max" else int(target)
    rng = np.random.default_rng(seed)
    extra: list[np.ndarray] = []
    for label in range(num_classes):
        missing = goal - int(counts[label])
        if missing <= 0:
            continue
        members = np.flatnonzero(labels == label)
        if members.size == 0:
            raise ValueError(f"cannot oversample class {label}: it has no training samples")
        extra.append(np.resize(rng.permutation(members), missing))
    rows = np.concatenate(extra) if extra else np.empty(0, np.int64)
    copies = augment_rows(images, rows, ops=ops, seed=seed)
    return BalancedSet(
        images={name: np.concatenate([images[name], copies[name]]) for name in images},
        labels=np.concatenate([labels, labels[rows]]),
        source_index=np.concatenate([np.arange(labels.size, dtype=np.int64), rows]),
        class_weights=None,
    )


def inverse_frequency_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Return ``weight_c = N / (K * n_c)`` as float32 ``[num_classes]``.

    Normalised so that the mean weight over samples is 1. ``K`` counts the classes present in
    ``labels``; a class with no samples gets weight 0 (it never appears in the loss), which
    keeps the sample-weighted mean at 1.
    """
    # scikit-learn's "balanced" weights are this formula over the classes it is given; it
    # refuses classes absent from ``labels``, so those are left at 0 here.
    present = np.unique(labels)
    weights = np.zeros(num_classes, np.float64)
    weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return weights.astype(np.float32)


def class_weights(
    images: Mapping[str, np.ndarray],
    labels: np.ndarray,
    *,
    ops: Sequence[str],
    target: Target,
    seed: int,
    num_classes: int,
) -> BalancedSet:
    """Leave the rows untouched and return inverse-frequency class weights for the loss."""
    return BalancedSet(
        images=dict(images),
        labels=labels,
        source_index=np.arange(labels.size, dtype=np.int64),
        class_weights=inverse_frequency_weights(labels, num_classes),
    )


def no_balancing(
    images: Mapping[str, np.ndarray],
    labels: np.ndarray,
    *,
    ops: Sequence[str],
    target: Target,
    seed: int,
    num_classes: int,
) -> BalancedSet:
    """Leave the rows untouched, without class weights."""
    return BalancedSet(
        images=dict(images),
        labels=labels,
        source_index=np.arange(labels.size, dtype=np.int64),
        class_weights=None,
    )


STRATEGIES: dict[str, Strategy] = {
    "oversample": oversample,
    "class_weights": class_weights,
    "none": no_balancing,
}


def list_strategies() -> list[str]:
    """Return the names ``balance`` accepts as ``strategy``."""
    return list(STRATEGIES)


def get_strategy(name: str) -> Strategy:
    """Return the strategy function registered under ``name``.

    Raises:
        ValueError: If ``name`` is unknown; the message lists the allowed names.
    """
    try:
        return STRATEGIES[name]
    except (KeyError, TypeError):
        allowed = ", ".join(list_strategies())
        raise ValueError(f"unknown balance strategy {name!r}; allowed: {allowed}") from None


def balance(
    strategy: str,
    images: Mapping[str, np.ndarray],
    labels: np.ndarray,
    *,
    ops: Sequence[str] = (),
    target: Target = "max",
    seed: int = 0,
    num_classes: int | None = None,
) -> BalancedSet:
    """Balance the classes of a training split.

    Pass the training split only: whatever is given here may be copied into the balanced set,
    so validation and test rows must never reach this function.

    Args:
        strategy: ``"oversample"``, ``"class_weights"`` or ``"none"`` (see
            :func:`list_strategies`).
        images: Modality -> ``uint8`` array ``[N, H, W, C]``: ``"rgb"`` ``[N, H, W, 3]``,
            ``"depth"`` ``[N, H, W, 1]``. May be read-only memory maps; never modified.
        labels: int ``[N]`` class indices.
        ops: Augmentation op names for oversampling (see :func:`augment.list_ops`); checked
            for every strategy so a typo in a study fails early.
        target: Rows per class after oversampling: ``"max"`` or a positive integer. Classes
            already above an integer target keep all their rows.
        seed: Non-negative integer; the same inputs and seed give byte-identical output.
        num_classes: Length of ``class_weights``; ``labels.max() + 1`` when None.

    Returns:
        The balanced set; ``source_index`` maps each row to its input row.

    Raises:
        ValueError: On an unknown strategy or op, a bad target, or inconsistent arrays.
    """
    run = get_strategy(strategy)
    ops = validate_ops(ops)
    target = check_target(target)
    seed = check_seed(seed)
    labels, num_classes = check_labels(labels, num_classes)
    check_images(images, labels.size)
    return run(images, labels, ops=ops, target=target, seed=seed, num_classes=num_classes)
