"""``search status``: the study's summary at any time, from the storage alone."""

from __future__ import annotations

from pathlib import Path

import optuna
from rich.console import Console
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from search.config import StudyConfig
from search.errors import StorageError, UserError
from search.study.report import best_trials_table, failures, progress, timing_table
from search.study.storage import check_reachable, get_storage, normalize_url, redact


def open_study(config: StudyConfig, storage_url: str) -> optuna.Study:
    """Load an existing study read-only; a missing study is a clear error."""
    check_reachable(storage_url)
    storage = get_storage(storage_url)
    try:
        return optuna.load_study(study_name=config.name, storage=storage)
    except KeyError:
        raise UserError(f"study {config.name!r} not found in the storage; "
                        f"run `search run --study {config.source}` first") from None


def require_existing_storage(storage_url: str, config: StudyConfig) -> None:
    """Fail unless the storage can hold the study already, i.e. is not about to be created.

    SQLAlchemy creates a missing SQLite file on connect, which would show an empty dashboard
    (or a confusing "study not found") for a mistyped path; we refuse instead.

    Raises:
        StorageError: The SQLite file does not exist, or the URL is in-memory SQLite.
    """
    url = normalize_url(storage_url)
    if not url.startswith("sqlite"):
        return  # server databases: open_study checks they answer
    try:
        database = make_url(url).database
    except ArgumentError as error:
        raise StorageError(f"storage URL {redact(storage_url)} is invalid: {error}") from None
    if not database or database == ":memory:":
        raise StorageError(f"storage {storage_url} is an in-memory SQLite database; "
                           "it holds no study once `search run` has exited")
    if not Path(database).is_file():
        raise StorageError(f"no SQLite database at {database}: run `search run --study "
                           f"{config.source}` first, or pass --storage")


def open_existing_study(config: StudyConfig, storage_url: str) -> optuna.Study:
    """Load the study of ``config``; a missing database or study is a one-line error."""
    require_existing_storage(storage_url, config)
    return open_study(config, storage_url)


def show_status(config: StudyConfig, storage_url: str, *, timing: bool,
                console: Console) -> None:
    """Print the progress line, the best trials, failures and (optionally) timings."""
    study = open_existing_study(config, storage_url)
    n_trials = study.user_attrs.get("n_trials", config.study.n_trials)
    console.print(progress(study, n_trials).line())
    console.print(best_trials_table(study))
    for line in failures(study):
        console.print(line)
    if timing:
        console.print(timing_table(study))
