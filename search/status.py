"""``search status``: the study's summary at any time, from the storage alone."""

from __future__ import annotations

import optuna
from rich.console import Console

from search.config import StudyConfig
from search.errors import UserError
from search.report import best_trials_table, failures, progress, timing_table
from search.storage import check_reachable, get_storage


def open_study(config: StudyConfig, storage_url: str) -> optuna.Study:
    """Load an existing study read-only; a missing study is a clear error."""
    check_reachable(storage_url)
    storage = get_storage(storage_url)
    try:
        return optuna.load_study(study_name=config.name, storage=storage)
    except KeyError:
        raise UserError(f"study {config.name!r} not found in the storage; "
                        f"run `search run --study {config.source}` first") from None


def show_status(config: StudyConfig, storage_url: str, *, timing: bool,
                console: Console) -> None:
    """Print the progress line, the best trials, failures and (optionally) timings."""
    study = open_study(config, storage_url)
    n_trials = study.user_attrs.get("n_trials", config.study.n_trials)
    console.print(progress(study, n_trials).line())
    console.print(best_trials_table(study))
    for line in failures(study):
        console.print(line)
    if timing:
        console.print(timing_table(study))
