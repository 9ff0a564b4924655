"""The base class every fusion model derives from."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from models.backbones import Backbone

if TYPE_CHECKING:
    from models._spec import ModelSpec

__all__ = ["FusionModel", "classifier"]


class FusionModel(nn.Module, abc.ABC):
    """A classifier over a batch dict ``{"rgb": ..., <modality>: ...}``.

    ``forward(batch) == forward_head(forward_features(batch))`` returns logits
    ``[B, num_classes]``. Keys the fusion does not use are ignored.

    Attributes:
        name: The registered fusion name (set by ``register_fusion``).
        accepts: Second modalities the fusion can use (set by ``register_fusion``).
        spec: The spec the model was built from.
        num_features: Width of ``forward_features``' output.
    """

    name: ClassVar[str]
    accepts: ClassVar[frozenset[str | None]]

    def __init__(
        self, spec: ModelSpec, *, pretrained: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        # Every fusion is built as ``cls(spec, pretrained=...)`` (models.create_model); the
        # subclasses load ``pretrained`` into the backbones they create.
        super().__init__()
        self.spec = spec
        self.num_classes = spec.num_classes
        self.num_features = 0

    @property
    def input_names(self) -> tuple[str, ...]:
        """Batch keys read by ``forward``, in the order an exported graph takes them."""
        return self.spec.input_names

    @abc.abstractmethod
    def forward_features(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Return pooled features ``[B, num_features]``."""

    @abc.abstractmethod
    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Map ``forward_features``' output to logits ``[B, num_classes]``."""

    @abc.abstractmethod
    def encoders(self) -> dict[str, nn.Module]:
        """Return the module that encodes each modality read (the same one may appear twice)."""

    def backbones(self) -> list[Backbone]:
        """The EfficientNet trunks, each once: what ImageNet weights start and fine-tuning
        treats apart (frozen first, a smaller learning rate). Everything else (heads, fusion
        layers, numeric and text encoders) always trains at the full rate."""
        found: list[Backbone] = []
        for module in self.encoders().values():
            if isinstance(module, Backbone) and all(module is not b for b in found):
                found.append(module)
        return found

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_head(self.forward_features(batch))

    def _take(self, batch: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
        if key not in batch:
            raise KeyError(
                f"batch has no {key!r}; fusion {self.name!r} reads {list(self.input_names)}"
            )
        return batch[key]


def classifier(in_features: int, num_classes: int, dropout: float) -> nn.Sequential:
    """The usual EfficientNet head: dropout, then one linear layer."""
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))
