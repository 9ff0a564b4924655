"""``search status``: the study's summary at any time, from the storage alone."""

from __future__ import annotations

from rich.console import Console

from search.config import StudyConfig
from search.study.open import open_study
from search.study.report import best_trials_table, failures, progress, slurm_table, timing_table


def show_status(config: StudyConfig, storage_url: str, *, timing: bool,
                console: Console) -> None:
    """Print the progress line, the best trials, failures, Slurm tasks and (optionally) timings."""
    study = open_study(config, storage_url)
    n_trials = study.user_attrs.get("n_trials", config.study.n_trials)
    console.print(progress(study, n_trials).line())
    console.print(best_trials_table(study))
    for line in failures(study):
        console.print(line)
    slurm = slurm_table(study)
    if slurm is not None:
        console.print(slurm)
    if timing:
        console.print(timing_table(study))
