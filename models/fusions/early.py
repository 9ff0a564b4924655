"""Early fusion: the second modality enters the backbone as extra input channels."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from models._registry import register_fusion
from models.backbones import create_backbone
from models.fusions._base import FusionModel, classifier

if TYPE_CHECKING:
    from models._spec import ModelSpec

__all__ = ["EarlyFusion"]


@register_fusion("early", accepts=("depth", "numeric"))
class EarlyFusion(FusionModel):
    """One EfficientNet whose stem sees RGB plus the second modality.

    Depth adds one channel; numeric features are broadcast over the image as constant
    channels, one per feature. Text has no spatial form and is refused. With pre-trained
    weights the RGB kernels of the stem are kept and the extra channels start from their mean.
    """

    def __init__(
        self, spec: ModelSpec, *, pretrained: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        super().__init__(spec)
        # register_fusion's accepts has no None: this fusion always has a second modality.
        assert spec.modality is not None
        self.modality = spec.modality
        extra = 1 if spec.modality == "depth" else spec.numeric_dim
        assert extra is not None  # ModelSpec requires numeric_dim for numeric
        self.backbone = create_backbone(
            spec.backbone,
            implementation=spec.implementation,
            in_chans=3 + extra,
            image_size=spec.resolution,
            pretrained=pretrained,
        )
        self.num_features = self.backbone.num_features
        self.head = classifier(self.num_features, spec.num_classes, spec.dropout)

    def forward_features(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        rgb = self._take(batch, "rgb")
        second = self._take(batch, self.modality)
        if self.modality == "numeric":
            second = second[:, :, None, None].expand(-1, -1, rgb.shape[2], rgb.shape[3])
        # Under autocast the two inputs may differ in dtype; the conv casts the result anyway.
        return self.backbone(torch.cat([rgb, second.to(rgb.dtype)], dim=1))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def encoders(self) -> dict[str, nn.Module]:
        return {"rgb": self.backbone, self.modality: self.backbone}
