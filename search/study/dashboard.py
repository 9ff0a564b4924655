"""``search dashboard``: optuna-dashboard on the study's storage, with the trials' artifacts.

optuna-dashboard runs as it ships (``optuna_dashboard.run_server``); this module only makes
sure it is pointed at a study that exists, and at the artifact store the workers wrote the
confusion matrices and checkpoints into, so they show in each trial's artifact view.

The study is opened with :func:`search.study.open.open_study`, which never creates an
empty one by accident.
"""

from __future__ import annotations

import socket

from rich.console import Console

from search.config import StudyConfig
from search.errors import UserError
from search.study.open import open_study, study_artifacts_dir
from search.study.storage import redact


def check_port_free(host: str, port: int) -> None:
    """Bind once so that a busy port or an unknown host is an error before anything prints."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise UserError(f"cannot listen on {host}:{port}: {reason}") from None


def run_dashboard(config: StudyConfig, storage_url: str, *, host: str, port: int,
                  console: Console) -> None:
    """Serve optuna-dashboard for the study until interrupted.

    Args:
        config: The study file; names the study and the artifact store.
        storage_url: The study's storage (``--storage``, ``SEARCH_STORAGE`` or the file's).
        host: Interface to listen on (``localhost``; ``0.0.0.0`` for every interface).
        port: TCP port.
        console: Where the URL is printed.

    Raises:
        StorageError: The storage is missing or unreachable.
        UserError: The study does not exist, or the port cannot be used.
    """
    from optuna.artifacts import FileSystemArtifactStore
    from optuna_dashboard import run_server

    study = open_study(config, storage_url)
    artifacts = study_artifacts_dir(config, study)
    check_port_free(host, port)
    study_id = study._storage.get_study_id_from_name(study.study_name)
    console.print(f"dashboard for study {study.study_name!r} ({len(study.trials)} trials, "
                  f"storage {redact(storage_url)})")
    if not artifacts.is_dir():
        console.print(f"note: artifact folder {artifacts} does not exist; "
                      "trial artifacts will not show")
    else:
        console.print(f"artifacts: {artifacts}")
    console.print(f"open http://{host}:{port}/dashboard/studies/{study_id}  (Ctrl-C to stop)",
                  markup=False, highlight=False, soft_wrap=True)
    try:
        run_server(study._storage, host=host, port=port,
                   artifact_store=FileSystemArtifactStore(str(artifacts)))
    except OSError as error:  # e.g. the port was taken between the check and the bind
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
