"""Benchmark: our default search against the plain approach, same seeds and trial budget.

(a) plain, what a hand-written Optuna script does: Optuna's TPE with its defaults, every
    trial trains for the full epoch budget (no early stopping, no pruning), images are
    decoded from their files every epoch and augmented on the fly;
(b) ours: the study as ``search worker`` runs it (its start points, sampler and pruner,
    early stopping, decoded-image and balanced-set caches built cold at the start of each run).

Both samplers are seeded alike, so their random start-up trials train the same
configurations; the model, data, split, loss and training loop are the same code.
For each seed it prints the best validation macro F1, the test macro F1 of the best trial,
the epochs trained, the wall time, and the time and epochs each approach needed to reach
(a)'s best F1 - 0.01; then the ratios (b)/(a) of those, and (b)'s time to that target over
(a)'s whole wall time (what a plain script's user waits for its best model). A run that
never reaches the target shows "-" and counts as a miss.

    .venv/bin/python -m bench.search_efficiency                       # apples, 3 seeds: ~65 min
    .venv/bin/python -m bench.search_efficiency --n-trials 8 --epochs 8 --seeds 0,1,2
    .venv/bin/python -m bench.search_efficiency --study path/to/study.toml --seeds 0
    .venv/bin/python -m bench.search_efficiency --without-start   # + (c): (b) minus start_with

``--without-start`` adds (c), our search with ``[sampler] start_with`` emptied, to show how
much of (b)'s lead the start points give and how much the rest of the defaults give.
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
    parser.add_argument("--without-start", action="store_true",
                        help="also run (c): ours without the study's [sampler] start_with")
    return parser.parse_args()


def compare(study: str, seed: int, workdir: Path, n_trials: int | None,
            epochs: int | None, without_start: bool) -> list[SearchRun]:
    """Run (a), (b) and optionally (c) for one seed; returns the runs in that order."""
    common = {"study": {"seed": seed, **({"n_trials": n_trials} if n_trials else {})},
              "train": {"epochs": epochs} if epochs else {}}
    ours = study_config(study, workdir, f"ours-{seed}", **common)
    plain = study_config(study, workdir, f"plain-{seed}", study=common["study"],
                         **plain_overrides(ours.train.epochs))
    ensure_demo(plain.data, seed=seed)  # once, outside every timing
    print(f"seed {seed}: (a) plain, {plain.study.n_trials} trials x {plain.train.epochs} epochs",
          flush=True)
    runs = [run_plain("plain", plain)]
    print(f"seed {seed}: (b) ours", flush=True)
    runs.append(run_default("ours", ours))
    if without_start:
        print(f"seed {seed}: (c) ours without start points", flush=True)
        bare = study_config(study, workdir, f"bare-{seed}", **common,
                            sampler={"start_with": []})
        runs.append(run_default("ours, no start", bare))
    return runs


def row(seed: int, run: SearchRun, target: float,
        plain_wall_s: float) -> tuple[list[str], tuple[float, int] | None]:
    reached = run.reached(target)
    cells = [str(seed), run.label, f"{run.best_value:.4f}", f"{run.test_scores()[0]:.4f}",
             str(run.epochs), f"{run.wall_s:.0f}",
             f"{reached[0]:.0f}" if reached else "-", str(reached[1]) if reached else "-",
             f"{reached[0] / plain_wall_s:.2f}" if reached else "-"]
    return cells, reached


def ratio(ours: tuple[float, int] | None, plain: tuple[float, int] | None, i: int) -> float:
    if ours is None or plain is None or plain[i] == 0:
        return float("nan")
    return ours[i] / plain[i]


def summary(label: str, ratios: list[tuple[float, float, float]], n_seeds: int) -> str:
    """Mean and worst of each ratio over the seeds; a missed target counts as a miss."""
    columns = list(zip(*ratios, strict=True))
    misses = sum(r != r for r in columns[0])
    parts = [f"{name} mean {mean(list(values)):.2f}, worst "
             f"{max((v for v in values if v == v), default=float('nan')):.2f}"
             for name, values in zip(("time", "epochs", "time / plain's wall time"), columns,
                                     strict=True)]
    return (f"({label})/(plain) to reach plain's best - {MARGIN}: " + "; ".join(parts)
            + f"; missed the target in {misses} of {n_seeds} seed(s)")


def main() -> None:
    args = parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seeds = [int(s) for s in args.seeds.split(",")]
    header = ["seed", "search", "best val F1", "test F1 (best)", "epochs", "wall s",
              "s to target", "epochs to target", "s to target / plain wall s"]
    lines: list[list[str]] = []
    ratios: dict[str, list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="fs-efficiency-") as temp:
        workdir = args.workdir or Path(temp)
        for seed in seeds:
            plain, *others = compare(args.study, seed, workdir, args.n_trials, args.epochs,
                                     args.without_start)
            target = plain.best_value - MARGIN
            cells, reached_plain = row(seed, plain, target, plain.wall_s)
            lines.append(cells)
            for run in others:
                cells, reached = row(seed, run, target, plain.wall_s)
                of_wall = reached[0] / plain.wall_s if reached else float("nan")
                trio = (ratio(reached, reached_plain, 0), ratio(reached, reached_plain, 1),
                        of_wall)
                ratios.setdefault(run.label, []).append(trio)
                lines += [cells,
                          [str(seed), f"({run.label})/(plain)", f"target {target:.4f}", "",
                           f"{run.epochs / max(1, plain.epochs):.2f}",
                           f"{run.wall_s / plain.wall_s:.2f}", f"{trio[0]:.2f}",
                           f"{trio[1]:.2f}", f"{of_wall:.2f}"]]
            print_table(header, lines)
    for label, trios in ratios.items():
        print("\n" + summary(label, trios, len(seeds)))


if __name__ == "__main__":
    main()
