"""Replay the full learning curves of a plain search under candidate pruners.

A plain search (``bench/search_efficiency.py --workdir DIR`` keeps them in
``DIR/plain-<seed>/study.db``) trains every trial for every epoch, so its studies hold each
trial's whole validation curve. This script feeds those curves, trial by trial, to Optuna's
own pruners (and to early stopping) and prints how much training each would have saved and
how soon it would have reached the plain search's best F1 - 0.01. It cannot replay the
sampler: a real search with pruning would sample other trials after the first pruned one.
That is why the default study's pruner was picked with it, and then measured for real.

    .venv/bin/python -m bench.replay_pruners /tmp/eff/plain-0/study.db /tmp/eff/plain-1/study.db
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import optuna
from optuna.trial import TrialState
from scipy.stats import spearmanr

from search.trial.train import WarmupCosine, smoothed

MARGIN = 0.01
# Also replayed with the pruner fed trailing means: the default study's pruner and its runner-up.
SMOOTHED_TOO = ("successive halving 6/2 + es3", "successive halving 4/3 + es3")
ANNEAL_EPOCHS = 2  # the schema default of train.anneal_epochs


@dataclass(frozen=True)
class Curve:
    """One plain trial: its validation macro F1 per epoch and seconds per epoch."""

    values: list[float]
    epoch_s: float


def candidates(epochs: int) -> dict[str, tuple[optuna.pruners.BasePruner, int]]:
    """Pruner and early-stopping patience per candidate, for trials of ``epochs`` epochs.

    Patience is counted on the smoothed curve, as ``search.train`` does; ``10**6`` = none.
    """
    sha, hb, median = (optuna.pruners.SuccessiveHalvingPruner, optuna.pruners.HyperbandPruner,
                       optuna.pruners.MedianPruner)
    return {
        "none, no early stopping": (optuna.pruners.NopPruner(), 10**6),
        "early stopping (patience 3)": (optuna.pruners.NopPruner(), 3),
        "early stopping (patience 5)": (optuna.pruners.NopPruner(), 5),
        "successive halving 4/3 + es5 (apples before)": (sha(min_resource=4, reduction_factor=3),
                                                         5),
        "hyperband 1/3 + es3 (schema default before)": (
            hb(min_resource=1, max_resource=epochs, reduction_factor=3), 3),
        "successive halving 3/3 + es3": (sha(min_resource=3, reduction_factor=3), 3),
        "successive halving 4/3 + es3": (sha(min_resource=4, reduction_factor=3), 3),
        "successive halving 6/2 + es3": (sha(min_resource=6, reduction_factor=2), 3),
        "successive halving 8/2 + es3": (sha(min_resource=8, reduction_factor=2), 3),
        "median (warm-up 4) + es3": (median(n_startup_trials=3, n_warmup_steps=4), 3),
        "median (warm-up 6) + es3": (median(n_startup_trials=3, n_warmup_steps=6), 3),
        "median (warm-up 8) + es3": (median(n_startup_trials=3, n_warmup_steps=8), 3),
    }


def load_curves(path: str) -> list[Curve]:
    """The COMPLETE trials of the study in the SQLite file ``path``, in trial order."""
    storage = f"sqlite:///{path}"
    name = optuna.get_all_study_names(storage)[0]
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(
        states=(TrialState.COMPLETE,))
    curves = []
    for trial in sorted(trials, key=lambda t: t.number):
        values = [trial.intermediate_values[k] for k in sorted(trial.intermediate_values)]
        curves.append(Curve(values, trial.duration.total_seconds() / len(values)))
    return curves


def replay(curves: list[Curve], pruner: optuna.pruners.BasePruner, patience: int,
           target: float, *, smooth: bool = False) -> tuple[float, int, float, float | None]:
    """Seconds, epochs and best F1 of the replayed search, and seconds to reach ``target``.

    ``smooth``: the pruner is shown each epoch's trailing mean of 3 (what a trial is valued
    by, ``value = "smoothed"``) instead of the epoch's own F1.
    """
    study = optuna.create_study(study_name="replay", direction="maximize", pruner=pruner)
    seconds, epochs, reached = 0.0, 0, None
    for curve in curves:
        trial = study.ask()
        best, pruned, last = -1.0, False, len(curve.values) - 1
        best_smooth, smooth_epoch = -1.0, -1
        for epoch, value in enumerate(curve.values):
            seconds += curve.epoch_s
            epochs += 1
            trial.report(smoothed(curve.values[:epoch + 1]) if smooth else value, epoch)
            best = max(best, value)
            if smoothed(curve.values[:epoch + 1]) > best_smooth:
                best_smooth, smooth_epoch = smoothed(curve.values[:epoch + 1]), epoch
            elif epoch - smooth_epoch >= patience and last == len(curve.values) - 1:
                # The real trial anneals for ANNEAL_EPOCHS more; the plain curve's next
                # epochs stand in for them (pessimistic: their LR is still high).
                last = min(last, epoch + ANNEAL_EPOCHS)
            if trial.should_prune():
                pruned = True
                break
            if epoch >= last:
                break
        if pruned:
            study.tell(trial, state=TrialState.PRUNED)
            continue
        study.tell(trial, best)
        if reached is None and best >= target:
            reached = seconds
    best_value = max((t.value for t in study.get_trials(states=(TrialState.COMPLETE,))),
                     default=float("nan"))
    return seconds, epochs, best_value, reached


def curve_report(curves: list[Curve]) -> None:
    """Per epoch: the planned LR, how much of each trial's final best F1 it already shows,
    and how well its raw and smoothed F1 there rank the trials by their final best.

    A pruner deciding at epoch e is only as good as the rank correlation at e.
    """
    epochs = min(len(c.values) for c in curves)
    finals = [max(c.values) for c in curves]
    schedule = WarmupCosine(total_steps=epochs, warmup_steps=1)
    print("| epoch | planned LR | best so far / final best (mean) | F1 at epoch = final best "
          "(share of trials) | Spearman raw F1 vs final best | Spearman smoothed vs final |")
    print("| --- | --- | --- | --- | --- | --- |")
    for e in range(epochs):
        so_far = [max(c.values[:e + 1]) / f for c, f in zip(curves, finals, strict=True)]
        at_best = np.mean([max(c.values[:e + 1]) >= f for c, f in zip(curves, finals,
                                                                       strict=True)])
        raw = spearmanr([c.values[e] for c in curves], finals).statistic
        smooth = spearmanr([smoothed(c.values[:e + 1]) for c in curves], finals).statistic
        print(f"| {e} | {schedule(e + 1):.2f} | {np.mean(so_far):.3f} | {at_best:.2f} | "
              f"{raw:.2f} | {smooth:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("studies", nargs="+", help="SQLite files of plain searches")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for path in args.studies:
        curves = load_curves(path)
        target = max(max(c.values) for c in curves) - MARGIN
        full_s, _, _, plain_reached = replay(curves, optuna.pruners.NopPruner(), 10**6, target)
        print(f"\n{path}: {len(curves)} trials, target {target:.4f}, plain {full_s:.0f} s, "
              f"reached after {plain_reached:.0f} s")
        curve_report(curves)
        print()
        print("| candidate | time share | epochs | best val F1 | time to target / plain's |")
        print("| --- | --- | --- | --- | --- |")
        epochs = max(len(c.values) for c in curves)
        for name, (pruner, patience) in candidates(epochs).items():
            for smooth in (False, True) if name in SMOOTHED_TOO else (False,):
                seconds, used, best, reached = replay(curves, pruner, patience, target,
                                                      smooth=smooth)
                ratio = f"{reached / plain_reached:.2f}" if reached is not None else "missed"
                label = f"{name}, pruner sees the trailing mean" if smooth else name
                print(f"| {label} | {seconds / full_s:.2f} | {used} | {best:.4f} | {ratio} |")


if __name__ == "__main__":
    main()
