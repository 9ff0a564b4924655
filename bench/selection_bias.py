"""Benchmark: how optimistic is a trial's value, and which rule picks winners that hold up?

A search (ours, or ``--plain``: the plain search on our cached data) runs while every
trial's predicted class for every validation sample at every epoch is kept. Then, for many
random stratified halves A / B of the validation split, each selection rule picks a
checkpoint (an epoch) within every trial and a winner among the complete trials using half
A alone; the winner's macro F1 on half B is what the rule's choice is worth, and its value
on A minus that F1 its optimism. Only the validation split is read: the test split is not
touched, so the figures may choose a default.

    .venv/bin/python -m bench.selection_bias --study apples --n-trials 8 --seeds 0 \\
        --workdir /tmp/bench/sel
    .venv/bin/python -m bench.selection_bias --analyse /tmp/bench/sel/ours-*/curves.npz --pool

The rules (``e`` an epoch, ``F(e)`` a trial's macro F1 on A at the end of epoch ``e``):

- ``max``: the best epoch, valued at its F1 (what the search does before this benchmark);
- ``last``: the last epoch trained;
- ``trailing 3``: the epoch ending the best mean of 3 consecutive epochs, valued at that mean
  (computable while training: the checkpoint is the current epoch's);
- ``centred 3``: the epoch in the middle of the best mean of 3, valued at that mean;
- ``max, valued trailing 3``: the best epoch's checkpoint, the trial valued at its best
  trailing mean (the checkpoint and the trials' ranking decided apart).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

import search.trial.train as train_module
from bench._searches import plain_overrides, print_table, run_default, run_plain, search_parser
from bench._searches import study_config as make_config
from search.trial.objective import Objective

SPLITS = 1000


def record(study: str, seed: int, workdir: Path, n_trials: int | None, epochs: int | None,
           plain: bool) -> Path:
    """Run one search, keeping every validation prediction; returns the ``.npz`` written."""
    common = {"study": {"seed": seed, **({"n_trials": n_trials} if n_trials else {})},
              "train": {"epochs": epochs} if epochs else {}}
    label = f"{'plain' if plain else 'ours'}-{seed}"
    if plain:
        ours = make_config(study, workdir, "probe", **common)
        config = make_config(study, workdir, label, study=common["study"],
                             **plain_overrides(ours.train.epochs))
    else:
        config = make_config(study, workdir, label, **common)
    curves: dict[int, dict[int, np.ndarray]] = {}
    labels: list[np.ndarray] = []
    last: list[np.ndarray] = []
    out = workdir / label / "curves.npz"
    predict, report = train_module.predict, Objective._report

    def keeping_predict(model, split, **kwargs):
        predicted = predict(model, split, **kwargs)
        last[:] = [predicted]
        labels[:] = [split.labels]
        return predicted

    def keeping_report(self, trial, epoch, f1):
        curves.setdefault(trial.number, {})[epoch] = last[0]
        # Saved after every epoch, so that a run cut short still leaves its finished trials.
        save(out, labels[0], curves, trial.study.get_trials(deepcopy=False))
        report(self, trial, epoch, f1)

    train_module.predict = keeping_predict
    Objective._report = keeping_report  # type: ignore[method-assign]
    try:
        run = run_plain(label, config, cached=True) if plain else run_default(label, config)
    finally:
        train_module.predict, Objective._report = predict, report  # type: ignore[method-assign]
    save(out, labels[0], curves, run.study.get_trials(deepcopy=False))
    print(f"{label}: {len(curves)} trials, best value {run.best_value:.4f}, "
          f"{run.wall_s:.0f} s; curves in {out}", flush=True)
    return out


def save(path: Path, labels: np.ndarray, curves: dict[int, dict[int, np.ndarray]],
         trials: list) -> None:
    """Every trial's predictions per epoch, and its state (RUNNING while it trains)."""
    states = {t.number: t for t in trials}
    arrays = {f"trial_{n}": np.stack([c[e] for e in sorted(c)]) for n, c in curves.items()}
    meta = {n: {"state": states[n].state.name, "params": states[n].params,
                "value": states[n].value} for n in curves}
    partial = path.with_suffix(".tmp.npz")
    np.savez_compressed(partial, labels=labels, meta=json.dumps(meta), **arrays)
    partial.replace(path)


def macro_f1(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Macro F1 of each row of ``predicted`` (epochs x samples), as scikit-learn's
    ``f1_score(average="macro", labels=all classes, zero_division=0)``."""
    scores = np.zeros(len(predicted))
    for c in range(num_classes):
        truth = labels == c
        guess = predicted == c
        tp = (guess & truth).sum(axis=1)
        denominator = guess.sum(axis=1) + truth.sum()
        scores += np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)
    return scores / num_classes


def windowed(f1: np.ndarray, centred: bool) -> np.ndarray:
    """Mean of 3 consecutive epochs ending at (or centred on) each epoch (fewer at the ends)."""
    out = np.empty_like(f1)
    for e in range(len(f1)):
        lo, hi = (e - 1, e + 2) if centred else (e - 2, e + 1)
        out[e] = f1[max(0, lo):min(len(f1), hi)].mean()
    return out


# rule: a trial's F1 per epoch on A -> (checkpoint epoch, value)
Rule = Callable[[np.ndarray], tuple[int, float]]


def _best_window(f1: np.ndarray, centred: bool) -> tuple[int, float]:
    smooth = windowed(f1, centred)
    e = int(np.argmax(smooth))
    return e, float(smooth[e])


RULES: dict[str, Rule] = {
    "max": lambda f1: (int(np.argmax(f1)), float(f1.max())),
    "last": lambda f1: (len(f1) - 1, float(f1[-1])),
    "trailing 3": lambda f1: _best_window(f1, centred=False),
    "centred 3": lambda f1: _best_window(f1, centred=True),
    "max, valued trailing 3": lambda f1: (int(np.argmax(f1)), float(windowed(f1, False).max())),
}


def halves(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random stratified split of the rows in two halves."""
    a = []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        a.append(rows[:len(rows) // 2 + int(rng.integers(2)) * (len(rows) % 2)])
    mask = np.zeros(len(labels), bool)
    mask[np.concatenate(a)] = True
    return np.flatnonzero(mask), np.flatnonzero(~mask)


def load_complete(paths: list[Path]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The validation labels and the curves of the complete trials of one or more recordings
    (of one study: the same validation split), pooled as if one search had run them all."""
    labels, curves = None, {}
    for path in paths:
        data = np.load(path)
        if labels is not None and not np.array_equal(labels, data["labels"]):
            raise SystemExit(f"{path}: another validation split; pool one study's curves only")
        labels = data["labels"]
        for n, m in json.loads(str(data["meta"])).items():
            if m["state"] == TrialState.COMPLETE.name:
                curves[f"{path.parent.name}/{n}"] = data[f"trial_{n}"]
    assert labels is not None
    return labels, curves


def analyse(paths: Path | list[Path], splits: int = SPLITS,
            seed: int = 0) -> dict[str, dict[str, float]]:
    """Per rule, over ``splits`` halvings: the winner's F1 on B, its optimism, and the mean
    F1 on B of every complete trial's chosen checkpoint (the checkpoint choice alone)."""
    labels, curves = load_complete([paths] if isinstance(paths, Path) else paths)
    num_classes = int(labels.max()) + 1
    rng = np.random.default_rng(seed)
    results: dict[str, dict[str, list[float]]] = {
        r: {"winner B": [], "winner A": [], "checkpoint B": [], "winner B (full val best)": []}
        for r in RULES}
    for _ in range(splits):
        a, b = halves(labels, rng)
        on_a = {n: macro_f1(labels[a], c[:, a], num_classes) for n, c in curves.items()}
        on_b = {n: macro_f1(labels[b], c[:, b], num_classes) for n, c in curves.items()}
        for name, rule in RULES.items():
            chosen = {n: rule(f1) for n, f1 in on_a.items()}
            winner = max(chosen, key=lambda n: chosen[n][1])
            epoch, value = chosen[winner]
            results[name]["winner A"].append(value)
            results[name]["winner B"].append(float(on_b[winner][epoch]))
            results[name]["checkpoint B"].append(
                float(np.mean([on_b[n][e] for n, (e, _) in chosen.items()])))
    summary = {}
    for name, values in results.items():
        winner_b = np.array(values["winner B"])
        summary[name] = {"winner B": float(winner_b.mean()),
                         "winner B se": float(winner_b.std() / np.sqrt(len(winner_b))),
                         "optimism": float(np.mean(values["winner A"]) - winner_b.mean()),
                         "checkpoint B": float(np.mean(values["checkpoint B"]))}
    return summary


def report(paths: list[Path], splits: int, pool: bool = False) -> None:
    header = ["curves", "rule", "winner F1 on B", "optimism (A - B)",
              "mean checkpoint F1 on B", "vs max (winner on B)"]
    lines = []
    groups = [paths] if pool else [[path] for path in paths]
    for group in groups:
        summary = analyse(group, splits)
        base = summary["max"]["winner B"]
        name_of = " + ".join(path.parent.name for path in group)
        for name, s in summary.items():
            lines.append([name_of, name,
                          f"{s['winner B']:.4f} +- {s['winner B se']:.4f}",
                          f"{s['optimism']:+.4f}", f"{s['checkpoint B']:.4f}",
                          f"{s['winner B'] - base:+.4f}"])
    print_table(header, lines)


def main() -> None:
    parser = search_parser(__doc__.splitlines()[0], seeds="0", trials_help="trial budget")
    parser.add_argument("--plain", action="store_true",
                        help="record the plain search (on our cached data) instead of ours")
    parser.add_argument("--splits", type=int, default=SPLITS, help="random halvings")
    parser.add_argument("--analyse", type=Path, nargs="+", metavar="NPZ",
                        help="only analyse curves recorded earlier")
    parser.add_argument("--pool", action="store_true",
                        help="with --analyse: pool the files' complete trials into one search")
    args = parser.parse_args()
    if args.analyse:
        report(args.analyse, args.splits, args.pool)
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="fs-selection-") as temp:
        workdir = args.workdir or Path(temp)
        paths = [record(args.study, int(s), workdir, args.n_trials, args.epochs, args.plain)
                 for s in args.seeds.split(",")]
        report(paths, args.splits)


if __name__ == "__main__":
    main()
