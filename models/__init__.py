"""EfficientNet classifiers that may fuse a second modality, built from a `ModelSpec`.

Example:
    >>> import models
    >>> spec = models.ModelSpec(num_classes=3, fusion="joint", modality="depth", resolution=64)
    >>> model = models.create_model(spec)
    >>> logits = model(models.example_inputs(spec, batch_size=2))  # [2, 3]

A batch is a dict of tensors: ``"rgb"`` float ``[B, 3, H, W]`` normalized with the mean and
std the backbone's weights expect (``input_normalization(spec.backbone)``), ``"depth"``
float ``[B, 1, H, W]``, ``"numeric"`` float ``[B, F]``, ``"text"`` int64 ``[B, L]`` word ids
in ``[0, text_buckets)``. Turning files into these arrays (decoding, normalizing, tokenizing)
is the data layer's job (``search.data.decode``).
This package knows nothing of Optuna and reads no files but pretrained weights, through the
implementations' own loaders (``models.pretrained``).
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
from models.backbones import input_normalization, list_backbones, list_implementations
from models.fusions import FusionModel
from models.pretrained import ImagenetWeights, PretrainedWeightsError, imagenet_weights

__all__ = [
    "LATE_RULES",
    "MODALITIES",
    "FusionModel",
    "ImagenetWeights",
    "ModelSpec",
    "PositionalInputs",
    "PretrainedWeightsError",
    "amp_dtype",
    "create_model",
    "example_inputs",
    "fusion_accepts",
    "get_fusion",
    "imagenet_weights",
    "input_normalization",
    "list_backbones",
    "list_fusions",
    "list_implementations",
    "prepare_for_export",
    "register_fusion",
]
