"""How sure a test score is: a bootstrap interval for macro F1.

The best of N trials is chosen on a few hundred validation samples, so its validation F1
overstates what it does on new data, and its test F1 on a few hundred samples is itself noisy.
``search export`` prints both with this interval so a user sees how far apart they may be.

Resampling the test split with replacement only reweights the (true, predicted) pairs, so a
replicate is a multinomial draw over the cells of the confusion matrix: no predictions to keep,
and 2,000 replicates of a 6-class split take milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Interval", "bootstrap_macro_f1", "macro_f1_from_confusion"]


@dataclass(frozen=True)
class Interval:
    """A percentile bootstrap interval."""

    low: float
    high: float
    level: float
    replicates: int

    def to_dict(self) -> dict:
        return {"low": self.low, "high": self.high, "level": self.level,
                "replicates": self.replicates, "method": "percentile bootstrap over test samples"}


def macro_f1_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """Macro F1 of one confusion matrix ``[K, K]`` or of a stack ``[R, K, K]``.

    Rows are true classes, columns predictions; every class counts, and a class with no true
    and no predicted sample scores 0 (scikit-learn's ``zero_division=0`` with ``labels=`` all).
    """
    matrix = np.asarray(confusion, dtype=np.float64)
    tp = np.diagonal(matrix, axis1=-2, axis2=-1)
    denominator = matrix.sum(axis=-1) + matrix.sum(axis=-2)  # (tp + fn) + (tp + fp)
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return f1.mean(axis=-1)


def bootstrap_macro_f1(confusion: list[list[int]] | np.ndarray, *, replicates: int = 2000,
                       level: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of macro F1 over the samples behind ``confusion``."""
    matrix = np.asarray(confusion, dtype=np.int64)
    total = int(matrix.sum())
    if total == 0:
        raise ValueError("cannot bootstrap an empty confusion matrix")
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(total, matrix.ravel() / total, size=replicates)
    scores = macro_f1_from_confusion(draws.reshape(replicates, *matrix.shape))
    tail = (1 - level) / 2
    low, high = np.quantile(scores, [tail, 1 - tail])
    return Interval(low=float(low), high=float(high), level=level, replicates=replicates)
