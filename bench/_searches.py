"""Run whole searches inside one process and measure them: shared by the search benchmarks.

Each search gets its own SQLite study, artifact folder and (cold) cache under a work
folder, so runs neither share cached arrays nor see each other's trials.
"""

from __future__ import annotations

import argparse
import time
import tomllib
import warnings
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from bench._plain import load_plain_data
from search.bundle.export import load_test_split, load_trial_model
from search.config import StudyConfig, parse_study, resolve_study_path
from search.data.prepared import prepare_data
from search.study.worker import WorkerOptions, run_worker
from search.trial.artifacts import create_artifact_store
from search.trial.objective import Objective, pick_device, pick_speedups
from search.trial.train import evaluate

# As `search` itself does (search/cli.py): Optuna flags the heartbeat API as experimental.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


@dataclass
class SearchRun:
    """One finished search: its study and when it started and ended."""

    label: str
    config: StudyConfig
    study: optuna.Study
    started: datetime
    wall_s: float

    @cached_property
    def finished(self) -> list[FrozenTrial]:
        """COMPLETE and PRUNED trials, in the order they finished (read once: the run is over)."""
        trials = [t for t in self.study.get_trials(deepcopy=False)
                  if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        return sorted(trials, key=lambda t: t.datetime_complete)

    @property
    def best_value(self) -> float:
        complete = [t.value for t in self.finished if t.state == TrialState.COMPLETE]
        return max(complete, default=float("nan"))

    @property
    def best_peak(self) -> float:
        """The best single epoch's val F1 of any COMPLETE trial: the one statistic every
        search reports alike (ours values a trial by a trailing mean, the plain search by
        its best epoch, so their values are not comparable)."""
        return max((peak(t) for t in self.finished if t.state == TrialState.COMPLETE),
                   default=float("nan"))

    @property
    def epochs(self) -> int:
        """Training epochs run by all trials (each reported one validation score)."""
        return sum(len(t.intermediate_values) for t in self.finished)

    def reached(self, target: float) -> tuple[float, int] | None:
        """Seconds and epochs until a COMPLETE trial first had an epoch at ``target`` val F1
        or better (counted when that trial ends)."""
        epochs = 0
        for trial in self.finished:
            epochs += len(trial.intermediate_values)
            if trial.state == TrialState.COMPLETE and peak(trial) >= target:
                return (trial.datetime_complete - self.started).total_seconds(), epochs
        return None

    def test_scores(self) -> tuple[float, dict[str, float]]:
        """Macro F1 and per-class F1 of the best trial's checkpoint on the test split."""
        trained = load_trial_model(self.study, self.study.best_trial, self.config.artifacts_dir)
        split = load_test_split(self.config, trained)
        device = torch.device("cpu")
        scores = evaluate(trained.model, split, device=device,
                          speed=pick_speedups(self.config, device),
                          num_classes=len(trained.classes))
        return scores.macro_f1, dict(zip(trained.classes, scores.per_class_f1, strict=True))


def peak(trial: FrozenTrial) -> float:
    """A trial's best epoch val F1."""
    return max(trial.intermediate_values.values(), default=float("nan"))


def study_config(study_file: str, workdir: Path, label: str, /, **overrides: Any) -> StudyConfig:
    """The study file with its storage, artifacts and cache moved under ``workdir/label``.

    ``overrides`` are ``section={key: value}`` tables merged into the file's, e.g.
    ``study={"seed": 1}``. The data root stays where the file says (made absolute), so
    the demo set is generated once and shared.
    """
    path = resolve_study_path(study_file)
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    folder = (workdir / label).resolve()
    raw["study"].update(storage=f"sqlite:///{folder / 'study.db'}",
                        artifacts_dir=str(folder / "artifacts"))
    raw["data"].update(root=str(Path(raw["data"]["root"]).resolve()),
                       cache_dir=str(folder / "cache"))
    raw["study"].setdefault("name", path.stem)
    return parse_study(raw, path)


def run_default(label: str, config: StudyConfig) -> SearchRun:
    """Our search as ``search worker`` runs it: cached data, the study's pruner, early stopping."""
    storage_url = config.storage_url()
    started = datetime.now()
    tick = time.perf_counter()
    run_worker(config, WorkerOptions(storage_url=storage_url, n_trials=config.study.n_trials))
    study = optuna.load_study(study_name=config.name, storage=storage_url)
    return SearchRun(label, config, study, started, time.perf_counter() - tick)


def run_plain(label: str, config: StudyConfig, *, cached: bool = False) -> SearchRun:
    """The plain approach: Optuna's default TPE, full-length training, no pruning.

    By default its files are decoded every epoch and augmented on the fly (see
    :mod:`bench._plain`), as a hand-written script does; ``cached=True`` gives it our data
    path instead (decoded-image and balanced-set caches, per-batch flips), so that a
    comparison with it measures the search alone.
    """
    storage_url = config.storage_url()
    Path(storage_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    started = datetime.now()
    tick = time.perf_counter()
    data = prepare_data(config) if cached else load_plain_data(config)
    # A hand-written script's sampler: Optuna's TPE with its defaults, seeded like ours.
    study = optuna.create_study(study_name=config.name, storage=storage_url,
                                direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=config.study.seed),
                                pruner=optuna.pruners.NopPruner())
    objective = Objective(data, artifact_store=create_artifact_store(config.artifacts_dir),
                          device=pick_device(config.train.device))
    study.optimize(objective, n_trials=config.study.n_trials, catch=(Exception,))
    return SearchRun(label, config, study, started, time.perf_counter() - tick)


def plain_overrides(epochs: int) -> dict[str, dict[str, Any]]:
    """What turns a study into the plain approach: no pruner, no early stopping, and each
    trial valued at (and kept at) its best epoch, as a hand-written script does."""
    return {"pruner": {"kind": "none"},
            "train": {"epochs": epochs, "patience": epochs, "value": "max"}}


def mean(values: list[float]) -> float:
    finite = [v for v in values if v == v]
    return float(np.mean(finite)) if finite else float("nan")


def search_parser(description: str, *, seeds: str, trials_help: str) -> argparse.ArgumentParser:
    """The options every search benchmark takes: study, seeds, budget, epochs, work folder."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--study", default="apples", help="study name or path (default apples)")
    parser.add_argument("--seeds", default=seeds, help="comma-separated seeds")
    parser.add_argument("--n-trials", type=int, help=f"{trials_help} (default: the study's)")
    parser.add_argument("--epochs", type=int, help="epochs per trial (default: the study's)")
    parser.add_argument("--workdir", type=Path, help="keep studies here (default: a temp dir)")
    return parser


def print_table(header: list[str], lines: list[list[str]]) -> None:
    """Print a Markdown table with aligned columns."""
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    print()
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in lines:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |",
              flush=True)
