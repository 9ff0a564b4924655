"""No fusion: the single-modal RGB baseline."""

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

__all__ = ["NoFusion"]


@register_fusion("none", accepts=(None, "depth", "numeric", "text"))
class NoFusion(FusionModel):
    """An EfficientNet on RGB alone; any other key in the batch is ignored.

    It accepts every modality so that the search can always compare against the baseline.
    """

    def __init__(
        self, spec: ModelSpec, *, pretrained: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        super().__init__(spec)
        self.backbone = create_backbone(
            spec.backbone,
            implementation=spec.implementation,
            image_size=spec.resolution,
            pretrained=pretrained,
        )
        self.num_features = self.backbone.num_features
        self.head = classifier(self.num_features, spec.num_classes, spec.dropout)

    def forward_features(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.backbone(self._take(batch, "rgb"))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def encoders(self) -> dict[str, nn.Module]:
        return {"rgb": self.backbone}
