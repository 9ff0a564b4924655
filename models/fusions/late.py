"""Late fusion: one classifier per modality, their class probabilities combined."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from models._registry import register_fusion
from models._spec import LATE_RULES
from models.backbones import create_backbone
from models.encoders import create_encoder
from models.fusions._base import FusionModel, classifier

if TYPE_CHECKING:
    from models._spec import ModelSpec

__all__ = ["LateFusion"]

# Probabilities are clamped before the log so that a class every modality rules out gives a
# large finite negative logit, not -inf (which would turn the loss into inf or NaN).
_MIN_PROB = 1e-7


class _MeanRule(nn.Module):
    """Average of the modalities' probabilities."""

    def __init__(self, n_modalities: int) -> None:
        super().__init__()

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        return probs.mean(dim=0)


class _LearnedRule(nn.Module):
    """Weighted average with weights ``softmax(w)``; ``w`` is learned and starts equal."""

    def __init__(self, n_modalities: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_modalities))

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.weight.float(), dim=0)
        return (weights[:, None, None] * probs).sum(dim=0)


class _ConfidenceRule(nn.Module):
    """Per sample, the probabilities of the modality whose top probability is highest.

    A hard selection alone sends gradient only to the chosen modality, so a modality that
    starts less confident would never be trained and so never be chosen. In training the
    output is therefore straight-through: its value is the hard selection (the same as in
    eval, so validation measures the rule that is deployed), while its gradient is that of
    the confidence-weighted mixture ``sum_m c_m p_m / sum_m c_m``. Every modality's classifier
    and encoder then learns in proportion to its confidence. In eval the output is the plain
    hard selection (ties go to RGB), which exports to ONNX as ArgMax/Equal/Mul/ReduceSum.
    """

    def __init__(self, n_modalities: int) -> None:
        super().__init__()

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        confidence = probs.amax(dim=-1)  # [M, B]
        chosen = confidence.argmax(dim=0)  # [B]; argmax takes the first of ties
        modality = torch.arange(probs.shape[0], device=probs.device)
        select = (modality[:, None] == chosen[None, :]).to(probs.dtype)
        hard = (select[:, :, None] * probs).sum(dim=0)
        if not self.training:
            return hard
        weights = confidence / confidence.sum(dim=0, keepdim=True)
        soft = (weights[:, :, None] * probs).sum(dim=0)
        return hard + (soft - soft.detach())


_RULES: dict[str, type[nn.Module]] = {
    "mean": _MeanRule,
    "learned": _LearnedRule,
    "confidence": _ConfidenceRule,
}
assert tuple(_RULES) == LATE_RULES, "ModelSpec validates against LATE_RULES; keep them in step"


@register_fusion("late", accepts=("depth", "numeric", "text"))
class LateFusion(FusionModel):
    """An RGB classifier and a second-modality classifier voting with probabilities.

    ``forward`` returns ``log(clamp(p))`` of the combined probabilities ``p``: cross-entropy
    on it is the negative log-likelihood of ``p``, and argmax is the combined prediction.
    ``forward_features`` returns the two pooled feature vectors concatenated.
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
        self.rgb_features = self.backbone.num_features
        self.num_features = self.rgb_features + self.encoder.num_features
        self.rgb_head = classifier(self.rgb_features, spec.num_classes, spec.dropout)
        self.second_head = classifier(self.encoder.num_features, spec.num_classes, spec.dropout)
        self.rule = _RULES[spec.late_rule](2)

    def forward_features(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        rgb = self.backbone(self._take(batch, "rgb"))
        second = self.encoder(self._take(batch, self.modality))
        return torch.cat([rgb, second.to(rgb.dtype)], dim=1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        rgb, second = features.split([self.rgb_features, self.encoder.num_features], dim=1)
        # Softmax and the combination run in fp32 even under autocast: bf16 probabilities
        # near 1 are too coarse for a log.
        logits = torch.stack([self.rgb_head(rgb), self.second_head(second)]).float()
        combined = self.rule(torch.softmax(logits, dim=-1))
        return torch.log(combined.clamp_min(_MIN_PROB))

    def encoders(self) -> dict[str, nn.Module]:
        return {"rgb": self.backbone, self.modality: self.encoder}
