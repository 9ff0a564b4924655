"""`create_model`: a spec (and optional local weights) in, a fusion model out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from models._registry import get_fusion
from models._spec import ModelSpec
from models.fusions._base import FusionModel

__all__ = ["create_model"]


def create_model(
    spec: ModelSpec | Mapping[str, Any],
    pretrained: Mapping[str, torch.Tensor] | None = None,
) -> FusionModel:
    """Build the network a spec describes.

    Args:
        spec: A :class:`ModelSpec`, or its :meth:`ModelSpec.to_dict` form (e.g. the
            ``architecture`` entry of an export bundle's ``model.json``).
        pretrained: ImageNet weights of the RGB backbone as the implementation's own state
            dict, already loaded by the caller (``models`` reads no files); the classifier
            entries are ignored. With extra input channels (early fusion) the RGB stem kernels
            are kept and the extra channels start from their mean; a depth branch of the same
            size starts from them too, its stem summed to one channel. None: random weights.

    Returns:
        The model in training mode, on the CPU, in fp32.

    Raises:
        ValueError: The spec is invalid, or the weights do not fit the backbone.
    """
    if not isinstance(spec, ModelSpec):
        spec = ModelSpec.from_dict(spec)
    return get_fusion(spec.fusion)(spec, pretrained=pretrained)
