"""TensorRT: a serialized engine plus its sidecar, rebuilt from the ONNX when missing or built elsewhere.

Type-checked against tensorrt-stubs in CI; it runs only on a GPU node with TensorRT installed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

from export.tensorrt import EngineRunner, EngineSidecar, build_engine, engine_matches, load_tensorrt, sha256
from service.backends.base import Backend

log = logging.getLogger(__name__)


def cached_engine(onnx_path: Path, cache_dir: Path, precision: str, max_batch_size: int) -> Path:
    """An engine for this ONNX that fits this GPU and TensorRT, building one when the cache has none."""
    trt_module = load_tensorrt()
    major, minor = torch.cuda.get_device_capability()
    engine = cache_dir / f"{onnx_path.stem}-{precision}-b{max_batch_size}-sm{major}{minor}.engine"
    if engine.is_file() and Path(str(engine) + ".json").is_file():
        sidecar = EngineSidecar.read(engine)
        ok, why = engine_matches(sidecar, str(trt_module.__version__), f"{major}.{minor}", sha256(onnx_path))
        if ok and sidecar.profile["max"] >= max_batch_size and sidecar.precision == precision:
            return engine
        log.warning("cached engine %s does not fit (%s); rebuilding", engine, why)
    log.info("building a TensorRT engine at %s (minutes; cached for the next start)", engine)
    build_engine(
        onnx_path,
        engine,
        1,
        max(1, max_batch_size // 2),
        max_batch_size,
        precision == "fp16",
        timing_cache=cache_dir / "timing.cache",
    )
    return engine


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, engine_path: Path, device: torch.device, precision: str, max_batch_size: int) -> None:
        if device.type != "cuda":
            raise ValueError("TensorRT needs a CUDA device")
        self.device, self.precision, self.max_batch_size = device, precision, max_batch_size
        self.runner = EngineRunner(engine_path, device.index)
        self.engine_path = engine_path

    def infer(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.runner(images)

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "engine": self.engine_path.name}
