"""TensorRT: a serialized engine plus its sidecar, rebuilt from the ONNX when missing or built elsewhere.

Type-checked against tensorrt-stubs in CI; it runs only on a GPU node with TensorRT installed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from export.tensorrt import EngineRunner, build_engine, load_tensorrt
from service.backends.base import Backend
from service.engine_cache import Node, Want, ensure_engine


def cached_engine(onnx_path: Path, cache_dir: Path, precision: str, max_batch_size: int) -> Path:
    """An engine for this ONNX that fits this GPU and TensorRT, built (once across replicas) when the cache
    has none; the decision is service/engine_cache.py's."""
    trt_module = load_tensorrt()
    major, minor = torch.cuda.get_device_capability()
    node = Node(str(trt_module.__version__), torch.cuda.get_device_name(), f"{major}.{minor}")
    timing_cache = cache_dir / f"timing-{node.tag}.cache"

    def build(onnx: Path, out: Path) -> None:
        build_engine(onnx, out, 1, max(1, max_batch_size // 2), max_batch_size, precision == "fp16", 4.0, timing_cache)

    return ensure_engine(cache_dir, node, Want.of(onnx_path, precision, max_batch_size), build)


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, engine_path: Path, device: torch.device, precision: str, max_batch_size: int) -> None:
        if precision not in ("fp32", "fp16"):  # service/backends/__init__.py's PRECISIONS
            raise ValueError(f"precision {precision} is not supported by the tensorrt backend (fp32, fp16 only)")
        if device.type != "cuda":
            raise ValueError("TensorRT needs a CUDA device")
        self.device, self.precision, self.max_batch_size = device, precision, max_batch_size
        self.runner = EngineRunner(engine_path, device.index)
        self.engine_path = engine_path

    def infer(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.runner(images)

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "engine": self.engine_path.name}
