"""The exported bundle: export (PyTorch -> ONNX) and predict (onnxruntime only)."""
