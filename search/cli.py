"""The ``search`` command. Thin: parse options, call one function, turn errors into exit codes."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from search.errors import Preempted, UserError

# Optuna flags heartbeats and TPE's group mode as experimental; we rely on them on purpose.
warnings.filterwarnings("ignore", message=".*(experimental|ExperimentalWarning).*")
warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Hyperparameter search for multi-modal EfficientNet classifiers.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect the study's data set.")
app.add_typer(data_app, name="data")

console = Console()
error_console = Console(stderr=True)

StudyOption = Annotated[str, typer.Option(
    "--study", "-s", help="Study name (studies/NAME.toml) or path to a study TOML file.")]
StorageOption = Annotated[str | None, typer.Option(
    "--storage", help="Storage URL; overrides SEARCH_STORAGE and the study file.")]
TrialsOption = Annotated[int | None, typer.Option(
    min=1, help="Trial budget, complete + pruned (default: the study file's n_trials).")]
WorkerTrialsOption = Annotated[int | None, typer.Option(
    "--n-trials", min=1, help="Trial budget, complete + pruned (default: the budget the "
    "study holds, else the study file's n_trials).")]
WorkersOption = Annotated[int | None, typer.Option(
    min=1, help="Worker processes (default: one per GPU, else the study file's workers).")]


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Report a :class:`UserError` as one line with its exit code; Ctrl-C exits 130."""
    try:
        yield
    except UserError as error:
        error_console.print(f"error: {error}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(error.exit_code) from None
    except Preempted as error:
        error_console.print(f"preempted: {error}")
        raise typer.Exit(Preempted.exit_code) from None
    except KeyboardInterrupt:
        error_console.print("interrupted")
        raise typer.Exit(130) from None


@app.command()
def run(
    study: StudyOption = "apples",
    storage: StorageOption = None,
    n_trials: TrialsOption = None,
    workers: WorkersOption = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Validate the study file and the data, print the plan, train "
        "nothing and store nothing.")] = False,
) -> None:
    """Search: create or continue the study and run workers until the budget is spent."""
    with user_errors():
        from search.config import read_study_file

        config = read_study_file(study)
        if dry_run:
            from search.study.plan import dry_run as plan_run

            plan_run(config, storage_url=config.storage_url(storage), n_trials=n_trials,
                     workers=workers, console=console)
            return
        from search.study.runner import run_study

        run_study(config, storage_url=config.storage_url(storage), n_trials=n_trials,
                  workers=workers, console=console)


@app.command()
def init(
    data: Annotated[Path, typer.Option(
        "--data", "-d", help="Data set folder (folders or csv layout), or its train.csv.")],
    name: Annotated[str | None, typer.Option(
        help="Study name: writes studies/NAME.toml (default: the data folder's name).")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Overwrite an existing study file.")] = False,
) -> None:
    """Write a study file that fits a data set and this machine, each setting commented."""
    with user_errors():
        from search.data.init import init_study

        init_study(data, name=name, force=force, console=console)


@app.command()
def worker(
    study: StudyOption,
    storage: StorageOption = None,
    n_trials: WorkerTrialsOption = None,
    worker_index: Annotated[int, typer.Option(min=0, help="Seeds this worker's sampler.")] = 0,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for PyTorch.")] = None,
    wait_for_storage: Annotated[float, typer.Option(
        min=0, help="Seconds to wait for a database that refuses connections at start "
                    "(search run and the launchers set it; 0: fail at once).")] = 0.0,
) -> None:
    """Join a study (e.g. on another machine) and run trials until the shared budget is spent."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with user_errors():
        from search.config import read_study_file
        from search.study.worker import WorkerOptions, run_worker

        config = read_study_file(study)
        options = WorkerOptions(
            storage_url=config.storage_url(storage),
            n_trials=n_trials, worker_index=worker_index,
            threads=threads, timeout_s=config.study.timeout_s,
            wait_for_storage_s=wait_for_storage)
        ran = run_worker(config, options)
        console.print(f"worker done: ran {ran} trial(s) of study {config.name!r}")


@app.command()
def status(
    study: StudyOption = "apples",
    storage: StorageOption = None,
    timing: Annotated[bool, typer.Option(help="Show where each trial's time went.")] = False,
) -> None:
    """Show trials and the best so far, from the storage alone."""
    with user_errors():
        from search.config import read_study_file
        from search.study.status import show_status

        config = read_study_file(study)
        show_status(config, config.storage_url(storage), timing=timing, console=console)


@data_app.command("check")
def data_check(study: StudyOption = "apples") -> None:
    """Validate the data set and print per-split, per-class counts."""
    with user_errors():
        from search.config import read_study_file
        from search.data.check import check_data

        config = read_study_file(study)
        check_data(config.data, resolution=config.train.resolution, seed=config.study.seed,
                   console=console, resize=config.train.resize)


@app.command()
def dashboard(
    study: StudyOption = "apples",
    storage: StorageOption = None,
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0: all).")] = "localhost",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8080,
) -> None:
    """Serve optuna-dashboard on the study's storage, with the trials' artifacts."""
    with user_errors():
        from search.config import read_study_file
        from search.study.dashboard import run_dashboard

        config = read_study_file(study)
        run_dashboard(config, config.storage_url(storage), host=host, port=port, console=console)


@app.command()
def export(
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle folder to write.")],
    study: StudyOption = "apples",
    trial: Annotated[int | None, typer.Option(
        min=0, help="Trial number to export (default: the best trial).")] = None,
    storage: StorageOption = None,
    ensemble: Annotated[int, typer.Option(
        min=1, help="Export the K best trials as one averaged model (weights fitted on val).")] = 1,
    diverse: Annotated[bool, typer.Option(
        help="Ensemble members differ in backbone or fusion.")] = False,
    bias: Annotated[bool, typer.Option(
        help="Add a per-class decision bias fitted on val for macro F1.")] = False,
) -> None:
    """Export a trial (the best by default) as a bundle: model.onnx, weights, model.json."""
    with user_errors():
        from search.config import read_study_file

        config = read_study_file(study)
        if ensemble > 1 or bias:
            if trial is not None:
                raise UserError("--trial exports one trial as it is; it does not combine with "
                                "--ensemble or --bias")
            from search.bundle.ensemble import export_ensemble

            export_ensemble(config, config.storage_url(storage), out, size=ensemble,
                            diverse=diverse, bias=bias, console=console)
            return
        from search.bundle.export import export_trial

        export_trial(config, config.storage_url(storage), out, trial_number=trial,
                     console=console)


@app.command()
def predict(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder written by `search export`.")],
    inputs: Annotated[list[Path], typer.Argument(
        help="Images, data-set folders (<folder>/rgb/<class>/...) or CSV files.")],
    depth: Annotated[list[Path] | None, typer.Option(
        help="Depth image, once per input image, in order.")] = None,
    numeric: Annotated[list[str] | None, typer.Option(
        help='Numeric features "1.5,2,0", once per input image.')] = None,
    numeric_json: Annotated[list[str] | None, typer.Option(
        help='Numeric features as JSON, [1.5, 2] or {"name": 1.5}, once per input image.')] = None,
    text: Annotated[list[str] | None, typer.Option(help="Text, once per input image.")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the predictions to this CSV.")] = None,
) -> None:
    """Predict with an exported bundle alone (onnxruntime; no study, storage or PyTorch)."""
    with user_errors():
        from search.bundle.predict import ExtraInputs, run_predict

        extra = ExtraInputs(depth=depth or [], numeric=numeric or [],
                            numeric_json=numeric_json or [], text=text or [])
        run_predict(bundle, inputs, extra=extra, out=out, console=console)


@app.command()
def slurm(
    study: StudyOption,
    workers: Annotated[int, typer.Option(min=1, help="Array tasks, one worker each.")],
    gpus_per_worker: Annotated[int, typer.Option(
        min=0, max=1, help="GPUs per task (a worker trains on one; 0 for CPU clusters).")] = 1,
    partition: Annotated[str | None, typer.Option(help="Slurm partition.")] = None,
    time: Annotated[str | None, typer.Option(
        help="Time limit per task, HH:MM:SS or D-HH:MM:SS (tasks requeue themselves).")] = None,
    account: Annotated[str | None, typer.Option(help="Slurm account to charge.")] = None,
    storage: StorageOption = None,
    out: Annotated[Path | None, typer.Option(
        help="Script to write (default: runs/<study>/slurm/<study>.sbatch).")] = None,
    submit: Annotated[bool, typer.Option(
        help="Submit it with sbatch, the storage URL in the tasks' environment.")] = False,
) -> None:
    """Write (and --submit) a Slurm job array whose tasks each run one `search worker`."""
    with user_errors():
        from search.config import read_study_file
        from search.launch.slurm import SlurmOptions, launch_slurm

        config = read_study_file(study)
        options = SlurmOptions(workers=workers, gpus_per_worker=gpus_per_worker,
                               partition=partition, time=time, account=account)
        launch_slurm(config, config.storage_url(storage), options, out=out, submit=submit,
                     console=console)


@app.command()
def k8s(
    study: StudyOption,
    workers: Annotated[int, typer.Option(min=1, help="Worker pods (the Job's parallelism).")],
    image: Annotated[str, typer.Option(help="The project's image (see Dockerfile).")],
    gpus_per_worker: Annotated[int, typer.Option(
        min=0, max=1, help="GPUs per worker pod (0 for CPU nodes).")] = 1,
    with_postgres: Annotated[bool, typer.Option(
        help="Also a PostgreSQL StatefulSet and its Service.")] = False,
    with_dashboard: Annotated[bool, typer.Option(
        help="Also optuna-dashboard: a Deployment on a ClusterIP Service.")] = False,
    out: Annotated[Path | None, typer.Option(help="Write the YAML here (default: stdout).")] = None,
) -> None:
    """Print Kubernetes manifests: an Indexed Job of workers (+ database, dashboard)."""
    with user_errors():
        from search.config import read_study_file
        from search.launch.k8s import K8sOptions, render_manifests

        config = read_study_file(study)
        options = K8sOptions(study=study, workers=workers, image=image,
                             gpus_per_worker=gpus_per_worker, with_postgres=with_postgres,
                             with_dashboard=with_dashboard)
        text = render_manifests(config, options)
        if out is None:
            sys.stdout.write(text)
        else:
            out.write_text(text)
            error_console.print(f"wrote {out}")


@app.command()
def proxy(
    storage: Annotated[str | None, typer.Option(
        "--storage", help="The database to serve (default: SEARCH_STORAGE).")] = None,
    host: Annotated[str, typer.Option(
        help="Interface to listen on (0.0.0.0: all; the proxy has no authentication).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 13000,
) -> None:
    """Serve the storage to workers (--storage grpc://HOST:PORT) through Optuna's gRPC proxy."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with user_errors():
        from search.launch import STORAGE_ENV
        from search.study.proxy import serve

        url = storage or os.environ.get(STORAGE_ENV)
        if not url:
            raise UserError(f"search proxy: no storage to serve; pass --storage or set "
                            f"{STORAGE_ENV}")
        serve(url, host=host, port=port)


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name=Path(sys.argv[0]).name)
