"""`ModelSpec`: everything needed to rebuild a network, as plain JSON-able values."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from models._registry import get_fusion
from models.backbones import list_backbones, list_implementations

__all__ = ["LATE_RULES", "MODALITIES", "ModelSpec"]

MODALITIES = ("depth", "numeric", "text")
LATE_RULES = ("mean", "learned", "confidence")


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """The architecture of one model; validated on construction.

    ``create_model(ModelSpec.from_dict(spec.to_dict()))`` followed by ``load_state_dict``
    rebuilds the same network, which is what the export bundle relies on.

    Attributes:
        num_classes: Number of output classes.
        backbone: RGB backbone, ``"b0"`` .. ``"b7"`` or ``"lite0"`` .. ``"lite2"``
            (``models.list_backbones()``).
        fusion: A registered fusion (``models.list_fusions()``).
        modality: The second modality, ``None``, ``"depth"``, ``"numeric"`` or ``"text"``.
        resolution: Square input size in pixels (fixes efficientnet-pytorch's static padding).
        dropout: Dropout before every classifier and inside the MLPs.
        numeric_dim: Number of numeric features; required when ``modality == "numeric"``.
        depth_backbone: Size of the depth branch (joint and late fusion); None means the same
            as ``backbone``.
        text_buckets: Hash buckets of the word ids, id 0 (padding) included.
        text_length: Word ids per text.
        text_dim: Width of the word embeddings and of the text features.
        hidden_dim: Width of the numeric MLP and of the joint fusion head.
        late_rule: How late fusion combines class probabilities: ``"mean"``, ``"learned"``
            or ``"confidence"``.
        implementation: ``"efficientnet-pytorch"`` or ``"torchvision"`` for b0..b7; lite
            backbones have one implementation (efficientnet-lite-pytorch) and ignore it.
    """

    num_classes: int
    backbone: str = "b0"
    fusion: str = "none"
    modality: str | None = None
    resolution: int = 224
    dropout: float = 0.2
    numeric_dim: int | None = None
    depth_backbone: str | None = None
    text_buckets: int = 8192
    text_length: int = 64
    text_dim: int = 64
    hidden_dim: int = 256
    late_rule: str = "mean"
    implementation: str = "efficientnet-pytorch"

    def __post_init__(self) -> None:
        _check_ints(self)
        _check_choices(self)
        if (
            not isinstance(self.dropout, int | float)
            or isinstance(self.dropout, bool)
            or not 0.0 <= self.dropout < 1.0
        ):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.modality == "numeric" and self.numeric_dim is None:
            raise ValueError("numeric_dim is required when modality is 'numeric'")

    @property
    def depth_backbone_name(self) -> str:
        """The depth branch's size, with None resolved to ``backbone``."""
        return self.depth_backbone or self.backbone

    @property
    def input_names(self) -> tuple[str, ...]:
        """Batch keys the model reads, in the order an exported graph takes them."""
        if self.fusion == "none" or self.modality is None:
            return ("rgb",)
        return ("rgb", self.modality)

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-serializable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        """Build a spec from :meth:`to_dict` output (e.g. after a JSON round trip).

        Raises:
            ValueError: Unknown or missing keys, or an invalid value.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelSpec keys {unknown}; known keys are {sorted(known)}")
        if "num_classes" not in data:
            raise ValueError("ModelSpec needs 'num_classes'")
        return cls(**data)


def _check_ints(spec: ModelSpec) -> None:
    minimum = {
        "num_classes": 1,
        "resolution": 8,
        "text_buckets": 2,
        "text_length": 1,
        "text_dim": 1,
        "hidden_dim": 1,
        "numeric_dim": 1,
    }
    for name, low in minimum.items():
        value = getattr(spec, name)
        if value is None and name == "numeric_dim":
            continue
        # bool is an int subclass; True as a class count is a bug upstream, not a 1.
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_choices(spec: ModelSpec) -> None:
    backbones = list_backbones()
    if spec.backbone not in backbones:
        raise ValueError(f"unknown backbone {spec.backbone!r}; choose from {backbones}")
    if spec.depth_backbone is not None and spec.depth_backbone not in backbones:
        raise ValueError(f"unknown depth_backbone {spec.depth_backbone!r}; choose from {backbones}")
    if spec.implementation not in list_implementations():
        raise ValueError(
            f"unknown implementation {spec.implementation!r}; choose from {list_implementations()}"
        )
    if spec.modality is not None and spec.modality not in MODALITIES:
        raise ValueError(f"unknown modality {spec.modality!r}; choose from None or {MODALITIES}")
    if spec.late_rule not in LATE_RULES:
        raise ValueError(f"unknown late_rule {spec.late_rule!r}; choose from {LATE_RULES}")
    accepts = get_fusion(spec.fusion).accepts
    if spec.modality not in accepts:
        wanted = "RGB alone" if spec.modality is None else f"modality {spec.modality!r}"
        usable = sorted(m for m in accepts if m is not None)
        raise ValueError(f"fusion {spec.fusion!r} cannot use {wanted}; it accepts {usable}")
