"""Test-time augmentation: a model's class probabilities averaged over lossless views.

The views are the study's own per-batch ops (``[augment] ops`` that :mod:`augment.online`
runs: flips and quarter turns), one view per op, beside the image as it is. Only those: a
flip is a label-preserving op for apples, not for every data set, and the study's ops are the
user's statement of what is. Every image input of a sample gets the same view.

Wrapped around a model, it is what a trial with ``tta = "flips"`` is validated with, and what
export puts in the ONNX graph, so ``search predict`` and any client get it for free. Its
output is ``log(mean softmax)``: softmax of it gives the averaged probabilities back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from search.space import TTA_MODES

IMAGE_INPUTS = ("rgb", "depth")
VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "flip_left_right": lambda x: torch.flip(x, dims=(3,)),
    "flip_top_bottom": lambda x: torch.flip(x, dims=(2,)),
    "rotate90": lambda x: torch.rot90(x, 1, dims=(2, 3)),
}


def tta_ops(mode: str, study_ops: Iterable[str]) -> tuple[str, ...]:
    """The views of ``mode`` for a study augmenting with ``study_ops``."""
    if mode not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got {mode!r}")
    return tuple(op for op in study_ops if op in VIEWS) if mode == "flips" else ()


class TTAModel(nn.Module):
    """``log(mean over views of softmax(model(view)))`` for a dict batch."""

    def __init__(self, model: nn.Module, ops: Iterable[str]) -> None:
        super().__init__()
        self.model = model
        self.ops = tuple(ops)
        unknown = set(self.ops) - set(VIEWS)
        if unknown:
            raise ValueError(f"no test-time view for {sorted(unknown)}; views: {list(VIEWS)}")
        self.input_names: tuple[str, ...] = tuple(getattr(model, "input_names", ()))
        self.train(model.training)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        total = torch.softmax(self.model(batch).float(), dim=1)
        for op in self.ops:
            view = {name: VIEWS[op](value) if name in IMAGE_INPUTS else value
                    for name, value in batch.items()}
            total = total + torch.softmax(self.model(view).float(), dim=1)
        return torch.log(total / (1 + len(self.ops)))
