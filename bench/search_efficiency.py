"""Benchmark: our default search against the plain approach, same seeds and trial budget.

(a) plain, what a hand-written Optuna script does: Optuna's TPE with its defaults, every
    trial trains for the full epoch budget (no early stopping, no pruning), images are
    decoded from their files every epoch and augmented on the fly;
(b) ours: the study as ``search worker`` runs it (its sampler and pruner, early stopping,
    decoded-image and balanced-set caches built cold at the start of each run).

Both samplers are seeded alike, so their random start-up trials train the same
configurations; the model, data, split, loss and training loop are the same code.
For each seed it prints the best validation macro F1, the test macro F1 of the best trial,
the epochs trained, the wall time, and the time and epochs each approach needed to reach
(a)'s best F1 - 0.01; then the ratios (b)/(a) of those. A run that never reaches the target
shows "-" and counts as a miss.

    .venv/bin/python -m bench.search_efficiency                       # apples, 3 seeds
    .venv/bin/python -m bench.search_efficiency --n-trials 8 --epochs 8 --seeds 0,1,2
    .venv/bin/python -m bench.search_efficiency --study path/to/study.toml --seeds 0
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import optuna

from bench._searches import (
    SearchRun,
    mean,
    plain_overrides,
    print_table,
    run_default,
    run_plain,
    search_parser,
    study_config,
)
from search.demo import ensure_demo

MARGIN = 0.01


def parse_args() -> argparse.Namespace:
    parser = search_parser(__doc__.splitlines()[0], seeds="0,1,2", trials_help="trial budget")
    return parser.parse_args()


def compare(study: str, seed: int, workdir: Path, n_trials: int | None,
            epochs: int | None) -> tuple[SearchRun, SearchRun]:
    """Run (a) then (b) for one seed; returns both runs."""
    common = {"study": {"seed": seed, **({"n_trials": n_trials} if n_trials else {})}}
    ours = study_config(study, workdir, f"ours-{seed}", **common,
                        train={"epochs": epochs} if epochs else {})
    plain = study_config(study, workdir, f"plain-{seed}", **common,
                         **plain_overrides(ours.train.epochs))
    ensure_demo(plain.data, seed=seed)  # once, outside both timings
    print(f"seed {seed}: (a) plain, {plain.study.n_trials} trials x {plain.train.epochs} epochs",
          flush=True)
    a = run_plain("plain", plain)
    print(f"seed {seed}: (b) ours", flush=True)
    b = run_default("ours", ours)
    return a, b


def row(seed: int, run: SearchRun, target: float) -> tuple[list[str], tuple[float, int] | None]:
    reached = run.reached(target)
    cells = [str(seed), run.label, f"{run.best_value:.4f}", f"{run.test_scores()[0]:.4f}",
             str(run.epochs), f"{run.wall_s:.0f}",
             f"{reached[0]:.0f}" if reached else "-", str(reached[1]) if reached else "-"]
    return cells, reached


def ratio(ours: tuple[float, int] | None, plain: tuple[float, int] | None, i: int) -> float:
    if ours is None or plain is None or plain[i] == 0:
        return float("nan")
    return ours[i] / plain[i]


def main() -> None:
    args = parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seeds = [int(s) for s in args.seeds.split(",")]
    header = ["seed", "search", "best val F1", "test F1 (best)", "epochs", "wall s",
              "s to target", "epochs to target"]
    lines, time_ratios, epoch_ratios = [], [], []
    with tempfile.TemporaryDirectory(prefix="fs-efficiency-") as temp:
        workdir = args.workdir or Path(temp)
        for seed in seeds:
            a, b = compare(args.study, seed, workdir, args.n_trials, args.epochs)
            target = a.best_value - MARGIN
            cells_a, reached_a = row(seed, a, target)
            cells_b, reached_b = row(seed, b, target)
            time_ratios.append(ratio(reached_b, reached_a, 0))
            epoch_ratios.append(ratio(reached_b, reached_a, 1))
            lines += [cells_a, cells_b,
                      [str(seed), "(b)/(a)", f"target {target:.4f}", "",
                       f"{b.epochs / max(1, a.epochs):.2f}", f"{b.wall_s / a.wall_s:.2f}",
                       f"{time_ratios[-1]:.2f}", f"{epoch_ratios[-1]:.2f}"]]
            print_table(header, lines)
    misses = sum(r != r for r in time_ratios)
    print(f"\nmean (b)/(a) to reach (a)'s best - {MARGIN}: time {mean(time_ratios):.2f}, "
          f"epochs {mean(epoch_ratios):.2f} over {len(seeds) - misses} seed(s); "
          f"(b) missed the target in {misses} of {len(seeds)}")


if __name__ == "__main__":
    main()
