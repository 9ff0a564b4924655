"""``search slurm``: a Slurm job array whose tasks each run one ``search worker``.

Slurm places the tasks (one GPU each through ``--gres``, which sets ``CUDA_VISIBLE_DEVICES``);
the study in the database shares the budget among them, as among workers started by hand.
The script carries no storage URL: ``sbatch`` hands its caller's environment to the tasks
(``--export=ALL``), and ``--submit`` puts the URL there. ``--requeue`` lets Slurm bring a
preempted task back; ``--signal`` warns a task before its time limit so it stops its worker
(whose trial is retried from its last epoch) and requeues itself.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from search.config import StudyConfig
from search.errors import UserError
from search.launch import STORAGE_ENV, storage_environment
from search.study.storage import WORKER_WAIT_S, normalize_url, redact

# Seconds between Slurm's warning (USR1 to the batch script) and the time limit's kill:
# room for the worker to stop within a few seconds and save its trial, with margin for
# Slurm, which delivers the signal up to a minute late.
SIGNAL_LEAD_S = 120
_TIME = re.compile(r"^(?:(\d+)-)?(\d+):([0-5]\d):([0-5]\d)$")
_NAME = re.compile(r"^[\w.,-]+$")  # partition(s) and account: no spaces or shell syntax


@dataclass(frozen=True)
class SlurmOptions:
    """The job array's shape; everything else comes from the study file."""

    workers: int
    gpus_per_worker: int = 1
    partition: str | None = None
    time: str | None = None  # HH:MM:SS or D-HH:MM:SS
    account: str | None = None


def launch_slurm(config: StudyConfig, storage_url: str, options: SlurmOptions, *,
                 out: Path | None, submit: bool, console: Console) -> Path:
    """Write the job-array script (and submit it with ``sbatch`` when ``submit``).

    Raises:
        UserError: SQLite storage, a bad ``--time``/``--partition``/``--account``, or
            ``sbatch`` missing or refusing the job.
    """
    require_server_storage(storage_url)
    check_options(options)
    path = (out or config.run_dir / "slurm" / f"{config.name}.sbatch").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    (config.run_dir / "slurm").mkdir(parents=True, exist_ok=True)  # the tasks' logs
    path.write_text(render_script(config, options))
    console.print(f"wrote {path} ({options.workers} task(s), study {config.name!r})")
    if not submit:
        console.print(f"submit it with {STORAGE_ENV} set to the storage URL "
                      f"({redact(storage_url)}): sbatch {shlex.quote(str(path))}")
        return path
    job_id = submit_script(path, storage_url)
    console.print(f"submitted job array {job_id} (tasks {job_id}_0..{options.workers - 1}); "
                  f"logs in {(config.run_dir / 'slurm').resolve()}")
    return path


def require_server_storage(storage_url: str) -> None:
    """Refuse SQLite: tasks on many nodes would share one file over a network file system."""
    if normalize_url(storage_url).startswith("sqlite"):
        raise UserError(f"storage {storage_url} is SQLite, which corrupts when workers on "
                        "several nodes share it over a network file system; use a server "
                        f"database (--storage or {STORAGE_ENV}=postgresql://...)")


def check_options(options: SlurmOptions) -> None:
    """One line naming the bad option, before anything is written."""
    if options.time is not None:
        match = _TIME.match(options.time)
        if not match:
            raise UserError(f"--time {options.time!r}: expected HH:MM:SS or D-HH:MM:SS")
        days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
        if ((days * 24 + hours) * 60 + minutes) * 60 + seconds <= 2 * SIGNAL_LEAD_S:
            raise UserError(f"--time {options.time}: too short; tasks are warned "
                            f"{SIGNAL_LEAD_S} s before their time limit")
    for flag, value in (("--partition", options.partition), ("--account", options.account)):
        if value is not None and not _NAME.match(value):
            raise UserError(f"{flag} {value!r}: expected a Slurm name (letters, digits, . _ -)")


def render_script(config: StudyConfig, options: SlurmOptions, *,
                  python: str = sys.executable, workdir: Path | None = None) -> str:
    """The ``sbatch`` script: one ``search worker`` per array task, in ``workdir``.

    Paths are absolute (the study file, this Python, the logs), so the script runs the same
    wherever Slurm starts it, given a file system shared with this host.
    """
    workdir = (workdir or Path.cwd()).resolve()
    logs = (workdir / config.run_dir / "slurm").resolve()
    directives = [
        f"--job-name=search-{config.name}",
        f"--array=0-{options.workers - 1}",
        "--ntasks=1",
        *([f"--gres=gpu:{options.gpus_per_worker}"] if options.gpus_per_worker else []),
        *([f"--partition={options.partition}"] if options.partition else []),
        *([f"--account={options.account}"] if options.account else []),
        *([f"--time={options.time}"] if options.time else []),
        f"--chdir={workdir}",
        f"--output={logs}/%A_%a.out",
        "--open-mode=append",  # a requeued task adds to its log instead of replacing it
        "--requeue",
        f"--signal=B:USR1@{SIGNAL_LEAD_S}",
        "--export=ALL",
    ]
    # A task that starts (or is requeued) while the database restarts waits for it.
    worker = shlex.join([python, "-m", "search", "worker",
                         "--study", str(config.source.resolve()),
                         "--wait-for-storage", str(WORKER_WAIT_S)])
    return _SCRIPT.format(
        name=config.name, env=STORAGE_ENV, lead=SIGNAL_LEAD_S,
        directives="\n".join(f"#SBATCH {d}" for d in directives), worker=worker)


def submit_script(path: Path, storage_url: str) -> str:
    """``sbatch`` the script with the storage URL in its environment; returns the job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UserError("sbatch not found on PATH: submit from a Slurm login node, or drop "
                        "--submit and copy the script there")
    env = {**os.environ, **storage_environment(storage_url)}
    try:
        done = subprocess.run([sbatch, "--parsable", str(path)], env=env, capture_output=True,
                              text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise UserError("sbatch did not answer within 120 s (is slurmctld up?)") from None
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise UserError(f"sbatch refused {path}: {reason}")
    return done.stdout.strip().split(";")[0]  # "<id>[;<cluster>]"


_SCRIPT = """\
#!/bin/bash
# A Slurm job array of `search worker`s for study {name!r}, written by `search slurm`.
# Every task joins the study and runs trials until the shared budget is spent. The storage
# URL comes from the environment, never from this file:
#   {env}=postgresql://user:password@host/db sbatch THIS_FILE    (or `search slurm --submit`)
{directives}

: "${{{env}:?is not set: submit with {env}=<storage URL> sbatch <this script>}}"

# With --gres, Slurm sets CUDA_VISIBLE_DEVICES to this task's GPU and the worker uses it.
{worker} --worker-index "$SLURM_ARRAY_TASK_ID" &
worker=$!

# USR1 comes {lead} s before the time limit: stop the worker (its trial is retried from its
# last epoch) and requeue this task so that it comes back while the budget lasts. TERM
# (scancel, preemption) is passed on and the task ends; Slurm requeues a preempted task
# itself (--requeue), a cancelled one stays cancelled.
requeue=0
trap 'requeue=1; kill -TERM "$worker" 2>/dev/null' USR1
trap 'kill -TERM "$worker" 2>/dev/null' TERM

# `wait` returns early (status > 128) when a trapped signal arrives; wait for the worker.
while :; do
  wait "$worker"
  status=$?
  if [ "$status" -gt 128 ] && kill -0 "$worker" 2>/dev/null; then continue; fi
  break
done
if [ "$requeue" = 1 ]; then
  scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"
fi
exit "$status"
"""
