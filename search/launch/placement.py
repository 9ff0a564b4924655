"""Where a trial ran on a cluster: the scheduler's job and task ids, kept on the trial.

The worker records them as trial user attributes when it starts a trial; ``search status``
groups trials by them. Reads the environment only (no Optuna), so both sides import it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# Environment variable set by Slurm in every task -> trial user attribute.
SLURM_VARIABLES = {
    "SLURM_ARRAY_JOB_ID": "slurm_array_job_id",
    "SLURM_ARRAY_TASK_ID": "slurm_array_task_id",
    "SLURM_JOB_ID": "slurm_job_id",
}


def slurm_attrs(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The Slurm ids of this process's job, as trial user attributes (empty outside Slurm)."""
    environ = os.environ if environ is None else environ
    return {attr: environ[name] for name, attr in SLURM_VARIABLES.items() if name in environ}


def slurm_task(attrs: Mapping[str, object]) -> str | None:
    """``<array job>_<task>`` (Slurm's own spelling), else the job id; None outside Slurm."""
    if "slurm_array_task_id" in attrs:
        return f"{attrs.get('slurm_array_job_id')}_{attrs['slurm_array_task_id']}"
    job = attrs.get("slurm_job_id")
    return None if job is None else str(job)
