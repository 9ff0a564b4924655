"""The bundle's file names and format tag, shared by export (PyTorch) and predict (no PyTorch)."""

from __future__ import annotations

ONNX_FILE = "model.onnx"
WEIGHTS_FILE = "weights.safetensors"
META_FILE = "model.json"
BUNDLE_FORMAT = "fusion-search bundle"
BUNDLE_VERSION = 1
