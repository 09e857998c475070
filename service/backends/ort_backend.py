"""ONNX Runtime: the CPU provider, or the CUDA / TensorRT execution providers on a GPU.

The ONNX file is exported from the checkpoint on first start and cached under the checkpoint's digest and
the exporter's versions, so later starts (and other replicas sharing the cache) skip the export, and an
image with another exporter exports afresh instead of reusing a graph the old one wrote.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from export.tensorrt import sha256
from service.backends.base import Backend
from service.engine_cache import file_lock

log = logging.getLogger(__name__)


# The distributions whose versions decide what the export writes: this package (the model code and
# export/onnx.py), torch's exporter, onnx, onnxscript and onnxslim.
EXPORTER = ("maskformer-serving", "torch", "onnx", "onnxscript", "onnxslim")


def exporter_tag() -> str:
    """8 hex digits of a hash of EXPORTER's versions: part of the cached ONNX's name."""
    versions = []
    for dist in EXPORTER:
        try:
            versions.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist} absent")
    return hashlib.sha256("\n".join(versions).encode()).hexdigest()[:8]


def onnx_cache_path(
    weights: Path, cache_dir: Path, input_size: tuple[int, int], fp16: bool = False, fold_mask_conv: bool = False
) -> Path:
    """`<checkpoint sha256, 16 digits>-<H>x<W>[-fp16][-fold]-e<exporter tag>.onnx` in the cache."""
    variant = ("-fp16" if fp16 else "") + ("-fold" if fold_mask_conv else "")
    return cache_dir / f"{sha256(weights)[:16]}-{input_size[0]}x{input_size[1]}{variant}-e{exporter_tag()}.onnx"


def cached_onnx(
    weights: Path, cache_dir: Path, input_size: tuple[int, int], fp16: bool = False, fold_mask_conv: bool = False
) -> Path:
    """The exported ONNX for this checkpoint, input size, variant and exporter, exported if not cached yet.

    fp16: the FP16 graph of export/onnx_fp16.py (norms, softmax, heads and mask product in FP32).
    fold_mask_conv: the mask head folded into the last conv (export/onnx.py), for the CPU provider.
    """
    from export.onnx import export_onnx
    from model.checkpoint import load_model

    path = onnx_cache_path(weights, cache_dir, input_size, fp16, fold_mask_conv)
    if path.is_file():
        return path
    with file_lock(path.with_name(path.name + ".lock")):  # replicas sharing the cache export once
        if path.is_file():
            log.info("another process exported %s while this one waited", path)
            return path
        log.info("exporting %s to %s (first start; cached for the next)", weights, path)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.onnx")
        try:
            export_onnx(load_model(weights), tmp, input_size, max_batch=64, fp16=fp16, fold_mask_conv=fold_mask_conv)
            tmp.replace(path)  # atomic: a reader that skips the lock never sees half a file
        finally:
            tmp.unlink(missing_ok=True)
    return path


def providers(device: torch.device, precision: str, cache_dir: Path) -> list[str | tuple[str, dict[str, str]]]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    chosen: list[str | tuple[str, dict[str, str]]] = []
    if device.type == "cuda":
        if "TensorrtExecutionProvider" in available:
            trt_options = {
                "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": str(cache_dir / "ort-trt"),
                "trt_timing_cache_enable": "True",
                "trt_fp16_enable": str(precision == "fp16"),
            }
            chosen.append(("TensorrtExecutionProvider", trt_options))
        if "CUDAExecutionProvider" in available:
            chosen.append(("CUDAExecutionProvider", {"device_id": str(device.index or 0)}))
        if not chosen:
            raise RuntimeError(f"ONNX Runtime has no GPU provider here (available: {', '.join(available)})")
    elif precision != "fp32":
        raise ValueError(f"{precision} needs a GPU provider; use fp32 on the CPU")
    chosen.append("CPUExecutionProvider")
    return chosen


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(
        self,
        onnx_path: Path,
        device: torch.device,
        precision: str,
        max_batch_size: int,
        cache_dir: Path,
        threads: int | None = None,
    ) -> None:
        if precision not in ("fp32", "fp16"):  # service/backends/__init__.py's PRECISIONS
            raise ValueError(f"precision {precision} is not supported by the onnxruntime backend (fp32, fp16 only)")
        import onnxruntime as ort
        from onnxruntime.capi import onnxruntime_pybind11_state as state

        self.device, self.precision, self.max_batch_size = device, precision, max_batch_size
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.enable_cpu_mem_arena = True  # reuse activation buffers across runs
        options.enable_mem_pattern = True  # plan them once per input shape
        # Post-processing runs on the same cores right after each run: threads that spin waiting for the
        # next run would take those cores from it.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                str(onnx_path), options, providers=providers(device, precision, cache_dir)
            )
        except (state.InvalidProtobuf, state.InvalidGraph, state.NoModel, state.Fail) as err:
            raise RuntimeError(
                f"{onnx_path} is not a usable ONNX file ({err}); if it is a cached export, delete it and the "
                "next start exports it again"
            ) from None
        self.onnx_path = onnx_path
        self.graph_metadata: dict[str, str] = self.session.get_modelmeta().custom_metadata_map

    def infer(self, images: Tensor) -> tuple[Tensor, Tensor]:
        logits, masks = self.session.run(None, {"images": np.ascontiguousarray(images.numpy())})
        return torch.from_numpy(logits).to(self.device), torch.from_numpy(masks).to(self.device)

    def describe(self) -> dict[str, object]:
        return {
            **super().describe(),
            "providers": self.session.get_providers(),
            "onnx": self.onnx_path.name,
            "fold_mask_conv": json.loads(self.graph_metadata.get("maskformer.fold_mask_conv", "false")),
        }
