"""Fusion models, one module each; importing this package registers them all."""

from __future__ import annotations

from models.fusions._base import FusionModel
from models.fusions.early import EarlyFusion
from models.fusions.joint import JointFusion
from models.fusions.late import LateFusion
from models.fusions.none import NoFusion

__all__ = ["EarlyFusion", "FusionModel", "JointFusion", "LateFusion", "NoFusion"]
