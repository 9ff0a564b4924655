"""The training step: loss scaling for fp16, clipping on true gradients, and a clean stop."""

from __future__ import annotations

import threading

import numpy as np
import optuna
import pytest
import torch
from torch import nn

from search.config import TrainConfig
from search.data.prepared import Split
from search.trial.train import (
    CLIP_NORM,
    Speedups,
    TrialParams,
    make_scaler,
    train,
    train_step,
)

CPU = torch.device("cpu")
FP16 = Speedups(channels_last=False, autocast_dtype=torch.float16)  # forced on the CPU


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.fc(batch["x"])


def _step(model, x, scaler):
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    train_step(model, {"x": x}, torch.tensor([0, 1]), loss_fn=nn.CrossEntropyLoss(),
               optimizer=optimizer, scaler=scaler, device=CPU, speed=FP16)
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before,
                                                                  strict=True)])


def test_the_scaler_is_on_for_fp16_only():
    assert make_scaler(CPU, FP16).is_enabled()
    assert not make_scaler(CPU, Speedups(False, torch.bfloat16)).is_enabled()
    assert not make_scaler(CPU, Speedups(False, None)).is_enabled()


def test_an_overflowing_fp16_step_is_skipped_and_the_scale_lowered():
    torch.manual_seed(0)
    model, scaler = _Linear(), make_scaler(CPU, FP16)
    scale = scaler.get_scale()
    # Inputs near fp16's limit: the scaled gradients overflow.
    moved = _step(model, torch.full((2, 4), 6e4), scaler)
    assert torch.all(moved == 0)  # no update from inf gradients
    assert scaler.get_scale() == scale / 2
    moved = _step(model, torch.randn(2, 4), scaler)
    assert torch.all(torch.isfinite(moved)) and moved.abs().sum() > 0
    assert scaler.get_scale() == scale / 2  # no growth after one good step


def test_gradients_are_unscaled_before_they_are_clipped():
    torch.manual_seed(0)
    model, scaler = _Linear(), torch.amp.GradScaler("cpu", init_scale=16.0)
    # Large gradients, finite once scaled: clipped to CLIP_NORM; with SGD at lr 1 the update
    # is the clipped gradient. Clipping the scaled gradients would move the weights 16x less.
    x = torch.full((2, 4), 300.0) * torch.tensor([1.0, -1.0]).view(2, 1)
    moved = _step(model, x, scaler)
    assert moved.norm().item() == pytest.approx(CLIP_NORM, rel=1e-2)


class _FailsAt(nn.Module):
    """Raises on its ``fail_at``-th forward pass (in training mode)."""

    def __init__(self, fail_at: int, error: BaseException) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.calls, self.fail_at, self.error = 0, fail_at, error

    def forward(self, batch: dict) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.fail_at:
                raise self.error
        return self.fc(batch["rgb"].mean(dim=(2, 3)))


def _train(model, on_epoch=lambda epoch, f1: None):
    rng = np.random.default_rng(0)
    split = Split(labels=np.arange(64) % 2,
                  images={"rgb": rng.integers(0, 255, (64, 4, 4, 3), dtype=np.uint8)})
    params = TrialParams(backbone="b0", fusion="none", dropout=0.0, optimizer="sgd", lr=0.01,
                         weight_decay=0.0, batch_size=4, label_smoothing=0.0, balance="none")
    return train(model, split, split, params=params, device=CPU, num_classes=2, seed=0,
                 settings=TrainConfig(epochs=3, warmup_epochs=0),
                 speed=Speedups(False, None), on_epoch=on_epoch)


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("CUDA out of memory")])
def test_a_step_that_raises_leaves_no_prefetch_thread(error):
    before = threading.active_count()
    with pytest.raises(type(error)):
        _train(_FailsAt(5, error))  # mid-epoch: the producer is batches ahead
    assert threading.active_count() == before


def test_pruning_and_a_full_run_leave_no_prefetch_thread():
    before = threading.active_count()

    def prune(epoch, f1):
        raise optuna.TrialPruned()

    with pytest.raises(optuna.TrialPruned):
        _train(_FailsAt(-1, RuntimeError()), on_epoch=prune)
    assert threading.active_count() == before
    result = _train(_FailsAt(-1, RuntimeError()))
    assert result.epochs_run == 3 and threading.active_count() == before
