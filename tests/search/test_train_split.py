"""The training split the objective trains on: balanced, cached, flipped afresh per batch."""

from __future__ import annotations

import numpy as np
import torch

from search.config import load_study
from search.data import prepare_data
from tests.search.conftest import make_dataset, write_study

CPU = torch.device("cpu")


def batches(config, seed: int) -> list[torch.Tensor]:
    split, _ = prepare_data(config).train_split("none", seed=seed)
    rows = np.arange(len(split))
    return [split.batch(rows, CPU, False)["depth"] for _ in range(2)]


def test_online_flips_change_every_epoch_and_follow_the_seed(workdir):
    data = make_dataset(workdir / "data")
    path = write_study(workdir, data, extra="")  # ops = ["flip_left_right"], online by default
    config = load_study(str(path))
    first, second = batches(config, seed=3)
    assert not torch.equal(first, second)  # a fresh draw per batch
    assert torch.equal(first, batches(config, seed=3)[0])  # the same seed, the same draws
    val = prepare_data(config).split("val")
    rows = np.arange(len(val))
    assert torch.equal(val.batch(rows, CPU, False)["rgb"], val.batch(rows, CPU, False)["rgb"])


def test_online_off_gives_the_cached_pixels(workdir):
    data = make_dataset(workdir / "data")
    text = write_study(workdir, data).read_text().replace(
        'ops = ["flip_left_right"]', 'ops = ["flip_left_right"]\nonline = false')
    path = workdir / "offline.toml"
    path.write_text(text)
    first, second = batches(load_study(str(path)), seed=3)
    assert torch.equal(first, second)
