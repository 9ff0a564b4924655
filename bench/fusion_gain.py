"""Benchmark: the best macro F1 the search finds with each fusion type, at equal budget.

For every fusion of the study's space (``none`` is rgb only), it runs our default search
with the fusion fixed and the same trial budget, seed and everything else, and prints the
best validation macro F1, the test macro F1 and per-class test F1 of the best trial, and
the wall time. With several seeds it also prints the mean per fusion.

    .venv/bin/python -m bench.fusion_gain                        # apples, seed 0
    .venv/bin/python -m bench.fusion_gain --n-trials 4 --seeds 0,1
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import optuna

from bench._searches import mean, print_table, run_default, search_parser, study_config


def parse_args() -> argparse.Namespace:
    parser = search_parser(__doc__.splitlines()[0], seeds="0", trials_help="trials per fusion")
    parser.add_argument("--fusions", help="comma-separated (default: the study's space)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seeds = [int(s) for s in args.seeds.split(",")]
    header = ["fusion", "seed", "best val F1", "test F1", "per-class test F1", "trials", "wall s"]
    lines, summary = [], []
    with tempfile.TemporaryDirectory(prefix="fs-fusion-") as temp:
        workdir = args.workdir or Path(temp)
        probe = study_config(args.study, workdir, "probe")
        fusions = args.fusions.split(",") if args.fusions else list(probe.space.fusion.values())
        for fusion in fusions:
            vals, tests = [], []
            for seed in seeds:
                config = study_config(
                    args.study, workdir, f"{fusion}-{seed}", space={"fusion": [fusion]},
                    study={"seed": seed, **({"n_trials": args.n_trials} if args.n_trials else {})},
                    train={"epochs": args.epochs} if args.epochs else {})
                print(f"{fusion}, seed {seed}: {config.study.n_trials} trials", flush=True)
                run = run_default(fusion, config)
                test, per_class = run.test_scores()
                vals.append(run.best_value)
                tests.append(test)
                states = [t.state.name[0] for t in run.finished]
                lines.append([fusion, str(seed), f"{run.best_value:.4f}", f"{test:.4f}",
                              " ".join(f"{c} {v:.2f}" for c, v in per_class.items()),
                              f"{states.count('C')} complete, {states.count('P')} pruned",
                              f"{run.wall_s:.0f}"])
                print_table(header, lines)
            summary.append([fusion, f"{mean(vals):.4f}", f"{mean(tests):.4f}", str(len(seeds))])
    print_table(["fusion", "mean best val F1", "mean test F1", "seeds"], summary)


if __name__ == "__main__":
    main()
