"""Benchmark: is the final model better than the best single trial? (ensembles, bias, TTA, EMA)

For each study and seed it runs our default search (topped up until ``--min-complete``
trials completed, so that an ensemble of 5 can be formed), then scores on the test split,
with everything fitted on validation only (search/bundle/ensemble.py, search/bundle/posthoc.py):

* the best single trial (what ``search export`` exports by default);
* + per-class bias (``--bias``), fitted on the best trial's validation log-probabilities;
* + TTA: the same best trial's weights evaluated on the mean over the study's own lossless
  views (``tta = "flips"``, search/trial/tta.py), nothing retrained;
* + EMA: the best trial's parameters trained again twice, with ``ema_decay`` 0 and
  ``--ema-decay``, both as trial 0 of a one-trial study seeded ``seed + best trial number``
  (the same torch seed as the best trial): a paired comparison whose only difference is EMA;
* ensembles of the 3 and 5 best trials (greedy weights), without and with the bias;

and, for the ``--latency-seeds``, the size of the ONNX graph export writes (weights inside;
a bundle adds a safetensors copy and model.json) and onnxruntime's latency per image (batch 1,
CPU) for the single trial, with TTA, and the ensembles (members of weight 0 left out, as
export does). Bias and EMA change no graph size or speed (bias is one add). It also prints
the validation estimate of each step beside its test effect: cross-fitted for the fitted
steps (what export decides on), plain validation differences for TTA and EMA (nothing fitted).

``--workdir`` keeps the studies; a rerun with the same folder reuses every finished search
and retrain, so only the scoring runs again.

    .venv/bin/python -m bench.final_model --study garbage --seeds 0 --n-trials 6 --epochs 8
    .venv/bin/python -m bench.final_model --study apples,garbage --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

import models
from bench._searches import mean, print_table, study_config
from search.bundle.ensemble import EnsembleModel, Member, member_probabilities, raw_splits
from search.bundle.export import Network, TrialModel, export_graph, load_trial_model
from search.bundle.posthoc import cross_fit, fit_bias, fit_ensemble_weights, macro_f1
from search.config import StudyConfig
from search.data.prepared import Split
from search.study.worker import WorkerOptions, run_worker
from search.trial.tta import TTAModel, tta_ops

ROWS = ("single best", "+ bias", "+ TTA", "EMA off (retrained)", "+ EMA (retrained)",
        "ensemble 3", "ensemble 3 + bias", "ensemble 5", "ensemble 5 + bias")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="garbage,apples", help="comma-separated studies")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--n-trials", type=int, default=8, help="the search's budget")
    parser.add_argument("--min-complete", type=int, default=5,
                        help="add trials until this many completed (default 5: ensemble of 5)")
    parser.add_argument("--max-extra", type=int, default=6,
                        help="at most this many trials added beyond --n-trials")
    parser.add_argument("--epochs", type=int, help="epochs per trial (default: the study's)")
    parser.add_argument("--ema-decay", type=float, default=0.99,
                        help="ema_decay of the EMA retrain (default 0.99, chosen beforehand)")
    parser.add_argument("--no-off-retrain", action="store_true",
                        help="compare EMA with the best trial itself instead of an EMA-off "
                             "retrain (equal when training is deterministic; see its output)")
    parser.add_argument("--latency-seeds", default="0",
                        help="seeds whose graphs are exported and timed (default 0)")
    parser.add_argument("--search-only", action="store_true",
                        help="run (or finish) the searches only: no retrains, no scores")
    parser.add_argument("--workdir", type=Path, help="keep studies here (default: a temp dir)")
    return parser.parse_args()


def complete_trials(study: optuna.Study) -> list[FrozenTrial]:
    """COMPLETE trials, best validation score first."""
    return sorted((t for t in study.get_trials(deepcopy=False)
                   if t.state == TrialState.COMPLETE and t.value is not None),
                  key=lambda t: -t.value)


def run_until(config: StudyConfig, budget: int, min_complete: int, max_budget: int,
              ) -> optuna.Study:
    """Run the study's search; add trials (one budget step at a time) until enough complete.

    A study whose budget was already spent (a rerun with ``--workdir``) runs nothing.
    """
    storage = config.storage_url()
    while True:
        run_worker(config, WorkerOptions(storage_url=storage, n_trials=budget))
        study = optuna.load_study(study_name=config.name, storage=storage)
        missing = min_complete - len(complete_trials(study))
        if missing <= 0 or budget >= max_budget:
            return study
        budget = min(max_budget, budget + missing)  # pruning may take some of them again


def wall_s(study: optuna.Study) -> float:
    """First trial start to last trial end (survives a rerun that reuses the study)."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.datetime_complete]
    return (max(t.datetime_complete for t in trials)
            - min(t.datetime_start for t in trials)).total_seconds()


def retrain(name: str, seed: int, workdir: Path, best: FrozenTrial, decay: float,
            epochs: int | None) -> tuple[StudyConfig, optuna.Study]:
    """The best trial's parameters trained again with ``ema_decay = decay``, unpruned.

    Trial 0 of a study seeded ``seed + best.number`` gets the torch seed the best trial had
    (search/trial/objective.py seeds with ``study seed + trial number``); with class weights
    as the balance, the study seed draws nothing else, so the EMA-off and EMA-on retrains
    differ only by the average.
    """
    space = {**best.params, "ema_decay": decay}
    overrides: dict = {"study": {"seed": seed + best.number, "n_trials": 1},
                       "space": space, "pruner": {"kind": "none"}}
    if epochs:
        overrides["train"] = {"epochs": epochs}
    config = study_config(name, workdir, f"{name}-{seed}-ema{decay:g}", **overrides)
    return config, run_until(config, 1, 1, 1)


def log(p: np.ndarray) -> np.ndarray:
    return np.log(np.clip(p, 1e-12, None))


def ensemble_scores(members: list[Member], val_labels: np.ndarray, test_labels: np.ndarray,
                    ) -> tuple[dict[str, tuple[float, str]], dict[int, np.ndarray]]:
    """Test macro F1 of the single/ensemble/bias rows with the cross-fitted validation gain,
    and each ensemble's weights by size."""
    k = members[0].val.shape[1]
    out: dict[str, tuple[float, str]] = {}
    fitted: dict[int, np.ndarray] = {}
    for size in (1, 3, 5):
        chosen = members[:size]
        if len(chosen) < size:
            continue
        val = np.stack([m.val for m in chosen])
        test = np.stack([m.test for m in chosen])
        name = "single best" if size == 1 else f"ensemble {size}"
        if size == 1:
            weights, note = np.ones(1), "-"
        else:
            weights = fit_ensemble_weights(val, val_labels)
            gain = cross_fit(val_labels, k, baseline=val[0], fit_and_apply=lambda f, a, v=val:
                             np.tensordot(fit_ensemble_weights(v[:, f], val_labels[f]), v[:, a],
                                          axes=1)).gain
            note = f"{gain:+.3f} ({int((weights > 0).sum())} kept)"
            fitted[size] = weights
        blend_val = log(np.tensordot(weights, val, axes=1))
        blend_test = log(np.tensordot(weights, test, axes=1))
        out[name] = (macro_f1(test_labels, blend_test, k), note)
        bias = fit_bias(blend_val, val_labels)
        bias_gain = cross_fit(val_labels, k, baseline=blend_val, fit_and_apply=lambda f, a, b=
                              blend_val: b[a] + fit_bias(b[f], val_labels[f])).gain
        out[f"{name} + bias" if size > 1 else "+ bias"] = (
            macro_f1(test_labels, blend_test + bias, k), f"{bias_gain:+.3f}")
    return out, fitted


def with_tta(config: StudyConfig, trained: TrialModel) -> TrialModel:
    """The same weights behind the study's own lossless views (what ``tta = "flips"`` runs)."""
    ops = tta_ops("flips", config.augment.ops)
    return dataclasses.replace(trained, model=TTAModel(trained.model, ops))


def f1_on(trained: TrialModel, val: Split, test: Split) -> tuple[float, float]:
    """Validation and test macro F1 of one model."""
    k = len(trained.classes)
    return (macro_f1(val.labels, log(member_probabilities(trained, val)), k),
            macro_f1(test.labels, log(member_probabilities(trained, test)), k))


def latency_ms(onnx: Path, runs: int = 30) -> float:
    """onnxruntime's median time for one image (batch 1) on this CPU."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])
    feeds = {}  # synthetic inputs of the graph's shapes: the time does not depend on the pixels
    for arg in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in arg.shape]
        feeds[arg.name] = (np.zeros(shape, np.int64) if arg.type == "tensor(int64)"
                           else np.random.default_rng(0).random(shape, np.float32))
    session.run(None, feeds)  # the first run allocates
    times = []
    for _ in range(runs):
        tick = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - tick)
    return 1000 * float(np.median(times))


def graph_size_ms(model: Network | EnsembleModel, example: dict[str, torch.Tensor],
                  path: Path) -> str:
    """The ONNX graph as export writes it (weights inside): its MB and ms per image."""
    export_graph(model, example, path)
    return f"{path.stat().st_size / 1e6:.1f} / {latency_ms(path):.1f}"


def ensemble_graph(members: list[Member], weights: np.ndarray,
                   ) -> tuple[EnsembleModel, dict[str, torch.Tensor]]:
    """The graph ``search export --ensemble`` builds: members of weight 0 left out."""
    kept = [members[i].trained for i, w in enumerate(weights) if w > 0]
    model = EnsembleModel([t.model for t in kept], [t.preprocess["rgb"] for t in kept],
                          [float(w) for w in weights if w > 0])
    example: dict[str, torch.Tensor] = {}
    for member in kept:
        example.update(models.example_inputs(member.spec, batch_size=2))
    return model, {n: example[n] for n in model.input_names}


def main() -> None:
    args = parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    latency_seeds = {int(s) for s in args.latency_seeds.split(",") if s}
    lines: list[list[str]] = []
    gains: list[list[str]] = []
    per_row: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="fs-final-") as temp:
        workdir = args.workdir or Path(temp)
        for name in args.study.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                overrides: dict = {"study": {"seed": seed, "n_trials": args.n_trials}}
                if args.epochs:
                    overrides["train"] = {"epochs": args.epochs}
                config = study_config(name, workdir, f"{name}-{seed}", **overrides)
                tick = time.perf_counter()
                study = run_until(config, args.n_trials, args.min_complete,
                                  args.n_trials + args.max_extra)
                complete = complete_trials(study)
                finished = [t for t in study.get_trials(deepcopy=False)
                            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
                searched = (f"{name} seed {seed}: {len(finished)} trials "
                            f"({len(complete)} complete) in {wall_s(study):.0f} s")
                if args.search_only:
                    print(searched, flush=True)
                    continue
                decays = (args.ema_decay,) if args.no_off_retrain else (0.0, args.ema_decay)
                retrains = {decay: retrain(name, seed, workdir, complete[0], decay, args.epochs)
                            for decay in decays}
                searched += (f"; EMA retrains "
                             f"{sum(wall_s(s) for _, s in retrains.values()):.0f} s")
                trained = [load_trial_model(study, t, config.artifacts_dir)
                           for t in complete[:5]]
                val, test = raw_splits(config, trained)
                members = [Member(t, member_probabilities(t, val), member_probabilities(t, test))
                           for t in trained]
                result, weights = ensemble_scores(members, val.labels, test.labels)
                # TTA and EMA fit nothing: their validation difference is the estimate.
                plain_val = macro_f1(val.labels, log(members[0].val), len(trained[0].classes))
                tta_model = with_tta(config, trained[0])
                tta_val, tta_test = f1_on(tta_model, val, test)
                result["+ TTA"] = (tta_test, f"{tta_val - plain_val:+.3f}")
                retrained = {}
                for decay, (ema_config, ema_study) in retrains.items():
                    model = load_trial_model(ema_study, ema_study.best_trial,
                                             ema_config.artifacts_dir)
                    retrained[decay] = f1_on(model, val, test)
                if args.no_off_retrain:  # the best trial itself: the same seed and parameters
                    retrained[0.0] = (plain_val, result["single best"][0])
                (off_val, off_test), (on_val, on_test) = retrained[0.0], retrained[args.ema_decay]
                result["EMA off (retrained)"] = (off_test, "-")
                result["+ EMA (retrained)"] = (on_test, f"{on_val - off_val:+.3f}")
                for row, (f1, _) in result.items():
                    per_row.setdefault(name, {}).setdefault(row, []).append(f1)

                sizes = ["-"] * 4
                if seed in latency_seeds:  # each export takes minutes on a loaded CPU
                    folder = workdir / f"{name}-{seed}"
                    example = models.example_inputs(trained[0].spec, batch_size=2)
                    sizes = [graph_size_ms(trained[0].model, example, folder / "single.onnx"),
                             graph_size_ms(tta_model.model, example, folder / "tta.onnx")]
                    for size in (3, 5):
                        sizes.append(graph_size_ms(*ensemble_graph(members, weights[size]),
                                                   folder / f"ens{size}.onnx")
                                     if size in weights else "-")
                lines.append([name, str(seed), f"{len(finished)} ({len(complete)})",
                              *(f"{result[r][0]:.3f}" if r in result else "-" for r in ROWS),
                              *sizes])
                gains.append([name, str(seed), *(result[r][1] if r in result else "-"
                                                 for r in ROWS[1:])])
                # The retrain without EMA repeats the best trial when training is deterministic.
                print(f"{searched}; best val {complete[0].value:.3f}, retrained EMA off val "
                      f"{off_val:.3f}, on {on_val:.3f}; "
                      f"done in {time.perf_counter() - tick:.0f} s; "
                      + ", ".join(f"{r} {result[r][0]:.3f}" for r in ROWS if r in result),
                      flush=True)
    if args.search_only:
        return
    print("\ntest macro F1 (trials run (complete); ONNX graph MB / onnxruntime ms per image, "
          "batch 1):")
    print_table(["study", "seed", "trials", *ROWS, "single MB / ms", "TTA MB / ms",
                 "ens3 MB / ms", "ens5 MB / ms"], lines)
    print("\nvalidation estimate of each step: cross-fitted gain for bias and ensembles (what "
          "export decides on), plain val difference for TTA (vs single best) and EMA (vs "
          "EMA off):")
    print_table(["study", "seed", *ROWS[1:]], gains)
    print("\nmean test macro F1 over seeds:")
    print_table(["study", *ROWS], [[study, *(f"{mean(rows.get(r, [])):.3f}" for r in ROWS)]
                                  for study, rows in per_row.items()])


if __name__ == "__main__":
    main()
