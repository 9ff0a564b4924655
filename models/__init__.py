"""EfficientNet classifiers that may fuse a second modality, built from a `ModelSpec`.

Example:
    >>> import models
    >>> spec = models.ModelSpec(num_classes=3, fusion="joint", modality="depth", resolution=64)
    >>> model = models.create_model(spec)
    >>> logits = model(models.example_inputs(spec, batch_size=2))  # [2, 3]

A batch is a dict of tensors: ``"rgb"`` float ``[B, 3, H, W]`` normalized with the ImageNet
mean and std, ``"depth"`` float ``[B, 1, H, W]``, ``"numeric"`` float ``[B, F]``, ``"text"``
int64 ``[B, L]`` word ids in ``[0, text_buckets)``. Turning files into these arrays
(decoding, normalizing, tokenizing) is the data layer's job (``search.data.decode``).
This package reads no files and knows nothing of Optuna.
"""

from __future__ import annotations

from models import fusions  # noqa: F401  (registers every fusion)
from models._factory import create_model
from models._registry import fusion_accepts, get_fusion, list_fusions, register_fusion
from models._spec import LATE_RULES, MODALITIES, ModelSpec
from models._utils import (
    PositionalInputs,
    amp_dtype,
    example_inputs,
    prepare_for_export,
)
from models.backbones import list_backbones, list_implementations
from models.fusions import FusionModel

__all__ = [
    "LATE_RULES",
    "MODALITIES",
    "FusionModel",
    "ModelSpec",
    "PositionalInputs",
    "amp_dtype",
    "create_model",
    "example_inputs",
    "fusion_accepts",
    "get_fusion",
    "list_backbones",
    "list_fusions",
    "list_implementations",
    "prepare_for_export",
    "register_fusion",
]
