"""fusion-search: Optuna hyperparameter search for multi-modal EfficientNet classifiers."""

from __future__ import annotations

__version__ = "0.1.0"
