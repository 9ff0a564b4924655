"""The training schedule: warm-up + cosine, and the final anneal a plateau starts."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from search.config import TrainConfig
from search.data.prepared import Split
from search.trial.train import Speedups, TrialParams, WarmupCosine, smoothed, train

CPU = torch.device("cpu")
PLAIN = Speedups(channels_last=False, autocast_dtype=None)


def test_planned_schedule_warms_up_then_decays_to_the_floor():
    schedule = WarmupCosine(total_steps=100, warmup_steps=10)
    factors = [schedule(step) for step in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    assert factors[100] == pytest.approx(WarmupCosine.FLOOR)


def test_anneal_squeezes_the_rest_of_the_decay_and_survives_a_state_dict():
    schedule = WarmupCosine(total_steps=100, warmup_steps=10)
    start = schedule(30)
    schedule.anneal(30, 10)
    schedule.anneal(50, 40)  # only the first call counts
    assert schedule(30) == pytest.approx(start)
    assert schedule(35) < schedule.planned(35)
    assert schedule(40) == pytest.approx(WarmupCosine.FLOOR) == schedule(70)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    saved = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule).state_dict()
    fresh = WarmupCosine(total_steps=100, warmup_steps=10)
    torch.optim.lr_scheduler.LambdaLR(optimizer, fresh).load_state_dict(saved)
    assert (fresh.anneal_from, fresh.anneal_steps) == (30, 10)


def test_smoothed_is_the_trailing_mean():
    assert smoothed([0.2]) == 0.2
    assert smoothed([0.0, 0.3, 0.6, 0.9]) == pytest.approx(0.6)


class _Constant(nn.Module):
    """Predicts from its bias only: its val F1 never changes, so it plateaus at once."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([1.0, 0.0]))

    def forward(self, batch: dict) -> torch.Tensor:
        return self.bias.expand(len(batch["rgb"]), 2) + 0 * batch["rgb"].mean()


def _split(n: int) -> Split:
    rng = np.random.default_rng(0)
    return Split(labels=np.arange(n) % 2,
                 images={"rgb": rng.integers(0, 255, (n, 4, 4, 3), dtype=np.uint8)})


def _train(resume=None, saved=None, patience=3, epochs=12):
    settings = TrainConfig(epochs=epochs, patience=patience, anneal_epochs=2, warmup_epochs=0)
    params = TrialParams(backbone="b0", fusion="none", dropout=0.0, optimizer="sgd", lr=0.0,
                         weight_decay=0.0, batch_size=8, label_smoothing=0.0, balance="none")
    epochs: list[int] = []
    result = train(_Constant(), _split(16), _split(8), params=params, settings=settings,
                   device=CPU, speed=PLAIN, num_classes=2, seed=0, resume=resume,
                   on_epoch=lambda epoch, f1: epochs.append(epoch),
                   # deep copies: the worker writes each state to disk at once
                   save_resume=None if saved is None else lambda s: saved.append(copy.deepcopy(s)))
    return result, epochs


def test_a_plateau_anneals_for_anneal_epochs_then_ends():
    saved: list[dict] = []
    result, epochs = _train(saved=saved)
    # Epoch 0 sets the best smoothed F1; epochs 1-3 do not beat it; the anneal runs 4 and 5.
    assert epochs == [0, 1, 2, 3, 4, 5] and len(result.history) == 6
    assert saved[-1]["last_epoch"] == 5 and len(saved) == 5  # none after the last epoch
    schedule = saved[-1]["scheduler"]["lr_lambdas"][0]
    assert schedule["anneal_from"] == 4 * 2 and schedule["anneal_steps"] == 2 * 2


def test_a_resumed_trial_keeps_its_anneal():
    saved: list[dict] = []
    _train(saved=saved)
    resumed, epochs = _train(resume=saved[4])  # the state after epoch 4, mid-anneal
    assert epochs == [5] and len(resumed.history) == 6


def test_no_plateau_no_anneal():
    _result, epochs = _train(patience=12, epochs=6)
    assert epochs == list(range(6))


class _Threshold(nn.Module):
    """Predicts class 1 where an image's mean brightness exceeds ``cut``; the test moves
    ``cut`` between epochs (lr 0: training leaves it alone) to script the val curve."""

    def __init__(self) -> None:
        super().__init__()
        self.cut = nn.Parameter(torch.tensor(2.0))

    def forward(self, batch: dict) -> torch.Tensor:
        brightness = batch["rgb"].mean(dim=(1, 2, 3))
        logit = 100 * (brightness - self.cut)
        return torch.stack([torch.zeros_like(logit), logit], dim=1)


def _graded_split() -> Split:
    """Four of class 0 (black) and four of class 1 at brightness 1/4, 2/4, 3/4, 1."""
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    levels = np.array([0, 0, 0, 0, 64, 128, 191, 255], dtype=np.uint8)
    images = np.broadcast_to(levels[:, None, None, None], (8, 4, 4, 3)).copy()
    return Split(labels=labels, images={"rgb": images}, rgb_mean=(0.0,) * 3, rgb_std=(1.0,) * 3)


@pytest.mark.parametrize(("rule", "kept", "value"), [("max", 1, 1.0), ("smoothed", 5, 0.873)])
def test_value_rule_picks_the_kept_epoch_and_the_trial_value(rule, kept, value):
    # Cuts per epoch: all class 0 (macro F1 1/3), a lone perfect epoch, 1/3 again, then
    # three epochs that find 3 of the 4 (0.873): the lone spike is the max, the plateau
    # the best trailing mean of 3.
    cuts = [2.0, 0.1, 2.0, 0.3, 0.3, 0.3]
    model = _Threshold()
    settings = TrainConfig(epochs=6, patience=6, warmup_epochs=0, value=rule)
    params = TrialParams(backbone="b0", fusion="none", dropout=0.0, optimizer="sgd", lr=0.0,
                         weight_decay=0.0, batch_size=8, label_smoothing=0.0, balance="none")

    def next_cut(epoch: int, _f1: float) -> None:
        with torch.no_grad():
            model.cut.fill_(cuts[min(epoch + 1, 5)])
    with torch.no_grad():
        model.cut.fill_(cuts[0])
    result = train(model, _graded_split(), _graded_split(), params=params, settings=settings,
                   device=CPU, speed=PLAIN, num_classes=2, seed=0, on_epoch=next_cut)
    assert result.history == pytest.approx([1 / 3, 1.0, 1 / 3, 0.873, 0.873, 0.873], abs=1e-3)
    assert result.best_epoch == kept
    assert result.value == pytest.approx(value, abs=1e-3)
    assert result.best.macro_f1 == pytest.approx(result.history[kept])
    assert float(result.best_state["cut"]) == pytest.approx(cuts[kept])
