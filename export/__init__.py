"""Checkpoint -> ONNX (dynamic batch) -> TensorRT engine, with parity reports."""
