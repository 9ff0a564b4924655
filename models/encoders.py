"""Encoders for the second modality; each maps its batch entry to features ``[B, num_features]``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from models.backbones import Backbone, create_backbone

if TYPE_CHECKING:
    from models._spec import ModelSpec

__all__ = ["NumericEncoder", "TextEncoder", "create_encoder"]


class NumericEncoder(nn.Module):
    """A residual MLP over standardized numeric features.

    ``x -> Linear -> h``, then ``h + [BN, SiLU, Dropout, Linear] x 2 (h)`` and a final SiLU.
    The skip connection keeps a near-linear path from the features to the head, which is
    often all tabular features need; the residual branch adds interactions.

    Note that batch norm needs at least two samples per batch in training.
    """

    def __init__(self, in_dim: int, hidden_dim: int, dropout: float) -> None:
        super().__init__()
        self.num_features = hidden_dim
        self.stem = nn.Linear(in_dim, hidden_dim)
        self.block = nn.Sequential(
            nn.BatchNorm1d(hidden_dim),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim),
        )
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.act(h + self.block(h))


class TextEncoder(nn.Module):
    """Mean of word embeddings over the non-padding tokens, then a projection.

    Fixed-length ids with ``padding_idx=0`` and a masked mean (instead of EmbeddingBag with
    offsets) export to ONNX as plain Gather/Mul/ReduceSum ops with a dynamic batch axis.
    """

    def __init__(self, buckets: int, dim: int, dropout: float) -> None:
        super().__init__()
        self.num_features = dim
        self.embed = nn.Embedding(buckets, dim, padding_idx=0)
        self.proj = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, dim), nn.SiLU())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != 0).unsqueeze(-1).to(self.embed.weight.dtype)
        summed = (self.embed(ids) * mask).sum(dim=1)
        # An empty text (all padding) gives zeros rather than 0/0.
        pooled = summed / mask.sum(dim=1).clamp_min(1.0)
        return self.proj(pooled)


def create_encoder(
    spec: ModelSpec, pretrained: Mapping[str, torch.Tensor] | None = None
) -> Backbone | NumericEncoder | TextEncoder:
    """Build the encoder of ``spec.modality``; it exposes ``num_features``.

    Args:
        spec: The model spec; ``spec.modality`` must not be None.
        pretrained: RGB backbone weights. The depth branch starts from them (stem summed to
            one channel) when it has the same size as the RGB backbone; otherwise ignored.
    """
    if spec.modality == "depth":
        same_size = spec.depth_backbone_name == spec.backbone
        return create_backbone(
            spec.depth_backbone_name,
            implementation=spec.implementation,
            in_chans=1,
            image_size=spec.resolution,
            pretrained=pretrained if same_size else None,
        )
    if spec.modality == "numeric":
        assert spec.numeric_dim is not None  # ModelSpec requires it for numeric
        return NumericEncoder(spec.numeric_dim, spec.hidden_dim, spec.dropout)
    if spec.modality == "text":
        return TextEncoder(spec.text_buckets, spec.text_dim, spec.dropout)
    raise ValueError(f"no encoder for modality {spec.modality!r}")
