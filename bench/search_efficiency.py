"""Benchmark: our default search against the plain approach, same seeds and trial budget.

(a) plain, what a hand-written Optuna script does: Optuna's TPE with its defaults, every
    trial trains for the full epoch budget (no early stopping, no pruning), images are
    decoded from their files every epoch and augmented on the fly;
(a2) plain on our data path: (a)'s search, reading our decoded-image and balanced-set
    caches with per-batch flips, so that comparing (b) with it measures the search alone;
(b) ours: the study as ``search worker`` runs it (its start points, sampler and pruner,
    the final anneal on a plateau, each trial valued at its best trailing mean of 3 epochs
    where (a) and (a2) take the best single epoch, the caches built cold at the start of
    each run).

All samplers are seeded alike, so their random start-up trials train the same
configurations; the model, data, split, loss and training loop are the same code.
For each seed it prints the best validation macro F1 (of a single epoch, for every search
alike: our trials' values are trailing means, not comparable with the plain search's), the
test macro F1 of the best trial (each search's own winner, by its own values),
the epochs trained, the wall time, and the time and epochs each search needed to reach
(a2)'s best F1 - 0.01; then (b)'s time to that target over (a2)'s and (a)'s whole wall
time, and whether (b)'s best trial scored at least (a2)'s on the test split. A run that
never reaches the target shows "-" and counts as a miss. It also says whether the study
was one of those the defaults were chosen on (``TUNED_ON``): only figures on the others
tell how the defaults do on data they were not tuned on.

    .venv/bin/python -m bench.search_efficiency --study garbage --n-trials 8 --seeds 0,1,2
    .venv/bin/python -m bench.search_efficiency --study apples --n-trials 20 --seeds 0
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
from search.data.demo import ensure_demo

MARGIN = 0.01
# The studies whose validation results chose the defaults (schema, pruner, schedule, start
# points): bench/README.md, "Stopping a trial, and choosing the defaults". Figures on any
# other study are held out.
TUNED_ON = frozenset({"apples"})


def parse_args() -> argparse.Namespace:
    parser = search_parser(__doc__.splitlines()[0], seeds="0,1,2", trials_help="trial budget")
    parser.add_argument("--without-start", action="store_true",
                        help="also run (c): ours without the study's [sampler] start_with")
    parser.add_argument("--skip-uncached", action="store_true",
                        help="skip (a), the plain search decoding every image every epoch "
                             "(a third of the time; (a2) is the baseline every ratio uses)")
    return parser.parse_args()


def compare(study: str, seed: int, workdir: Path, n_trials: int | None, epochs: int | None,
            without_start: bool, skip_uncached: bool) -> list[SearchRun | None]:
    """Run (a), (a2), (b) and optionally (c) for one seed; returns the runs in that order
    (None for a skipped (a))."""
    common = {"study": {"seed": seed, **({"n_trials": n_trials} if n_trials else {})},
              "train": {"epochs": epochs} if epochs else {}}
    ours = study_config(study, workdir, f"ours-{seed}", **common)
    plain = study_config(study, workdir, f"plain-{seed}", study=common["study"],
                         **plain_overrides(ours.train.epochs))
    plain_cached = study_config(study, workdir, f"plain-cached-{seed}", study=common["study"],
                                **plain_overrides(ours.train.epochs))
    ensure_demo(plain.data, seed=seed)  # once, outside every timing
    print(f"seed {seed}: plain searches, {plain.study.n_trials} trials x "
          f"{plain.train.epochs} epochs", flush=True)
    runs: list[SearchRun | None] = [None if skip_uncached else run_plain("plain", plain)]
    print(f"seed {seed}: (a2) plain on our cached data path", flush=True)
    runs.append(run_plain("plain, cached", plain_cached, cached=True))
    print(f"seed {seed}: (b) ours", flush=True)
    runs.append(run_default("ours", ours))
    if without_start:
        print(f"seed {seed}: (c) ours without start points", flush=True)
        bare = study_config(study, workdir, f"bare-{seed}", **common,
                            sampler={"start_with": []})
        runs.append(run_default("ours, no start", bare))
    return runs


def row(seed: int, run: SearchRun, target: float,
        walls: tuple[float, float]) -> tuple[list[str], tuple[float, int] | None]:
    """One table row; ``walls`` are (a2)'s and (a)'s wall times."""
    reached = run.reached(target)
    cells = [str(seed), run.label, f"{run.best_peak:.4f}", f"{run.test_scores()[0]:.4f}",
             str(run.epochs), f"{run.wall_s:.0f}",
             f"{reached[0]:.0f}" if reached else "-", str(reached[1]) if reached else "-",
             f"{reached[0] / walls[0]:.2f}" if reached else "-",
             f"{reached[0] / walls[1]:.2f}" if reached else "-"]
    return cells, reached


def summary(label: str, ratios: list[tuple[float, float, float]], n_seeds: int) -> str:
    """Mean and worst of the two time ratios over the seeds (the third entry of each trio,
    the test F1 gain, is reported apart); a missed target counts as a miss."""
    columns = list(zip(*ratios, strict=True))
    misses = sum(r != r for r in columns[0])
    parts = [f"{name} mean {mean(list(values)):.2f}, worst "
             f"{max((v for v in values if v == v), default=float('nan')):.2f}"
             for name, values in zip(("time / (a2)'s wall time", "time / (a)'s wall time"),
                                     columns[:2], strict=True)]
    return (f"({label}) to reach (a2)'s best - {MARGIN}: " + "; ".join(parts)
            + f"; missed the target in {misses} of {n_seeds} seed(s)")


def main() -> None:
    args = parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seeds = [int(s) for s in args.seeds.split(",")]
    header = ["seed", "search", "best epoch val F1", "test F1 (best)", "epochs", "wall s",
              "s to target", "epochs to target", "s to target / (a2) wall s",
              "s to target / (a) wall s"]
    lines: list[list[str]] = []
    trios: dict[str, list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="fs-efficiency-") as temp:
        workdir = args.workdir or Path(temp)
        name = study_config(args.study, workdir, "probe").name
        print(f"study {name!r}: " + ("USED to choose the defaults (tuning set)"
                                     if name in TUNED_ON else
                                     "NOT used to choose the defaults (held out)"), flush=True)
        for seed in seeds:
            plain, cached, *others = compare(args.study, seed, workdir, args.n_trials,
                                             args.epochs, args.without_start,
                                             args.skip_uncached)
            assert cached is not None
            target = cached.best_peak - MARGIN
            walls = (cached.wall_s, plain.wall_s if plain else float("nan"))
            for run in (plain, cached):
                if run is not None:
                    lines.append(row(seed, run, target, walls)[0])
            cached_test = cached.test_scores()[0]
            for run in others:
                assert run is not None
                cells, reached = row(seed, run, target, walls)
                gain = run.test_scores()[0] - cached_test
                trio = ((reached[0] / walls[0], reached[0] / walls[1], gain) if reached
                        else (float("nan"), float("nan"), gain))
                trios.setdefault(run.label, []).append(trio)
                lines += [cells,
                          [str(seed), f"({run.label}) vs (a2)", f"target {target:.4f}",
                           f"{gain:+.4f}", f"{run.epochs / max(1, cached.epochs):.2f}",
                           f"{run.wall_s / cached.wall_s:.2f}", "", "", f"{trio[0]:.2f}",
                           f"{trio[1]:.2f}"]]
            print_table(header, lines)
    print(f"\nstudy {name!r}: " + ("used to choose the defaults" if name in TUNED_ON
                                    else "held out: not used to choose the defaults"))
    for label, values in trios.items():
        print(summary(label, values, len(seeds)))
        gains = [g for _, _, g in values]
        print(f"({label}) best trial's test F1 >= (a2)'s in {sum(g >= 0 for g in gains)} of "
              f"{len(gains)} seed(s); mean difference {mean(gains):+.4f}")


if __name__ == "__main__":
    main()
