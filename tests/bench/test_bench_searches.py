"""The search benchmarks' baseline and measurements: the plain data path and SearchRun."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import numpy as np
import optuna
import pytest
import torch
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from bench._plain import load_plain_data, oversampled_rows
from bench._searches import SearchRun, plain_overrides, run_default, run_plain, study_config
from bench.search_efficiency import summary
from search.config import read_study_file
from search.data.prepared import prepare_data
from tests.search.conftest import make_dataset, write_study

CPU = torch.device("cpu")


@pytest.fixture
def tiny_study(workdir):
    return write_study(workdir, make_dataset(workdir / "data"))


def test_disk_split_decodes_the_same_pixels_the_cache_holds(tiny_study):
    config = read_study_file(str(tiny_study))
    cached, plain = prepare_data(config), load_plain_data(config)
    rows = np.arange(len(cached.split("val")))
    expected = cached.split("val").batch(rows, CPU, False)
    got = plain.split("val").batch(rows, CPU, False)
    assert expected.keys() == got.keys() == {"rgb", "depth"}
    for modality in expected:
        torch.testing.assert_close(got[modality], expected[modality])


def test_training_batches_are_augmented_afresh_each_time(tiny_study):
    config = read_study_file(str(tiny_study))  # ops = ["flip_left_right"]
    split, _ = load_plain_data(config).train_split("none")
    rows = np.arange(len(split))
    draws = [split.images(rows)["rgb"] for _ in range(3)]
    assert any(not np.array_equal(draws[0], other) for other in draws[1:])
    assert all(draw.shape == (len(rows), 32, 32, 3) for draw in draws)


def test_class_weights_and_oversampling_match_the_cached_strategies(tiny_study):
    config = read_study_file(str(tiny_study))
    cached, plain = prepare_data(config), load_plain_data(config)
    _, cached_weights = cached.train_split("class_weights")
    _, plain_weights = plain.train_split("class_weights")
    np.testing.assert_allclose(plain_weights, cached_weights)
    split, weights = plain.train_split("oversample")
    assert weights is None
    assert len(set(np.bincount(split.labels))) == 1  # every class at the largest's count


def test_oversampled_rows_keep_every_row_and_fill_each_class_to_the_target():
    labels = np.array([0] * 6 + [1] * 3 + [2] * 1)
    rows = oversampled_rows(labels, "max", seed=0)
    assert set(range(10)) <= set(rows.tolist())
    assert np.bincount(labels[rows]).tolist() == [6, 6, 6]
    assert np.bincount(labels[oversampled_rows(labels, 4, seed=0)]).tolist() == [6, 4, 4]


def test_reached_counts_seconds_and_epochs_until_a_complete_trial_hits_the_target():
    start = datetime(2026, 1, 1)
    study = optuna.create_study(direction="maximize")
    lr = FloatDistribution(1e-3, 1e-1)

    def add(state, value, curve, end_s):
        study.add_trial(FrozenTrial(
            number=0, trial_id=0, state=state, value=value, params={"lr": 0.01},
            distributions={"lr": lr}, user_attrs={}, system_attrs={},
            intermediate_values=dict(enumerate(curve)),
            datetime_start=start, datetime_complete=start + timedelta(seconds=end_s)))

    # Values below the best epoch, as trailing means are (value = "smoothed").
    add(TrialState.COMPLETE, 0.5, [0.2, 0.3, 0.4, 0.6], 10)
    add(TrialState.PRUNED, None, [0.1, 0.99], 15)  # a pruned trial's epochs do not count
    add(TrialState.COMPLETE, 0.8, [0.5, 0.8, 0.8], 30)
    add(TrialState.COMPLETE, 0.85, [0.1, 0.2, 0.3, 0.9, 0.85], 20)  # finished before 0.8
    run = SearchRun("x", None, study, start, 40.0)
    assert run.epochs == 14
    assert run.best_value == 0.85 and run.best_peak == 0.9
    # Reached by a trial's best epoch, the statistic the plain search's values are.
    assert run.reached(0.88) == (20.0, 11)
    assert run.reached(0.7) == (20.0, 11)
    assert run.reached(0.6) == (10.0, 4)
    assert run.reached(0.95) is None  # only the pruned trial had such an epoch


@pytest.mark.slow
def test_plain_trials_train_full_length_whatever_the_study_says(workdir):
    data = make_dataset(workdir / "data")
    path = write_study(workdir, data, n_trials=2, epochs=3, fusion='["none"]',
                       pruner="hyperband")
    path.write_text(path.read_text().replace("patience = 5", "patience = 1"))
    # No start point, so that ours samples its first trial as the plain search does.
    ours = study_config(str(path), workdir, "ours", sampler={"start_with": []})
    plain = study_config(str(path), workdir, "plain", **plain_overrides(3))
    assert (plain.pruner.kind, plain.train.patience, plain.train.value) == ("none", 3, "max")
    a, b = run_plain("plain", plain), run_default("ours", ours)
    # Full length although the study file stops after one epoch without improvement.
    assert [t.state for t in a.finished] == [TrialState.COMPLETE] * 2
    assert [len(t.intermediate_values) for t in a.finished] == [3, 3]
    assert len(b.finished) == 2
    # Samplers seeded alike: both searches start with the same random configuration.
    assert a.finished[0].params == b.finished[0].params
    assert not (workdir / "plain" / "cache").exists()  # the plain approach caches nothing
    assert (workdir / "ours" / "cache").is_dir()
    assert 0.0 <= a.test_scores()[0] <= 1.0  # scoring builds the test split's cache afterwards


def test_replay_stops_early_prunes_and_times_the_target():
    from bench.replay_pruners import Curve, replay

    curves = [Curve([0.1, 0.5, 0.4, 0.4, 0.4], 1.0), Curve([0.2, 0.3, 0.9, 0.95, 0.96], 2.0)]
    assert replay(curves, optuna.pruners.NopPruner(), 10**6, 0.9) == (15.0, 10, 0.96, 15.0)
    # Patience 2 on the smoothed curve: the first curve's trailing mean peaks at epoch 3,
    # too late for a plateau of 2 epochs; a flat tail starts the anneal, 2 more epochs.
    assert replay(curves, optuna.pruners.NopPruner(), 2, 0.9) == (15.0, 10, 0.96, 15.0)
    flat = [Curve([0.1, 0.5, 0.4, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3], 1.0), curves[1]]
    seconds, epochs, best, reached = replay(flat, optuna.pruners.NopPruner(), 1, 0.9)
    # Smoothed peak at epoch 3 (0.4), no gain at epoch 4: the anneal runs epochs 5 and 6.
    assert (seconds, epochs, best, reached) == (17.0, 12, 0.96, 17.0)
    # A pruner that stops every trial after its first report leaves no complete trial.
    always = optuna.pruners.ThresholdPruner(lower=2.0)
    seconds, epochs, best, reached = replay(curves, always, 10**6, 0.9)
    assert (seconds, epochs, reached) == (3.0, 2, None) and best != best


def test_replay_can_show_the_pruner_trailing_means():
    from bench.replay_pruners import Curve, replay

    dip = [Curve([0.6, 0.7, 0.3, 0.9], 1.0)]  # one bad epoch in a good curve
    floor = optuna.pruners.ThresholdPruner(lower=0.5)
    seconds, epochs, best, reached = replay(dip, floor, 10**6, 0.9)
    assert (seconds, epochs, reached) == (3.0, 3, None) and best != best  # pruned at the dip
    # Its trailing mean at the dip is (0.6 + 0.7 + 0.3) / 3 = 0.53: kept, and it reaches 0.9.
    assert replay(dip, floor, 10**6, 0.9, smooth=True) == (4.0, 4, 0.9, 4.0)


def test_summary_averages_the_seeds_that_reached_and_counts_the_misses():
    nan = float("nan")
    line = summary("ours", [(0.2, 0.1, 0.01), (0.6, 0.5, -0.02), (nan, nan, 0.0)], 3)
    assert "time / (a2)'s wall time mean 0.40, worst 0.60" in line
    assert "time / (a)'s wall time mean 0.30, worst 0.50" in line
    assert line.endswith("missed the target in 1 of 3 seed(s)")


def test_selection_bias_scores_match_scikit_learn_and_halves_are_stratified():
    from sklearn.metrics import f1_score

    from bench.selection_bias import halves, macro_f1

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 60)
    predicted = rng.integers(0, 4, (5, 60))
    expected = [f1_score(labels, p, average="macro", labels=range(4), zero_division=0)
                for p in predicted]
    np.testing.assert_allclose(macro_f1(labels, predicted, 4), expected)
    a, b = halves(labels, rng)
    assert sorted([*a, *b]) == list(range(60))
    assert all(abs(np.sum(labels[a] == c) - np.sum(labels[b] == c)) <= 1 for c in range(4))


def test_selection_bias_the_max_of_a_noisy_curve_is_optimistic(tmp_path):
    from bench.selection_bias import analyse

    # Four alike trials, each epoch wrong on a fresh random 20% of the samples: every rule's
    # winner is worth about 0.8 on the other half, but the best single epoch on half A
    # overstates it more than the best trailing mean of 3 does.
    rng = np.random.default_rng(1)
    labels = np.arange(200) % 2
    trials = {f"trial_{n}": np.where(rng.random((8, 200)) < 0.2, labels ^ 1, labels)
              for n in range(4)}
    meta = {str(n): {"state": "COMPLETE"} for n in range(4)}
    np.savez(tmp_path / "curves.npz", labels=labels, meta=json.dumps(meta), **trials)
    summary = analyse(tmp_path / "curves.npz", splits=50)
    assert summary["max"]["winner B"] == pytest.approx(0.8, abs=0.03)
    assert summary["max"]["optimism"] > 0.04
    assert summary["trailing 3"]["optimism"] < summary["max"]["optimism"] - 0.02
