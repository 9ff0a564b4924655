"""What a person reads about a study: progress line, best trials, where the time went.

Everything here is computed from the storage alone, so ``search status`` shows the same
as the live view of ``search run``.
"""

from __future__ import annotations

import re
import statistics
import time
from collections import Counter
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.table import Table

from search.launch.placement import slurm_task
from search.study.requeue import reason as requeue_reason
from search.study.requeue import requeued_numbers

TIMING_KEYS = ("prepare_s", "data_s", "train_s", "val_s", "storage_s", "artifacts_s")


@dataclass(frozen=True)
class Progress:
    """Counts, best value and ETA of a study against its budget."""

    n_trials: int
    counts: dict[TrialState, int]
    best: FrozenTrial | None
    elapsed_s: float
    eta_s: float | None
    requeued: int = 0  # FAIL trials that were interrupted and came back as a resuming copy

    @property
    def done(self) -> int:
        return self.counts.get(TrialState.COMPLETE, 0) + self.counts.get(TrialState.PRUNED, 0)

    def line(self) -> str:
        """One line: ``7/20 done (5 complete, 2 pruned, 0 failed, 2 running) | best ...``."""
        c = self.counts
        failed = c.get(TrialState.FAIL, 0) - self.requeued
        text = (f"{self.done}/{self.n_trials} done ({c.get(TrialState.COMPLETE, 0)} complete, "
                f"{c.get(TrialState.PRUNED, 0)} pruned, {failed} failed, "
                + (f"{self.requeued} requeued, " if self.requeued else "")
                + f"{c.get(TrialState.RUNNING, 0)} running)")
        if self.best is not None:
            text += f" | best val macro F1 {self.best.value:.4f} (trial {self.best.number}: "
            text += ", ".join(f"{k}={_short(v)}" for k, v in self.best.params.items()) + ")"
        text += f" | elapsed {_duration(self.elapsed_s)}"
        if self.eta_s is not None and self.done < self.n_trials:
            text += f" | ETA {_duration(self.eta_s)}"
        return text


def progress(study: optuna.Study, n_trials: int, *, started: float | None = None,
             workers: int = 1) -> Progress:
    """Measure the study; ETA = mean finished-trial time x remaining trials / workers."""
    trials = study.get_trials(deepcopy=False)
    counts = dict(Counter(t.state for t in trials))
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    best = max((t for t in trials if t.state == TrialState.COMPLETE),
               key=_value, default=None)
    durations = [t.duration.total_seconds() for t in finished if t.duration is not None]
    remaining = max(0, n_trials - len(finished))
    eta = statistics.mean(durations) * remaining / max(1, workers) if durations else None
    elapsed = time.time() - started if started else _study_span(trials)
    requeued = len(requeued_numbers(trials))
    return Progress(n_trials, counts, best, elapsed, eta, requeued)


def _value(trial: FrozenTrial) -> float:
    assert trial.value is not None  # a COMPLETE trial of a single-objective study has one
    return trial.value


def best_trials_table(study: optuna.Study, *, top: int = 5) -> Table:
    """The best complete trials with their parameters and key attributes."""
    complete = sorted((t for t in study.get_trials(deepcopy=False)
                       if t.state == TrialState.COMPLETE), key=lambda t: -_value(t))[:top]
    table = Table(title=f"best trials of {study.study_name!r}")
    for column in ("trial", "val macro F1", "accuracy", "params", "epochs", "img/s", "time"):
        table.add_column(column)
    for trial in complete:
        attrs = trial.user_attrs
        table.add_row(
            str(trial.number), f"{trial.value:.4f}", _fmt(attrs.get("accuracy")),
            ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items()),
            str(attrs.get("epochs_run", "")), str(attrs.get("images_per_s", "")),
            _duration(trial.duration.total_seconds()) if trial.duration else "")
    return table


def timing_table(study: optuna.Study) -> Table:
    """Where each finished trial's time went (seconds), and the share of the total."""
    table = Table(title="time per trial (s)")
    for column in ("trial", "state", *TIMING_KEYS, "total_s"):
        table.add_column(column, justify="right")
    sums: Counter[str] = Counter()
    for trial in study.get_trials(deepcopy=False):
        timing = trial.user_attrs.get("timing")
        if not timing:
            continue
        sums.update({k: timing.get(k, 0.0) for k in (*TIMING_KEYS, "total_s")})
        table.add_row(str(trial.number), trial.state.name,
                      *(f"{timing.get(k, 0.0):.1f}" for k in (*TIMING_KEYS, "total_s")))
    total = sums.get("total_s", 0.0)
    if total:
        table.add_row("share", "", *(f"{100 * sums[k] / total:.1f}%" for k in TIMING_KEYS), "100%")
    return table


def failures(study: optuna.Study) -> list[str]:
    """One line per failed trial with its reason; requeued trials are listed apart."""
    trials = study.get_trials(deepcopy=False)
    requeued = requeued_numbers(trials)
    lines = []
    for trial in trials:
        if trial.state != TrialState.FAIL:
            continue
        if trial.number in requeued:
            lines.append(f"trial {trial.number} requeued ({requeue_reason(trial)}); "
                         "its copy resumed from the last finished epoch")
            continue
        reason = trial.user_attrs.get("fail_reason") or "interrupted (Ctrl-C) or worker died"
        lines.append(f"trial {trial.number} failed: {reason.strip().splitlines()[-1]}")
    return lines


def slurm_table(study: optuna.Study) -> Table | None:
    """Which Slurm job array task ran each started trial; None if no trial ran under Slurm."""
    by_task: dict[str, list[str]] = {}
    for trial in study.get_trials(deepcopy=False):
        task = slurm_task(trial.user_attrs)
        if task is None or trial.state == TrialState.WAITING:
            continue  # a waiting retry still carries the ids copied from the task that died
        by_task.setdefault(task, []).append(f"{trial.number} ({trial.state.name.lower()})")
    if not by_task:
        return None
    table = Table(title="trials by Slurm task (array job_task)")
    table.add_column("task")
    table.add_column("trials")
    for task, trials in sorted(by_task.items(), key=lambda item: _natural(item[0])):
        table.add_row(task, ", ".join(trials))
    return table


def _natural(text: str) -> list:
    """Sort key that puts task 41_2 before 41_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _study_span(trials: list[FrozenTrial]) -> float:
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    return (max(ends) - min(starts)).total_seconds() if starts and ends else 0.0


def _short(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ""


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
