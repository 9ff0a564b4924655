"""The trial objective: sample parameters, build the model, train it, record what happened."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
import torch
from optuna_dashboard import save_note

import models
import models.backbones
from search import space
from search.config import StudyConfig, TrainConfig, weights_file
from search.data.decode import Preprocess
from search.data.prepared import PreparedData
from search.errors import ConfigError, Preempted, UserError
from search.study.requeue import INTERRUPTED, mark_and_copy
from search.study.storage import retrying
from search.trial.artifacts import atomic_file, trial_note, upload_trial_artifacts
from search.trial.train import Speedups, TrialParams, train
from search.trial.tta import tta_ops


def sample_params(trial: optuna.Trial, config: StudyConfig) -> TrialParams:
    """Draw one trial's parameters from ``[space]`` (see :data:`search.space.HYPERPARAMETERS`)."""
    return TrialParams(**space.sample_params(trial, config))


def model_spec(params: TrialParams, data: PreparedData) -> models.ModelSpec:
    """The architecture for ``params`` on this data set."""
    config = data.config
    prep = data.preprocess
    second = config.data.second_modality if params.fusion != "none" else None
    return models.ModelSpec(
        backbone=params.backbone,
        fusion=params.fusion,
        num_classes=len(data.classes),
        modality=second,
        resolution=config.train.resolution,
        dropout=params.dropout,
        numeric_dim=len(prep.numeric_mean or ()) if second == "numeric" else None,
        depth_backbone=params.depth_backbone,
        text_buckets=prep.text_buckets,
        text_length=prep.text_length,
        late_rule=params.late_rule,
        implementation=config.train.implementation,
    )


def trial_preprocess(preprocess: Preprocess, backbone: str) -> Preprocess:
    """The data's preprocessing with the RGB mean and std ``backbone``'s weights expect."""
    mean, std = models.input_normalization(backbone)
    return dataclasses.replace(preprocess, rgb_mean=mean, rgb_std=std)


def pick_device(setting: str) -> torch.device:
    """``auto`` takes the (first visible) GPU when there is one.

    Raises:
        UserError: ``cuda`` was asked for but no CUDA GPU is visible.
    """
    if setting == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device = \"cuda\" but no CUDA GPU is visible here "
                        "(CUDA_VISIBLE_DEVICES, drivers); use \"auto\" or \"cpu\"")
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def pick_speedups(config: StudyConfig, device: torch.device) -> Speedups:
    """channels_last and autocast where the device gains from them (see bench/README.md).

    channels_last trained 1.0-2.0x faster on a 2-core CPU at 32-224 px (never slower), and
    is the layout GPU convolutions prefer, so ``auto`` turns it on everywhere. Autocast is
    on for GPUs only: bf16 is emulated on most CPUs and trained 3-15x slower there.
    """
    train_cfg = config.train
    on_gpu = device.type == "cuda"
    channels_last = True if train_cfg.channels_last == "auto" else train_cfg.channels_last
    use_autocast = on_gpu if train_cfg.autocast == "auto" else train_cfg.autocast
    dtype = None
    if use_autocast:
        dtype = torch.bfloat16 if not on_gpu or torch.cuda.is_bf16_supported() else torch.float16
    return Speedups(channels_last=channels_last, autocast_dtype=dtype)


def offline() -> bool:
    """``SEARCH_OFFLINE=1``: never try to download weights (tests and air-gapped machines).

    Without it a missing ImageNet file is downloaded into the hub cache; where there is no
    network that attempt fails (DNS fails in well under a second here; a stalled connection
    gives up after models.pretrained.DOWNLOAD_TIMEOUT_S) and gives the same one-line error.
    """
    return os.environ.get("SEARCH_OFFLINE", "").lower() in ("1", "true", "yes")


def load_pretrained(train: TrainConfig, backbone: str) -> dict | None:
    """The RGB backbone's starting weights as ``[train] pretrained`` says, or None (random).

    ``"imagenet"``: the implementation's own ImageNet weights (``models.imagenet_weights``);
    a folder: its ``b0.pth`` or ``efficientnet-b0*.pth`` (the study file's validation already
    checked that every backbone of the space has one).

    Raises:
        models.PretrainedWeightsError: ImageNet weights that cannot be had or read.
    """
    if train.pretrained == "none":
        return None
    if train.pretrained == "imagenet":
        weights = models.imagenet_weights(backbone, train.implementation)
        return weights.load(download=not offline())
    path = weights_file(train.pretrained, backbone)
    return None if path is None else torch.load(path, map_location="cpu", weights_only=True)


def check_pretrained(config: StudyConfig) -> None:
    """With ``pretrained = "imagenet"``, make sure every backbone the space can sample has
    weights that load into its network, downloading what is missing; before any worker starts.

    Raises:
        ConfigError: One line naming the backbone, the file and the folder it belongs in,
            and ``pretrained = "none"`` as the way out.
    """
    train = config.train
    if train.pretrained != "imagenet":
        return  # a folder was checked when the study file was read; "none" needs nothing
    for backbone in config.space.backbone.values():
        weights = models.imagenet_weights(backbone, train.implementation)
        try:
            state = weights.load(download=not offline())
            # On the meta device only shapes are checked (no random init, no copy; PyTorch
            # warns that the copy is a no-op, which is the point).
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                models.backbones.create_backbone(backbone, implementation=train.implementation,
                                                 image_size=train.resolution, pretrained=state)
        except models.PretrainedWeightsError as error:
            raise ConfigError(f"{config.source}: train.pretrained: {error}") from None
        except ValueError as error:
            raise ConfigError(
                f"{config.source}: train.pretrained: {weights.path} is not the ImageNet "
                f"checkpoint of {backbone} ({error}); delete it to download it again, or set "
                "pretrained = \"none\"") from None


class Objective:
    """Callable for ``study.optimize``; one instance per worker, reused by its trials."""

    def __init__(self, data: PreparedData, *, artifact_store, device: torch.device,
                 on_trial_start: Callable[[], None] = lambda: None) -> None:
        self.data = data
        self.config = data.config
        self.store = artifact_store
        self.device = device
        self.speed = pick_speedups(self.config, device)
        self.on_trial_start = on_trial_start
        self.storage_s = 0.0

    def __call__(self, trial: optuna.Trial) -> float:
        self.on_trial_start()
        try:
            return self._run(trial)
        except optuna.TrialPruned:
            # Here, not where the pruner decides: by now the resume writer has stopped, so
            # no state still in flight can recreate the file.
            remove_resume(self._resume_path(trial))
            raise
        except Preempted:
            # Keep the resume file: the copy queued here continues from it. Queued before
            # Optuna fails this trial, so the budget never lacks it (search.study.requeue).
            mark_and_copy(trial.study, trial._trial_id, "preempted (SIGTERM)")
            raise
        except KeyboardInterrupt:
            # Ctrl-C fails the trial for good (no heartbeat retry), so nothing will resume it.
            remove_resume(self._resume_path(trial))
            raise
        except Exception as error:
            # Optuna logs the traceback but stores no reason; keep one line in the study.
            reason = f"{type(error).__name__}: {error}".splitlines()[0][:500]
            retrying(trial.set_user_attr, "fail_reason", reason)
            remove_resume(self._resume_path(trial))
            raise

    def _run(self, trial: optuna.Trial) -> float:
        started = time.perf_counter()
        # First, so that `search run` can requeue this trial at once if its worker dies
        # while the model is still being built (else only the heartbeat would find it).
        retrying(trial.set_user_attr, "worker_pid", os.getpid())
        if "origin_trial" not in trial.user_attrs:
            # Requeued copies keep user attributes, so a copy finds its origin's resume file.
            retrying(trial.set_user_attr, "origin_trial", trial.number)
        if trial.user_attrs.get(INTERRUPTED):
            # Inherited from the trial this copy replaces: keep it as history, and blank it so
            # that if this copy is interrupted too, its own reason is recorded.
            self._attrs(trial, {"resumed_after": trial.user_attrs[INTERRUPTED], INTERRUPTED: ""})
        self.storage_s = 0.0
        params = sample_params(trial, self.config)
        torch.manual_seed(self.config.study.seed + trial.number)
        spec = model_spec(params, self.data)
        model = models.create_model(
            spec, pretrained=load_pretrained(self.config.train, params.backbone))
        # The inputs are normalized as the backbone's weights expect, in training and in the
        # checkpoint's preprocess (hence model.json and `search predict`) alike.
        preprocess = trial_preprocess(self.data.preprocess, params.backbone)
        rgb = preprocess.to_dict()["rgb"]
        n_params = sum(p.numel() for p in model.parameters())
        self._attrs(trial, {"n_params": n_params, "device": self._device_name(),
                            "model_spec": spec.to_dict()})
        tick = time.perf_counter()
        train_split, weights = self.data.train_split(
            params.balance, seed=self.config.study.seed + trial.number, rgb=rgb,
            crop=params.crop)
        val_split = self.data.split("val", rgb=rgb)
        data_s = time.perf_counter() - tick

        resume_path = self._resume_path(trial)
        views = tta_ops(params.tta, self.config.augment.ops)
        writer = ResumeWriter(resume_path)
        try:
            result = train(
                model, train_split, val_split, params=params, settings=self.config.train,
                device=self.device, speed=self.speed, num_classes=len(self.data.classes),
                seed=self.config.study.seed + trial.number, class_weights=weights,
                on_epoch=lambda epoch, f1: self._report(trial, epoch, f1),
                save_resume=writer.save, resume=_load_resume(resume_path), tta_ops=views,
            )
        except BaseException:
            with contextlib.suppress(RuntimeError):  # keep the error that ended the trial
                writer.close()
            raise
        writer.close()  # the writes are over before the trial deletes its resume file
        tick = time.perf_counter()
        metrics = self._record(trial, result, n_params)
        upload_trial_artifacts(
            self.store, trial, classes=self.data.classes, metrics=metrics,
            checkpoint={"spec": spec.to_dict(), "state_dict": result.best_state,
                        "classes": self.data.classes, "tta": list(views),
                        "preprocess": preprocess.to_dict()})
        artifacts_s = time.perf_counter() - tick
        timing = {**result.timing, "prepare_s": data_s, "storage_s": self.storage_s,
                  "artifacts_s": artifacts_s, "total_s": time.perf_counter() - started}
        self._attrs(trial, {"timing": timing})
        retrying(save_note, trial, trial_note(metrics, timing))
        remove_resume(resume_path)
        return result.value

    def _report(self, trial: optuna.Trial, epoch: int, f1: float) -> None:
        tick = time.perf_counter()
        retrying(trial.report, f1, epoch)
        prune = retrying(trial.should_prune)
        self.storage_s += time.perf_counter() - tick
        if prune:
            self._attrs(trial, {"pruned_at_epoch": epoch, "last_val_macro_f1": f1})
            raise optuna.TrialPruned(f"val macro F1 {f1:.3f} at epoch {epoch}")

    def _record(self, trial: optuna.Trial, result, n_params: int) -> dict:
        best = result.best
        per_class = dict(zip(self.data.classes, best.per_class_f1, strict=True))
        seconds = result.timing["train_s"] + result.timing["data_s"] + result.timing["val_s"]
        self._attrs(trial, {
            "per_class_f1": per_class, "accuracy": best.accuracy,
            "images_per_s": round(result.images_per_s, 1),
            "seconds_per_epoch": round(seconds / max(1, result.epochs_run), 2),
            "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
            "best_epoch_macro_f1": best.macro_f1,
        })
        return {"value": result.value, "macro_f1": best.macro_f1, "accuracy": best.accuracy,
                "per_class_f1": best.per_class_f1, "confusion": best.confusion,
                "classes": self.data.classes, "best_epoch": result.best_epoch,
                "history": result.history, "n_params": n_params}

    def _attrs(self, trial: optuna.Trial, attrs: dict) -> None:
        tick = time.perf_counter()
        for key, value in attrs.items():
            retrying(trial.set_user_attr, key, value)
        self.storage_s += time.perf_counter() - tick

    def _resume_path(self, trial: optuna.Trial) -> Path:
        original = trial.user_attrs.get("origin_trial", trial.number)
        return self.config.artifacts_dir / "resume" / f"trial-{original}.pt"

    def _device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"cpu ({torch.get_num_threads()} threads)"


def _save_atomic(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Through a Python file: a full disk then mostly raises "[Errno 28] No space left on
    # device", where torch's own writer says "unexpected pos 46912640 vs 46912528".
    with atomic_file(path, path.with_suffix(f".{os.getpid()}.tmp")) as file:
        torch.save(state, file)


def remove_resume(path: Path) -> None:
    """Delete a trial's resume file, and the half-written ones of workers killed mid-write
    (``trial-N.<pid>.tmp``; nothing else could ever delete those)."""
    path.unlink(missing_ok=True)
    for partial in path.parent.glob(f"{path.stem}.*.tmp"):
        partial.unlink(missing_ok=True)


def _snapshot(value):
    """A copy of a state that training can go on changing: tensors copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _snapshot(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_snapshot(item) for item in value)
    return copy.deepcopy(value)


class ResumeWriter:
    """Writes a trial's resume state off the training thread, atomically.

    :meth:`save` copies the state (device to CPU memory: milliseconds) and returns; one
    thread writes it to a temporary file renamed into place (seconds for b7 with Adam). If
    the disk is slower than an epoch, a newer state replaces the one still waiting: only
    the latest matters. A killed worker loses at most the epoch in progress; a write error
    is raised by the next :meth:`save` or by :meth:`close`.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._ready = threading.Condition()
        self._pending: dict | None = None
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="resume-writer", daemon=True)
        self._thread.start()

    def save(self, state: dict) -> None:
        snapshot = _snapshot(state)
        with self._ready:
            self._raise_error()
            self._pending = snapshot
            self._ready.notify()

    def close(self) -> None:
        """Write what is waiting, stop the thread; raise a write error if there was one."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join()
        with self._ready:
            self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"could not write {self.path}: {error}") from error

    def _run(self) -> None:
        while True:
            with self._ready:
                while self._pending is None and not self._closed:
                    self._ready.wait()
                state, self._pending = self._pending, None
                if state is None:
                    return  # closed, nothing left to write
            try:
                _save_atomic(state, self.path)
            except Exception as error:  # handed to the training thread
                with self._ready:
                    self._error = error


def _load_resume(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError):
        return None  # unreadable leftovers: start the trial afresh
