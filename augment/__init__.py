"""Class balancing of a training split with Augmentor, identical for every image modality.

``augment`` is pure and deterministic: it works on in-memory (or memory-mapped) ``uint8``
arrays, reads and writes no files, and knows nothing of models or Optuna. Callers must pass the
training split only; see :func:`balance`.
"""

from __future__ import annotations

from augment.balance import (
    STRATEGIES,
    BalancedSet,
    balance,
    get_strategy,
    inverse_frequency_weights,
    list_strategies,
)
from augment.crop import crop_batch, draw_boxes, source_size
from augment.fused import posed_crops
from augment.online import ONLINE_OPS, draw_poses, flip_batch, online_ops
from augment.ops import OPS, OpSpec, list_ops, validate_ops
from augment.pipeline import augment_rows, augment_sample, build_pipeline
from augment.seeding import seeded_global_rngs

__all__ = [
    "ONLINE_OPS",
    "OPS",
    "STRATEGIES",
    "BalancedSet",
    "OpSpec",
    "augment_rows",
    "augment_sample",
    "balance",
    "build_pipeline",
    "crop_batch",
    "draw_boxes",
    "draw_poses",
    "flip_batch",
    "get_strategy",
    "inverse_frequency_weights",
    "list_ops",
    "list_strategies",
    "online_ops",
    "posed_crops",
    "seeded_global_rngs",
    "source_size",
    "validate_ops",
]
