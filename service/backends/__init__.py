"""Backend selection: `auto` takes TensorRT on a GPU with TensorRT, else ONNX Runtime, else torch."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from model.config import MaskFormerConfig
from model.inference import check_precision as check_device_precision
from model.inference import folds_mask_conv
from service.backends.base import Backend
from service.runtime import choose_backend, cuda_available, driver_requirement, probe
from service.settings import ServeSettings

log = logging.getLogger(__name__)

__all__ = ["PRECISIONS", "Backend", "check_precision", "create_backend", "runs_fp16_graph"]


def resolve_device(setting: str) -> torch.device:
    """`auto`: CUDA when usable. A GPU that torch saw but could not use (a driver too old for torch's CUDA)
    fails `cuda` with torch's reason, and `auto` says it before falling back to the CPU."""
    if setting == "cpu":
        return torch.device("cpu")
    available, problem = cuda_available()
    if available:
        return torch.device("cuda")
    why = "; ".join(filter(None, [problem, driver_requirement(torch.version.cuda)]))
    if setting == "cuda":
        raise RuntimeError(f"--device cuda but no CUDA GPU is usable ({why or 'a CPU-only torch'})")
    if problem:
        log.warning("no usable CUDA GPU (%s): serving on the CPU", why)
    return torch.device("cpu")


# What each backend can run; anything else is refused before an export or build starts, instead of running
# fp32 under another name (and, for TensorRT, missing the engine cache on every start).
PRECISIONS = {"torch": ("fp32", "fp16", "bf16"), "onnxruntime": ("fp32", "fp16"), "tensorrt": ("fp32", "fp16")}


def check_precision(backend: str, precision: str) -> None:
    if precision not in PRECISIONS.get(backend, (precision,)):
        raise ValueError(
            f"precision {precision} is not supported by the {backend} backend "
            f"({', '.join(PRECISIONS[backend])} only); use fp16, or the torch backend for bf16"
        )


def runs_fp16_graph(backend: str, tensorrt_module: Any = None) -> bool:
    """Whether `backend` in fp16 needs the FP16 ONNX rather than the FP32 one.

    ONNX Runtime's CUDA provider runs a graph in the precision it was exported in, so fp16 is the FP16
    graph. TensorRT 10 makes FP16 engines from the FP32 graph with BuilderFlag.FP16 (choosing per layer,
    with LayerNorm, softmax and the mask product pinned to FP32); TensorRT 11 has no such flag and builds
    the FP16 graph as a strongly typed network.
    """
    if backend == "onnxruntime":
        return True
    if backend == "tensorrt":
        if tensorrt_module is None:
            from export.tensorrt import load_tensorrt

            tensorrt_module = load_tensorrt()
        return not hasattr(tensorrt_module.BuilderFlag, "FP16")
    return False


def create_backend(settings: ServeSettings, weights: Path, cfg: MaskFormerConfig) -> Backend:
    device = resolve_device(settings.device)
    name: str = settings.backend
    if name == "auto":
        name, why = choose_backend(probe(), on_cpu=device.type == "cpu")
        log.info("backend auto -> %s: %s", name, why)
    check_precision(name, settings.precision)
    check_device_precision(device, settings.precision)  # before minutes of export for a precision it cannot run
    if name == "tensorrt" and device.type != "cuda":  # likewise, before the export and engine build
        raise ValueError(f"the tensorrt backend needs a CUDA device, not {device.type}")
    if settings.threads and device.type == "cpu":
        torch.set_num_threads(settings.threads)
    if name == "torch":
        from model.checkpoint import load_model
        from service.backends.torch_backend import TorchBackend

        model = load_model(weights)
        return TorchBackend(
            model,
            device,
            settings.precision,
            settings.max_batch_size,
            settings.torch_compile,
            settings.cuda_graphs,
            settings.fold_mask_conv,
        )
    from service.backends.ort_backend import cached_onnx

    fp16_graph = settings.precision == "fp16" and runs_fp16_graph(name)
    fold = name == "onnxruntime" and folds_mask_conv(cfg, device, settings.fold_mask_conv)
    onnx_path = cached_onnx(weights, settings.cache_dir, cfg.input_size, fp16_graph, fold)
    if name == "onnxruntime":
        from service.backends.ort_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(
            onnx_path, device, settings.precision, settings.max_batch_size, settings.cache_dir, settings.threads
        )
    if name == "tensorrt":
        from service.backends.trt_backend import TensorRTBackend, cached_engine

        engine = cached_engine(onnx_path, settings.cache_dir, settings.precision, settings.max_batch_size)
        return TensorRTBackend(engine, device, settings.precision, settings.max_batch_size)
    raise RuntimeError(f"no usable backend: {name}")
