"""What export fits on top of trained networks: a per-class decision bias and ensemble weights.

Both are chosen to raise validation macro F1, so both would overstate their own effect if they
were scored on the samples they were fitted on. Each therefore comes with a *cross-fitted*
estimate: the validation split is cut into folds, the bias (or the weights) is fitted on all
folds but one and scored on the one left out, and the out-of-fold predictions are scored
together. Only that figure says whether the step helps; the bias or weights that ship are then
refitted on the whole validation split.

* Per-class bias (post-hoc logit adjustment): a class that the network under-predicts gets a
  positive offset added to its log-probability. Macro F1 weighs every class alike, so moving a
  rare class's decision threshold often gains F1 at little cost. Fitted by coordinate ascent
  over a grid, one class at a time.
* Greedy ensemble selection (Caruana et al., 2004; what AutoGluon's weighted ensemble does):
  start from nothing, repeatedly add, with replacement, the member whose addition gives the
  best macro F1 of the averaged probabilities; a member's weight is how often it was added.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedKFold

__all__ = [
    "CrossFit",
    "cross_fit",
    "fit_bias",
    "fit_ensemble_weights",
    "macro_f1",
]

BIAS_GRID = np.linspace(-3.0, 3.0, 61)


def macro_f1(labels: np.ndarray, scores: np.ndarray, num_classes: int) -> float:
    """Macro F1 of ``argmax(scores)`` over all ``num_classes`` classes."""
    return float(f1_score(labels, scores.argmax(axis=1), average="macro",
                          labels=list(range(num_classes)), zero_division=0))


def fit_bias(log_probs: np.ndarray, labels: np.ndarray, *, sweeps: int = 3) -> np.ndarray:
    """Per-class offsets for ``log_probs`` ``[N, K]`` that maximise macro F1 on ``labels``.

    Ties keep the smaller offset, so a class the bias cannot help stays at 0.
    """
    num_classes = log_probs.shape[1]
    bias = np.zeros(num_classes)
    best = macro_f1(labels, log_probs, num_classes)
    for _ in range(sweeps):
        improved = False
        for c in range(num_classes):
            for value in sorted(BIAS_GRID, key=abs):
                trial = bias.copy()
                trial[c] = value
                score = macro_f1(labels, log_probs + trial, num_classes)
                if score > best + 1e-12:
                    best, bias, improved = score, trial, True
        if not improved:
            break
    return bias


def fit_ensemble_weights(probs: np.ndarray, labels: np.ndarray, *,
                         rounds: int = 25) -> np.ndarray:
    """Greedy selection with replacement over members ``probs`` ``[M, N, K]``; weights sum to 1.

    The first pick is the best single member, so the ensemble never scores below it on the
    fitting set; later picks are kept only while they raise the score (ties: the earlier
    member), which stops early when no addition helps.
    """
    members, _, num_classes = probs.shape
    counts = np.zeros(members)
    total = np.zeros(probs.shape[1:])
    best = -1.0
    for _ in range(rounds):
        scores = [macro_f1(labels, total + probs[m], num_classes) for m in range(members)]
        pick = int(np.argmax(scores))
        if scores[pick] <= best and counts.sum() > 0:
            break
        best = scores[pick]
        counts[pick] += 1
        total += probs[pick]
    return counts / counts.sum()


@dataclass(frozen=True)
class CrossFit:
    """Validation macro F1 before and after a fitted step, the latter scored out of fold."""

    before: float
    after_out_of_fold: float
    folds: int

    @property
    def gain(self) -> float:
        return self.after_out_of_fold - self.before


def cross_fit(labels: np.ndarray, num_classes: int, *, baseline: np.ndarray,
              fit_and_apply: Callable[[np.ndarray, np.ndarray], np.ndarray],
              folds: int = 5, seed: int = 0) -> CrossFit:
    """Score a fitted step honestly on the validation split.

    Args:
        labels: Validation labels ``[N]``.
        baseline: Scores ``[N, K]`` without the step (e.g. the best trial's log-probabilities).
        fit_and_apply: ``(fit_rows, apply_rows) -> scores [len(apply_rows), K]``: fit the step
            on ``fit_rows`` only and return its output on ``apply_rows``.
        folds: Stratified folds; fewer when the rarest class has fewer samples.
    """
    smallest = int(np.bincount(labels, minlength=num_classes)[np.unique(labels)].min())
    folds = max(2, min(folds, smallest))
    out_of_fold = np.zeros_like(baseline, dtype=np.float64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fit_rows, apply_rows in splitter.split(np.zeros(len(labels)), labels):
        out_of_fold[apply_rows] = fit_and_apply(fit_rows, apply_rows)
    return CrossFit(before=macro_f1(labels, baseline, num_classes),
                    after_out_of_fold=macro_f1(labels, out_of_fold, num_classes), folds=folds)
