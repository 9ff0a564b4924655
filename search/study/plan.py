"""``search run --dry-run``: validate the study file and the data, print the plan, train nothing.

Everything here is what ``search run`` would do before it starts workers, reused rather
than repeated: the data goes through ``search data check`` (:func:`check_data`), the
workers through the runner's :func:`plan_workers`, the first trial's parameters through
the study's own sampler (on an in-memory study, so the storage gains nothing) and its
network through :func:`models.create_model`, as a trial would build it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from rich.console import Console
from sqlalchemy.engine import make_url

import models
from search import space
from search.config import StudyConfig
from search.data.check import check_data
from search.data.prepared import prepare_data
from search.errors import StorageError, UserError
from search.study.open import make_sampler, open_study
from search.study.runner import WorkerPlan, physical_gpu, plan_workers
from search.study.storage import check_reachable, normalize_url, redact
from search.trial.objective import check_pretrained, model_spec, pick_device, sample_params
from search.trial.train import TrialParams


@dataclass(frozen=True)
class Plan:
    """What ``search run`` would do; nothing of it has happened."""

    workers: list[WorkerPlan]
    devices: str
    n_trials: int
    timeout_s: float | None
    storage: str  # the URL without its password
    trials_stored: int | None  # None: the study is not in the storage yet
    sampled: dict[str, str]  # [space] key -> what a trial draws (or the fixed value)
    first_trial: dict[str, Any]
    first_trial_params: int  # parameters of the network the first trial builds


def dry_run(config: StudyConfig, *, storage_url: str, n_trials: int | None = None,
            workers: int | None = None, console: Console) -> Plan:
    """Check everything ``search run`` checks before it starts, and print what it would do.

    Raises:
        UserError: The data set is invalid, the storage is unreachable, or the device
            asked for is not there (the same one-line errors as ``search run``).
    """
    device = pick_device(config.train.device)
    check_pretrained(config)  # as `search run` does: weights that cannot be had stop it here
    stored = stored_trials(config, storage_url)  # cheap, so before the data is decoded
    check_data(config.data, resolution=config.train.resolution, seed=config.study.seed,
               console=console)
    plans = plan_workers(config, workers)
    n_trials = n_trials or config.study.n_trials
    first = first_trial(config)
    network = models.create_model(model_spec(first, prepare_data(config)))
    plan = Plan(
        workers=plans,
        devices=_devices(plans, device),
        n_trials=n_trials,
        timeout_s=config.study.timeout_s,
        storage=redact(storage_url),
        trials_stored=stored,
        sampled=describe_space(config),
        first_trial=vars(first),
        first_trial_params=sum(p.numel() for p in network.parameters()),
    )
    _print(plan, config, console)
    return plan


def first_trial(config: StudyConfig) -> TrialParams:
    """The parameters of the study's first trial: its first start point, the rest drawn by
    worker 0's sampler, asked of a throw-away in-memory study."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created" line here
    try:
        study = optuna.create_study(direction="maximize", sampler=make_sampler(config, 0))
    finally:
        optuna.logging.set_verbosity(verbosity)
    points = config.start_points()
    if points:
        study.enqueue_trial(points[0])
    return sample_params(study.ask(), config)  # as the objective draws them


def describe_space(config: StudyConfig) -> dict[str, str]:
    """Each ``[space]`` key and what a trial draws for it, in the order Optuna is asked."""
    second = config.data.second_modality
    fusions = config.space.fusion.values()
    described = {}
    for hp in space.HYPERPARAMETERS:
        param = config.space.get(hp.name)
        if param is None:
            text = f"{hp.fallback(config) if hp.fallback else hp.default} (fixed)"
        elif isinstance(param, space.Range):
            kind = "int" if param.is_integer else "float"
            text = (f"{kind} in [{param.low}, {param.high}]" + (", log" if param.log else "")
                    + (f", step {param.step}" if param.step else ""))
        elif len(param.choices) == 1:
            text = f"{param.choices[0]} (fixed)"
        else:
            text = "one of " + ", ".join(map(str, param.choices))
        if hp.when is not None:
            drawn_for = [f for f in fusions if hp.when({"fusion": f}, second)]
            if not drawn_for:
                text = f"{hp.default} (not drawn: no fusion of [space] uses it)"
            else:
                text += f" (only with fusion {', '.join(drawn_for)})"
        described[hp.name] = text
    return described


def stored_trials(config: StudyConfig, storage_url: str) -> int | None:
    """Trials the study already holds, or None if it is not in the storage; creates nothing.

    Raises:
        StorageError: A server database does not answer.
    """
    check_reachable(storage_url)
    url = normalize_url(storage_url)
    if url.startswith("sqlite") and not _sqlite_file_exists(url):
        return None  # `search run` would create the file
    try:
        study = open_study(config, storage_url, mode="read")
    except StorageError:  # a broken database is an error, not a missing study
        raise
    except UserError:  # the storage is there, the study is not
        return None
    return len(study.get_trials(deepcopy=False))


def _sqlite_file_exists(url: str) -> bool:
    database = make_url(url).database
    if not database or database == ":memory:":
        return False
    return Path(database).is_file()


def _devices(plans: list[WorkerPlan], device: torch.device) -> str:
    if plans[0].gpu is None:
        return f"CPU, {plans[0].threads} thread(s) per worker"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = [p.gpu for p in plans if p.gpu is not None]  # all of them: the first has one
    names = {torch.cuda.get_device_name(gpu) for gpu in gpus}
    return (f"GPU {','.join(physical_gpu(gpu, visible) for gpu in gpus)} "
            f"({', '.join(sorted(names))})")


def _print(plan: Plan, config: StudyConfig, console: Console) -> None:
    def out(line: str) -> None:
        console.print(line, markup=False, highlight=False, soft_wrap=True)

    out(f"plan for study {config.name!r} ({config.source}); dry run: nothing is "
        "trained and no study is stored")
    out(f"  workers: {len(plan.workers)} on {plan.devices}")
    budget = f"  budget: {plan.n_trials} trials (complete + pruned)"
    if plan.timeout_s:
        budget += f", no new trial after {plan.timeout_s:g} s"
    out(budget + f"; up to {config.train.epochs} epochs each, {config.pruner.kind} pruner, "
        f"{config.sampler.kind} sampler")
    held = ("new study" if plan.trials_stored is None
            else f"continues a study holding {plan.trials_stored} trial(s)")
    out(f"  storage: {plan.storage} ({held})")
    out("  each trial samples:")
    width = max(map(len, plan.sampled))
    for key, text in plan.sampled.items():
        out(f"    {key.ljust(width)}  {text}")
    params = ", ".join(f"{k}={_short(v)}" for k, v in plan.first_trial.items())
    out(f"  first trial: {params}")
    out(f"  first trial's model: {plan.first_trial_params:,} parameters "
        f"({plan.first_trial_params * 4 / 2**20:.1f} MB in fp32) at "
        f"{config.train.resolution} px")


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
