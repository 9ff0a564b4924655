"""Cluster launchers: ``search slurm`` (a job array) and ``search k8s`` (an Indexed Job).

Both start plain ``search worker`` processes; the study in the database stays the only
coordination. The storage URL reaches every worker through the environment variable that
:func:`storage_environment` names, never through a script's or a manifest's text.
"""

from __future__ import annotations

# The variable `search worker` reads its storage URL from (see StudyConfig.storage_url).
STORAGE_ENV = "SEARCH_STORAGE"


def storage_environment(storage_url: str) -> dict[str, str]:
    """The environment that hands ``storage_url`` to a worker."""
    return {STORAGE_ENV: storage_url}
