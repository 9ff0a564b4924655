"""Benchmark: is the final model better than the best single trial? (ensembles, bias)

For each study and seed it runs our default search, then scores on the test split, with
everything fitted on validation only (search/bundle/ensemble.py, search/bundle/posthoc.py):

* the best single trial (what ``search export`` exports by default);
* + per-class bias (``--bias``), fitted on the best trial's validation log-probabilities;
* ensembles of the 3 and 5 best trials (greedy weights), without and with the bias;

and, for the single trial and the 3-ensemble, the exported bundle's size and onnxruntime's
latency per image (batch 1, CPU). It also prints each step's cross-fitted validation estimate,
the figure export uses to say whether a step helps, beside its test effect.

    .venv/bin/python -m bench.final_model --study garbage --seeds 0 --n-trials 6 --epochs 8
    .venv/bin/python -m bench.final_model --study apples,garbage --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import optuna
from rich.console import Console

from bench._searches import mean, print_table, run_default, study_config
from search.bundle.ensemble import Member, export_ensemble, member_probabilities, raw_splits
from search.bundle.export import export_trial, load_trial_model
from search.bundle.files import ONNX_FILE
from search.bundle.posthoc import cross_fit, fit_bias, fit_ensemble_weights, macro_f1
from search.bundle.predict import load_bundle

ROWS = ("single best", "+ bias", "ensemble 3", "ensemble 3 + bias", "ensemble 5",
        "ensemble 5 + bias")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="garbage,apples", help="comma-separated studies")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--n-trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, help="epochs per trial (default: the study's)")
    parser.add_argument("--workdir", type=Path)
    return parser.parse_args()


def scores(members: list[Member], val_labels: np.ndarray, test_labels: np.ndarray,
           ) -> dict[str, tuple[float, float | None]]:
    """Test macro F1 of each row, and its cross-fitted validation gain (None: no fitting)."""
    k = members[0].val.shape[1]
    out: dict[str, tuple[float, float | None]] = {}
    for size in (1, 3, 5):
        chosen = members[:size]
        if len(chosen) < size:
            continue
        val = np.stack([m.val for m in chosen])
        test = np.stack([m.test for m in chosen])
        name = "single best" if size == 1 else f"ensemble {size}"
        if size == 1:
            weights, gain = np.ones(1), None
        else:
            weights = fit_ensemble_weights(val, val_labels)
            gain = cross_fit(val_labels, k, baseline=val[0], fit_and_apply=lambda f, a, v=val:
                             np.tensordot(fit_ensemble_weights(v[:, f], val_labels[f]), v[:, a],
                                          axes=1)).gain
        blend_val = np.log(np.clip(np.tensordot(weights, val, axes=1), 1e-12, None))
        blend_test = np.log(np.clip(np.tensordot(weights, test, axes=1), 1e-12, None))
        out[name] = (macro_f1(test_labels, blend_test, k), gain)
        bias = fit_bias(blend_val, val_labels)
        bias_gain = cross_fit(val_labels, k, baseline=blend_val, fit_and_apply=lambda f, a, b=
                              blend_val: b[a] + fit_bias(b[f], val_labels[f])).gain
        out[f"{name} + bias" if size > 1 else "+ bias"] = (
            macro_f1(test_labels, blend_test + bias, k), bias_gain)
    return out


def latency_ms(bundle: Path, runs: int = 30) -> float:
    """onnxruntime's median time for one image (batch 1) on this CPU."""
    loaded = load_bundle(bundle)
    session = ort.InferenceSession(str(bundle / ONNX_FILE), providers=["CPUExecutionProvider"])
    feeds = {}  # synthetic inputs of the graph's shapes: the time does not depend on the pixels
    for entry in loaded.meta["inputs"]:
        shape = [1 if d == "batch" else d for d in entry["shape"]]
        feeds[entry["name"]] = (np.zeros(shape, np.int64) if entry["dtype"] == "int64"
                                else np.random.default_rng(0).random(shape, np.float32))
    times = []
    for _ in range(runs):
        tick = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - tick)
    return 1000 * float(np.median(times))


def bundle_mb(bundle: Path) -> float:
    return sum(p.stat().st_size for p in bundle.iterdir()) / 1e6


def main() -> None:
    args = parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    quiet = Console(quiet=True)
    header = ["study", "seed", *ROWS, "single MB / ms", "ens3 MB / ms"]
    lines: list[list[str]] = []
    gains: list[list[str]] = []
    per_row: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="fs-final-") as temp:
        workdir = args.workdir or Path(temp)
        for study in args.study.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                overrides: dict = {"study": {"seed": seed, "n_trials": args.n_trials}}
                if args.epochs:
                    overrides["train"] = {"epochs": args.epochs}
                config = study_config(study, workdir, f"{study}-{seed}", **overrides)
                run = run_default(f"{study}-{seed}", config)
                complete = sorted((t for t in run.finished if t.value is not None
                                   and t.state == optuna.trial.TrialState.COMPLETE),
                                  key=lambda t: -t.value)[:5]
                trained = [load_trial_model(run.study, t, config.artifacts_dir) for t in complete]
                val, test = raw_splits(config, trained)
                members = [Member(t, member_probabilities(t, val), member_probabilities(t, test))
                           for t in trained]
                result = scores(members, val.labels, test.labels)
                for name, (f1, _) in result.items():
                    per_row.setdefault(study, {}).setdefault(name, []).append(f1)
                storage = config.storage_url()
                single = workdir / f"{study}-{seed}" / "single"
                export_trial(config, storage, single, console=quiet)
                sizes = [f"{bundle_mb(single):.1f} / {latency_ms(single):.1f}"]
                if len(members) >= 3:
                    ens = workdir / f"{study}-{seed}" / "ens3"
                    export_ensemble(config, storage, ens, size=3, console=quiet)
                    sizes.append(f"{bundle_mb(ens):.1f} / {latency_ms(ens):.1f}")
                else:
                    sizes.append("-")
                lines.append([study, str(seed),
                              *(f"{result[r][0]:.3f}" if r in result else "-" for r in ROWS),
                              *sizes])
                gains.append([study, str(seed), *(
                    "-" if r not in result or result[r][1] is None else f"{result[r][1]:+.3f}"
                    for r in ROWS)])
                print(f"{study} seed {seed}: {len(run.finished)} trials in {run.wall_s:.0f} s; "
                      + ", ".join(f"{r} {result[r][0]:.3f}" for r in ROWS if r in result),
                      flush=True)
    print("\ntest macro F1 (bundle size MB / onnxruntime ms per image, batch 1):")
    print_table(header, lines)
    print("\ncross-fitted validation gain of the fitted step (what export would decide on):")
    print_table(["study", "seed", *ROWS], gains)
    print("\nmean test macro F1 over seeds:")
    print_table(["study", *ROWS], [[study, *(f"{mean(rows.get(r, [])):.3f}" for r in ROWS)]
                                  for study, rows in per_row.items()])


if __name__ == "__main__":
    main()
