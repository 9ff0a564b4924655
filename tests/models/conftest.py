"""Shared fixtures of the models tests: small specs, batches, and every registered fusion case."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
from torch import nn

import models

# Small enough that a b0 forward and backward takes ~0.1 s on two CPU cores.
SMALL: dict[str, Any] = {
    "num_classes": 3,
    "backbone": "b0",
    "resolution": 32,
    "numeric_dim": 5,
    "text_buckets": 97,
    "text_length": 12,
    "text_dim": 16,
    "hidden_dim": 32,
    "dropout": 0.1,
}


def fusion_cases() -> list[Any]:
    """Every registered fusion x every second modality it accepts (x every late rule), on
    b0 of every registered backbone implementation and on lite0 (which has its own)."""
    cases = []
    networks = [("b0", i) for i in models.list_implementations()]
    networks.append(("lite0", "efficientnet-pytorch"))
    for backbone, implementation in networks:
        for fusion in models.list_fusions():
            modalities = sorted(models.fusion_accepts(fusion), key=lambda m: m or "")
            rules = models.LATE_RULES if fusion == "late" else ("mean",)
            for modality in modalities:
                for rule in rules:
                    name = f"{fusion}-{modality}" + (f"-{rule}" if fusion == "late" else "")
                    name += "" if implementation == "efficientnet-pytorch" else f"-{implementation}"
                    name += "" if backbone == "b0" else f"-{backbone}"
                    cases.append(pytest.param((fusion, modality, rule, implementation, backbone),
                                              id=name))
    return cases


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # A test that asks for `case` runs over every registered fusion: a new fusion is covered
    # the moment it registers.
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", fusion_cases())


@pytest.fixture
def small_spec() -> Callable[..., models.ModelSpec]:
    """Return a factory of small specs; keyword arguments override :data:`SMALL`."""

    def make(**overrides: Any) -> models.ModelSpec:
        return models.ModelSpec(**{**SMALL, **overrides})

    return make


@pytest.fixture
def case_spec(case: tuple[str, str | None, str, str, str], small_spec) -> models.ModelSpec:
    fusion, modality, rule, implementation, backbone = case
    return small_spec(fusion=fusion, modality=modality, late_rule=rule,
                      implementation=implementation, backbone=backbone)


@pytest.fixture
def make_batch() -> Callable[..., dict[str, torch.Tensor]]:
    """Return ``make(batch_size, seed=0)``: a batch holding every modality, sized for SMALL.

    The data pipeline gives every key it has whatever the fusion, so models must ignore
    the keys they do not use.
    """

    def make(batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        size = SMALL["resolution"]
        shape = (batch_size, SMALL["text_length"])
        text = torch.randint(1, SMALL["text_buckets"], shape, generator=gen)
        text[:, -3:] = 0  # padding, as short texts have
        return {
            "rgb": torch.randn((batch_size, 3, size, size), generator=gen),
            "depth": torch.randn((batch_size, 1, size, size), generator=gen),
            "numeric": torch.randn((batch_size, SMALL["numeric_dim"]), generator=gen),
            "text": text,
        }

    return make


@pytest.fixture
def calibrate() -> Callable[[nn.Module, Mapping[str, torch.Tensor]], None]:
    """Return :func:`calibrate_batch_norm`."""
    return calibrate_batch_norm


def calibrate_batch_norm(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> None:
    """Set every batch norm's running statistics to those of ``batch``, then switch to eval.

    Freshly initialised running statistics (mean 0, variance 1) make a random EfficientNet's
    eval output almost constant (features ~1e-14), which would let any export pass.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: one batch sets the statistics outright
    model.train()
    with torch.no_grad():
        model(batch)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    model.eval()
