"""Joint (intermediate) fusion: concatenated pooled features, fused by an MLP head."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from models._registry import register_fusion
from models.backbones import create_backbone
from models.encoders import create_encoder
from models.fusions._base import FusionModel

if TYPE_CHECKING:
    from models._spec import ModelSpec

__all__ = ["JointFusion"]


@register_fusion("joint", accepts=("depth", "numeric", "text"))
class JointFusion(FusionModel):
    """RGB backbone and second-modality encoder side by side, features concatenated.

    The head is ``Dropout -> Linear(hidden_dim) -> SiLU -> Dropout -> Linear(num_classes)``,
    so the fusion can learn interactions between the modalities, not only a sum of votes.
    """

    def __init__(
        self, spec: ModelSpec, *, pretrained: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        super().__init__(spec)
        # register_fusion's accepts has no None: this fusion always has a second modality.
        assert spec.modality is not None
        self.modality = spec.modality
        self.backbone = create_backbone(
            spec.backbone,
            implementation=spec.implementation,
            image_size=spec.resolution,
            pretrained=pretrained,
        )
        self.encoder = create_encoder(spec, pretrained)
        self.num_features = self.backbone.num_features + self.encoder.num_features
        self.head = nn.Sequential(
            nn.Dropout(spec.dropout),
            nn.Linear(self.num_features, spec.hidden_dim),
            nn.SiLU(),
            nn.Dropout(spec.dropout),
            nn.Linear(spec.hidden_dim, spec.num_classes),
        )

    def forward_features(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        rgb = self.backbone(self._take(batch, "rgb"))
        second = self.encoder(self._take(batch, self.modality))
        # Under autocast the encoders may return different dtypes (e.g. an embedding stays fp32).
        return torch.cat([rgb, second.to(rgb.dtype)], dim=1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def encoders(self) -> dict[str, nn.Module]:
        return {"rgb": self.backbone, self.modality: self.encoder}
