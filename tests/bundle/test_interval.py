"""The bootstrap interval that ``search export`` prints beside the test macro F1."""

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, f1_score

from search.bundle.interval import bootstrap_macro_f1, macro_f1_from_confusion


def _predictions(n: int, accuracy: float, classes: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, classes, n)
    wrong = rng.random(n) > accuracy
    predicted = np.where(wrong, (truth + rng.integers(1, classes, n)) % classes, truth)
    return truth, predicted


def test_macro_f1_from_confusion_is_sklearns() -> None:
    labels = list(range(5))  # class 4 never occurs: it scores 0, as with zero_division=0
    truth, predicted = _predictions(300, 0.7)
    matrix = confusion_matrix(truth, predicted, labels=labels)
    expected = f1_score(truth, predicted, average="macro", labels=labels, zero_division=0)
    assert macro_f1_from_confusion(matrix) == pytest.approx(expected)


def test_interval_brackets_the_score_and_narrows_with_more_samples() -> None:
    widths = []
    for n in (200, 5000):
        truth, predicted = _predictions(n, 0.8)
        matrix = confusion_matrix(truth, predicted, labels=range(4))
        interval = bootstrap_macro_f1(matrix, seed=1)
        assert interval.low < macro_f1_from_confusion(matrix) < interval.high
        widths.append(interval.high - interval.low)
    assert widths[1] < widths[0] / 3  # ~ 1/sqrt(n): 5 times narrower for 25 times the samples


def test_interval_is_seeded_and_a_perfect_split_has_no_width() -> None:
    truth, predicted = _predictions(300, 0.75)
    matrix = confusion_matrix(truth, predicted)
    assert bootstrap_macro_f1(matrix, seed=3) == bootstrap_macro_f1(matrix, seed=3)
    perfect = bootstrap_macro_f1(np.diag([30, 20, 10]))
    assert perfect.low == perfect.high == 1.0
    with pytest.raises(ValueError, match="empty"):
        bootstrap_macro_f1(np.zeros((3, 3), int))
