"""The training loop: one straight block, from sampled parameters to the best epoch's weights.

It knows nothing of Optuna: the objective passes an ``on_epoch`` callback that reports the
validation macro F1 (and raises to prune) and a ``save_resume`` callback that keeps a
restartable state, so a killed worker loses at most one epoch of its trial.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from torch import nn
from torch.optim.swa_utils import AveragedModel

from search.config import TrainConfig
from search.data.prepared import Split
from search.trial.prefetch import DeviceBatches
from search.trial.tta import TTAModel

CLIP_NORM = 5.0
"""Gradients are clipped to this global norm: one bad batch cannot wreck a trial."""


@dataclass(frozen=True)
class TrialParams:
    """What one trial trains with (sampled or fixed)."""

    backbone: str
    fusion: str
    dropout: float
    optimizer: str
    lr: float
    weight_decay: float
    batch_size: int
    label_smoothing: float
    balance: str
    depth_backbone: str = "b0"
    late_rule: str = "mean"
    freeze_epochs: int = 0
    backbone_lr_scale: float = 1.0
    ema_decay: float = 0.0
    tta: str = "none"
    crop: str = "none"


@dataclass
class Evaluation:
    """Metrics of one pass over an evaluation split."""

    macro_f1: float
    accuracy: float
    per_class_f1: list[float]
    confusion: list[list[int]]


@dataclass
class TrainResult:
    """The kept epoch of a trial, the trial's value, and how the time was spent."""

    best: Evaluation  # the kept epoch's own scores
    best_epoch: int
    best_state: dict[str, torch.Tensor]
    epochs_run: int
    history: list[float]
    images_per_s: float
    timing: dict[str, float] = field(default_factory=dict)
    value: float = float("nan")  # what the trial reports to the study (see ``train``)


@dataclass(frozen=True)
class Speedups:
    """Device-dependent switches; the objective picks them per device."""

    channels_last: bool
    autocast_dtype: torch.dtype | None


def param_groups(model: nn.Module, lr: float, backbone_lr_scale: float) -> list[dict]:
    """Two groups: the backbones at ``lr x backbone_lr_scale``, everything else at ``lr``.

    A model without ``backbones()`` (not a fusion model) is one group at ``lr``. The LR
    schedule multiplies each group's own lr, so the ratio holds at every step.
    """
    backbones: list[nn.Module] = getattr(model, "backbones", list)()
    inner = {id(p) for b in backbones for p in b.parameters()}
    head = [p for p in model.parameters() if id(p) not in inner]
    groups = [{"params": head, "lr": lr, "name": "head"}]
    trunk = [p for b in backbones for p in b.parameters()]
    if trunk:
        groups.append({"params": trunk, "lr": lr * backbone_lr_scale, "name": "backbone"})
    return groups


def freeze_backbones(model: nn.Module, frozen: bool) -> None:
    """Hold (or release) the backbones' weights and batch-norm statistics.

    Frozen backbones get no gradients (so the optimizer leaves them alone) and run in eval
    mode, so their batch norms neither update nor use the running statistics of the new data
    set's batches: a pretrained trunk stays exactly as loaded. Call it after ``model.train()``.
    """
    for backbone in getattr(model, "backbones", list)():
        backbone.requires_grad_(not frozen)
        if frozen:
            backbone.eval()


def make_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float,
                   backbone_lr_scale: float = 1.0):
    """The four optimizers the search space may name, over :func:`param_groups`."""
    params = param_groups(model, lr, backbone_lr_scale)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True,
                               weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


class WarmupCosine:
    """LR multiplier per step: linear warm-up, then cosine decay to ``FLOOR`` of the peak.

    The decay is planned over the whole epoch budget, but a trial whose validation curve
    has stopped improving does not simply stop at a high learning rate: :meth:`anneal`
    squeezes what is left of the decay into a few epochs, so every trial ends annealed and
    its value shows what its parameters can do (most of the F1 comes in the low-LR epochs;
    bench/README.md, "Stopping a trial"). A callable object rather than a closure, so that
    ``LambdaLR.state_dict`` saves the anneal point with the resume state.

    Why not torch's ``SequentialLR(LinearLR, CosineAnnealingLR)``: those fix the milestones
    when they are built, and the anneal moves the end of the decay while training runs.
    """

    FLOOR = 0.05

    def __init__(self, total_steps: int, warmup_steps: int) -> None:
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.anneal_from: int | None = None  # step where the squeezed anneal starts
        self.anneal_steps = 0

    def planned(self, step: int) -> float:
        """The multiplier of the uninterrupted schedule."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.FLOOR + (1 - self.FLOOR) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def __call__(self, step: int) -> float:
        if self.anneal_from is None or step < self.anneal_from:
            return self.planned(step)
        start = self.planned(self.anneal_from)
        progress = min(1.0, (step - self.anneal_from) / max(1, self.anneal_steps))
        return self.FLOOR + (start - self.FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))

    def anneal(self, step: int, steps: int) -> None:
        """From ``step`` on, decay to the floor within ``steps`` steps (once per trial)."""
        if self.anneal_from is None:
            self.anneal_from, self.anneal_steps = step, steps


def smoothed(history: list[float], window: int = 3) -> float:
    """Mean of the last ``window`` validation scores: what early stopping watches.

    One epoch's macro F1 on a few hundred validation samples jumps by several points from
    epoch to epoch; a plateau is judged on the trailing mean so one lucky or unlucky epoch
    neither starts nor delays the final anneal.
    """
    recent = history[-window:]
    return sum(recent) / len(recent)


@torch.no_grad()
def predict(model: nn.Module, split: Split, *, device: torch.device, speed: Speedups,
            batch_size: int = 128) -> np.ndarray:
    """The predicted class of every row of ``split``, in order."""
    model.eval()
    chunks = []
    for start in range(0, len(split), batch_size):
        rows = np.arange(start, min(start + batch_size, len(split)))
        batch = split.batch(rows, device, speed.channels_last)
        with _autocast(device, speed):
            logits = model(batch)
        chunks.append(logits.argmax(dim=1).cpu().numpy())
    return np.concatenate(chunks)


def score(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> Evaluation:
    """Macro F1 (the search's value), accuracy, per-class F1 and confusion, by scikit-learn."""
    classes = list(range(num_classes))
    return Evaluation(
        macro_f1=float(f1_score(labels, predicted, average="macro", labels=classes,
                                zero_division=0)),
        accuracy=float(accuracy_score(labels, predicted)),
        per_class_f1=[float(v) for v in f1_score(labels, predicted, average=None,
                                                  labels=classes, zero_division=0)],
        confusion=confusion_matrix(labels, predicted, labels=classes).tolist(),
    )


def evaluate(model: nn.Module, split: Split, *, device: torch.device, speed: Speedups,
             num_classes: int, batch_size: int = 128) -> Evaluation:
    """Predict a whole split and score it."""
    predicted = predict(model, split, device=device, speed=speed, batch_size=batch_size)
    return score(split.labels, predicted, num_classes)


def _autocast(device: torch.device, speed: Speedups):
    if speed.autocast_dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=speed.autocast_dtype)


def make_scaler(device: torch.device, speed: Speedups) -> torch.amp.GradScaler:
    """A loss scaler, on for fp16 autocast only (GPUs without bf16: T4, V100).

    fp16 has bf16's precision but not its range: small gradients underflow to zero unless
    the loss is scaled up first. bf16 and fp32 need no scaling (the scaler then passes
    everything through).
    """
    return torch.amp.GradScaler(device.type, enabled=speed.autocast_dtype == torch.float16)


def train_step(model: nn.Module, inputs: dict, targets: torch.Tensor, *, loss_fn: nn.Module,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               device: torch.device, speed: Speedups) -> torch.Tensor:
    """One optimisation step; returns the (unscaled) loss.

    Gradients are unscaled before clipping, so the clip norm means the same with and
    without fp16. With fp16, a step whose gradients hold inf/NaN is skipped and the scale
    lowered (``GradScaler.step``/``update``).
    """
    with _autocast(device, speed):
        loss = loss_fn(model(inputs).float(), targets)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def make_ema(model: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of ``model``'s weights, or None.

    torch's ``AveragedModel`` keeps the copy; the decay warms up as ``(1 + n) / (10 + n)``
    (timm's ModelEmaV2 schedule), because a trial is a few hundred steps long and a fixed
    0.999 would leave the average near the initial weights for most of it. The batch-norm
    statistics are not averaged again but copied from the model (``use_buffers=False``):
    they already are running averages (EfficientNet's momentum is 0.01), and averaging them
    once more lagged them behind the weights. Measured (b0, 32 px, 4 epochs of 12 steps):
    the averaged copy scored 0.82 val F1 with averaged statistics, 1.00 with copied ones,
    as the raw model did; bench/final_model.py had seen drops of 0.05-0.29 on the demo sets.
    """
    if decay <= 0:
        return None

    def average(kept: torch.Tensor, current: torch.Tensor, count: torch.Tensor | int):
        rate = min(decay, (1 + int(count)) / (10 + int(count)))
        return kept + (current - kept) * (1 - rate)

    return AveragedModel(model, avg_fn=average, use_buffers=False)


def train(
    model: nn.Module,
    train_split: Split,
    val_split: Split,
    *,
    params: TrialParams,
    settings: TrainConfig,
    device: torch.device,
    speed: Speedups,
    num_classes: int,
    seed: int,
    class_weights: np.ndarray | None = None,
    on_epoch: Callable[[int, float], None] = lambda epoch, f1: None,
    save_resume: Callable[[dict], None] | None = None,
    resume: dict | None = None,
    tta_ops: tuple[str, ...] = (),
) -> TrainResult:
    """Train ``model`` and keep the weights of its best validation epoch.

    ``on_epoch(epoch, macro_f1)`` runs after every validation and may raise to stop the
    trial (pruning). When the smoothed validation curve has not improved for
    ``settings.patience`` epochs, the learning rate anneals to its floor within
    ``settings.anneal_epochs`` epochs and the trial ends there (early stopping that still
    ends on an annealed model).

    Which epoch is kept, and the trial's value, follow ``settings.value``: ``"max"`` keeps
    the epoch with the highest val macro F1 and reports that F1; ``"smoothed"`` keeps the
    epoch that ends the best trailing mean of 3 (:func:`smoothed`) and reports that mean.
    """
    model.to(device)
    if device.type == "cuda":
        # Every training batch but an epoch's last has one shape: let cuDNN pick its fastest
        # convolution algorithms once and reuse them.
        torch.backends.cudnn.benchmark = True
    if speed.channels_last:
        model.to(memory_format=torch.channels_last)
    generator = np.random.default_rng(seed)
    steps_per_epoch = math.ceil(len(train_split) / params.batch_size)
    optimizer = make_optimizer(params.optimizer, model, params.lr, params.weight_decay,
                               params.backbone_lr_scale)
    schedule = WarmupCosine(settings.epochs * steps_per_epoch,
                            settings.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    weight = None if class_weights is None else torch.as_tensor(class_weights, device=device)
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=params.label_smoothing)
    scaler = make_scaler(device, speed)
    ema = make_ema(model, params.ema_decay)
    scored = model if ema is None else ema.module  # what is validated, kept and exported
    # Validation sees what export will ship: with test-time augmentation, the mean over views.
    judged = TTAModel(scored, tta_ops) if tta_ops else scored

    history: list[float] = []
    best, best_epoch, best_state = None, -1, {}
    timing = {"data_s": 0.0, "train_s": 0.0, "val_s": 0.0}
    first_epoch, images_seen = 0, 0
    if resume is not None:  # a retried trial continues where the dead worker left off
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if "scaler" in resume:
            scaler.load_state_dict(resume["scaler"])
        if ema is not None and "ema" in resume:
            ema.load_state_dict(resume["ema"])
        history, best_epoch = resume["history"], resume["best_epoch"]
        best_state = resume["best_state"]
        generator = np.random.default_rng([seed, len(history)])
        first_epoch = len(history)
    by_smoothed = settings.value == "smoothed"
    best_f1 = history[best_epoch] if best_epoch >= 0 else -1.0
    # Early stopping watches the smoothed curve; on a plateau the trial anneals, then ends.
    best_smooth, smooth_epoch = -1.0, -1
    for i in range(len(history)):  # a resumed trial recounts from its history
        if smoothed(history[:i + 1]) > best_smooth:
            best_smooth, smooth_epoch = smoothed(history[:i + 1]), i
    last_epoch = resume.get("last_epoch", settings.epochs - 1) if resume else settings.epochs - 1

    for epoch in range(first_epoch, last_epoch + 1):
        model.train()
        freeze_backbones(model, epoch < params.freeze_epochs)  # head-only epochs first
        order = generator.permutation(len(train_split))
        # Batch norm cannot train on a single sample: a last batch of one is dropped.
        row_batches = [rows for start in range(0, len(order), params.batch_size)
                       if len(rows := order[start:start + params.batch_size]) >= 2]
        # The next batches are gathered, copied and augmented in a background thread while
        # this one trains; leaving the block (pruning, Ctrl-C, an error) stops that thread.
        with DeviceBatches(train_split, row_batches, device=device,
                           channels_last=speed.channels_last) as batches:
            tick = time.perf_counter()
            for inputs, targets in batches:
                timing["data_s"] += time.perf_counter() - tick  # waiting on the producer
                tick = time.perf_counter()
                train_step(model, inputs, targets, loss_fn=loss_fn, optimizer=optimizer,
                           scaler=scaler, device=device, speed=speed)
                scheduler.step()
                if ema is not None:
                    ema.update_parameters(model)
                timing["train_s"] += time.perf_counter() - tick
                images_seen += len(targets)
                tick = time.perf_counter()

        tick = time.perf_counter()
        current = evaluate(judged, val_split, device=device, speed=speed, num_classes=num_classes)
        timing["val_s"] += time.perf_counter() - tick
        history.append(current.macro_f1)
        new_smooth = smoothed(history) > best_smooth
        if new_smooth if by_smoothed else current.macro_f1 > best_f1:
            best, best_f1, best_epoch = current, current.macro_f1, epoch
            best_state = {k: v.detach().to("cpu", copy=True)
                          for k, v in scored.state_dict().items()}
        if new_smooth:
            best_smooth, smooth_epoch = smoothed(history), epoch
        elif (epoch - smooth_epoch >= settings.patience and schedule.anneal_from is None
              and last_epoch - epoch > settings.anneal_epochs):
            # Plateau: anneal within `anneal_epochs` more epochs instead of the planned rest.
            schedule.anneal(scheduler.last_epoch, settings.anneal_epochs * steps_per_epoch)
            last_epoch = epoch + settings.anneal_epochs
        on_epoch(epoch, current.macro_f1)
        if save_resume is not None and epoch < last_epoch:
            save_resume({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                         **({} if ema is None else {"ema": ema.state_dict()}),
                         "history": history,
                         "best_epoch": best_epoch, "best_state": best_state,
                         "last_epoch": last_epoch})
        if epoch >= last_epoch:
            break  # the anneal a plateau started is over

    if best is None:
        # Resumed after the best epoch: score the restored best weights once more.
        model.load_state_dict(best_state)
        best = evaluate(TTAModel(model, tta_ops) if tta_ops else model, val_split,
                        device=device, speed=speed, num_classes=num_classes)
    return TrainResult(
        best=best, best_epoch=best_epoch, best_state=copy.copy(best_state),
        epochs_run=len(history) - first_epoch, history=history,
        images_per_s=images_seen / max(timing["train_s"] + timing["data_s"], 1e-9),
        timing=timing, value=best_smooth if by_smoothed else best.macro_f1,
    )
