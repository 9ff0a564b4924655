"""Helpers for speed (mixed precision) and for ONNX export."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar, cast

import torch
from torch import nn

from models._spec import ModelSpec
from models.backbones import Backbone

_ModuleT = TypeVar("_ModuleT", bound=nn.Module)

__all__ = [
    "PositionalInputs",
    "amp_dtype",
    "example_inputs",
    "prepare_for_export",
]


def prepare_for_export(model: _ModuleT) -> _ModuleT:
    """Make a model exportable to ONNX, in place, and return it.

    Switches efficientnet-pytorch's memory-efficient Swish (a custom autograd.Function) to its
    plain Swish in every backbone, so the graph holds only standard ops. (torch 2.14's two
    exporters happen to inline the Function; older exporters could not, which is why
    efficientnet-pytorch has ``set_swish``.) It also puts the model in eval mode (batch-norm
    statistics and dropout as at inference). The plain Swish is ``nn.SiLU``, the same
    function, so outputs and weights are unchanged and the model can still be trained.
    """
    for module in model.modules():
        if isinstance(module, Backbone):
            module.set_swish(memory_efficient=False)
    return model.eval()


class PositionalInputs(nn.Module):
    """Wrap a fusion model so that it takes its inputs as positional tensors.

    ONNX graphs take named tensors, not a dict: ``forward(rgb)`` or ``forward(rgb, second)``
    in the order of ``model.input_names`` (``("rgb",)`` or ``("rgb", modality)``), which
    export can use as the graph's input names.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        # Any module with ``input_names`` (a fusion model, the search's ensemble); nn.Module's
        # __getattr__ types every attribute as Tensor | Module.
        self.input_names = tuple(cast("Sequence[str]", model.input_names))
        # A new Module is in training mode; exporters restore the wrapper's mode afterwards,
        # which would silently switch a prepared (eval) model back to training.
        self.train(model.training)

    def forward(self, rgb: torch.Tensor, second: torch.Tensor | None = None) -> torch.Tensor:
        inputs = (rgb,) if second is None else (rgb, second)
        return self.model(dict(zip(self.input_names, inputs, strict=True)))


def example_inputs(
    spec: ModelSpec, batch_size: int = 2, *, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Return a random batch with the keys, shapes and dtypes ``spec``'s model reads.

    Useful as export example inputs and in tests; text ids leave the last quarter of each
    row as padding, like real short texts.
    """
    gen = torch.Generator().manual_seed(seed)
    size = (batch_size, 3, spec.resolution, spec.resolution)
    batch = {"rgb": torch.randn(size, generator=gen)}
    if "depth" in spec.input_names:
        batch["depth"] = torch.randn((batch_size, 1, *size[2:]), generator=gen)
    if "numeric" in spec.input_names:
        assert spec.numeric_dim is not None  # ModelSpec requires it for numeric
        batch["numeric"] = torch.randn((batch_size, spec.numeric_dim), generator=gen)
    if "text" in spec.input_names:
        ids = torch.randint(1, spec.text_buckets, (batch_size, spec.text_length), generator=gen)
        ids[:, spec.text_length - spec.text_length // 4 :] = 0
        batch["text"] = ids
    return batch


def amp_dtype(device: torch.device | str) -> torch.dtype:
    """Return the autocast dtype to use on ``device``: bf16, or fp16 on CUDA without bf16.

    bf16 needs no gradient scaler; fp16 (old GPUs only) does.
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16
