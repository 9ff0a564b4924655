"""Per-class bias and greedy ensemble weights, and their cross-fitted (honest) estimates."""

import numpy as np
import pytest

from search.bundle.posthoc import cross_fit, fit_bias, fit_ensemble_weights, macro_f1


def _skewed(n: int = 600, seed: int = 0):
    """A 3-class problem whose scores under-predict the rare class 2 by a fixed margin."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(3, n, p=[0.6, 0.3, 0.1])
    logits = rng.normal(0, 1, (n, 3))
    logits[np.arange(n), labels] += 2.0
    logits[:, 2] -= 1.8  # the network's prior against the rare class
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return log_probs, labels


def test_bias_lifts_the_rare_class_and_gains_out_of_fold_too() -> None:
    log_probs, labels = _skewed()
    bias = fit_bias(log_probs, labels)
    assert bias[2] - max(bias[0], bias[1]) > 0.8  # undoes most of the -1.8 prior
    assert macro_f1(labels, log_probs + bias, 3) > macro_f1(labels, log_probs, 3) + 0.05
    result = cross_fit(labels, 3, baseline=log_probs, fit_and_apply=lambda fit, apply:
                       log_probs[apply] + fit_bias(log_probs[fit], labels[fit]))
    assert result.folds == 5 and result.gain > 0.03
    # And on fresh samples from the same source, the bias fitted here still helps.
    fresh, fresh_labels = _skewed(seed=1)
    assert macro_f1(fresh_labels, fresh + bias, 3) > macro_f1(fresh_labels, fresh, 3) + 0.03


def test_bias_on_calibrated_scores_stays_near_zero_and_cross_fit_shows_no_gain() -> None:
    rng = np.random.default_rng(2)
    labels = rng.choice(3, 300)
    logits = rng.normal(0, 1, (300, 3))
    logits[np.arange(300), labels] += 1.0
    result = cross_fit(labels, 3, baseline=logits, fit_and_apply=lambda fit, apply:
                       logits[apply] + fit_bias(logits[fit], labels[fit]))
    assert result.gain < 0.03  # fitting noise does not pass for a gain out of fold


def test_greedy_weights_prefer_the_better_member_and_never_lose_to_it() -> None:
    rng = np.random.default_rng(3)
    labels = rng.choice(4, 400)
    def member(noise: float) -> np.ndarray:
        logits = rng.normal(0, noise, (400, 4))
        logits[np.arange(400), labels] += 1.0
        return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probs = np.stack([member(1.0), member(1.0), member(3.0)])
    weights = fit_ensemble_weights(probs, labels)
    assert weights.sum() == pytest.approx(1.0) and weights[2] < max(weights[0], weights[1])
    blended = np.tensordot(weights, probs, axes=1)
    best_single = max(macro_f1(labels, p, 4) for p in probs)
    assert macro_f1(labels, blended, 4) >= best_single


def test_cross_fit_uses_fewer_folds_when_a_class_is_rare() -> None:
    labels = np.array([0] * 20 + [1] * 3)
    scores = np.eye(2)[labels]
    result = cross_fit(labels, 2, baseline=scores, fit_and_apply=lambda fit, apply: scores[apply])
    assert result.folds == 3 and result.gain == 0.0
