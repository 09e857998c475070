"""ONNX -> TensorRT engine with the TensorRT Python API, and the JSON sidecar that says what the engine
was built for (so a cached engine is reused only on a matching node).

TensorRT 10.x: FP16 through BuilderFlag.FP16, with LayerNorm, softmax and the final mask product pinned
to FP32 (their FP16 ranges overflow). TensorRT 11 removed BuilderFlag.FP16 in favour of strongly typed
networks, which take their precision from the ONNX itself: an FP16 ONNX (`export onnx --fp16`, the same
ops kept in FP32) builds strongly typed on either version. FP32 engines build on both.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # type-checked against tensorrt-stubs; imported for real only where it runs
    import tensorrt as trt

log = logging.getLogger(__name__)

INPUT = "images"


class TensorRTUnavailable(RuntimeError):
    """TensorRT (the library, not just its type stubs) is not installed."""


def load_tensorrt() -> ModuleType:
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as err:
        raise TensorRTUnavailable("TensorRT is not installed; on a GPU node: pip install '.[gpu]'") from err
    if not hasattr(trt, "Builder"):  # tensorrt-stubs alone make `import tensorrt` succeed
        raise TensorRTUnavailable("only TensorRT's type stubs are installed, not the library")
    return trt


@dataclass
class EngineSidecar:
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"
    onnx_sha256: str
    input_shape: list[int]  # C, H, W (the batch comes from the profile)
    profile: dict[str, int]  # min, opt, max batch
    precision: str  # "fp32" | "fp16"

    def write(self, engine_path: str | Path) -> Path:
        path = Path(str(engine_path) + ".json")
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, engine_path: str | Path) -> EngineSidecar:
        return cls(**json.loads(Path(str(engine_path) + ".json").read_text()))


def engine_matches(
    sidecar: EngineSidecar, tensorrt_version: str, compute_capability: str, onnx_sha256: str
) -> tuple[bool, str]:
    """Whether an engine built as `sidecar` says can run here for this ONNX, and why not if not.

    Engines are specific to the TensorRT version and the GPU architecture; the ONNX digest catches a
    re-exported model behind an unchanged file name.
    """
    if sidecar.tensorrt_version != tensorrt_version:
        return False, f"built with TensorRT {sidecar.tensorrt_version}, this node has {tensorrt_version}"
    if sidecar.compute_capability != compute_capability:
        return False, f"built for compute capability {sidecar.compute_capability}, this GPU is {compute_capability}"
    if sidecar.onnx_sha256 != onnx_sha256:
        return False, "built from a different ONNX file"
    return True, "matches"


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _keep_fp32(network: trt.INetworkDefinition) -> int:
    """Pin LayerNorm, softmax and the last matmul (the mask product) to FP32; returns how many layers."""
    import tensorrt as trt

    matmuls = []
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in (trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX):
            layer.precision = trt.float32
            layer.set_output_type(0, trt.float32)
            pinned += 1
        elif layer.type == trt.LayerType.MATRIX_MULTIPLY:
            matmuls.append(layer)
    if matmuls:
        matmuls[-1].precision = trt.float32
        matmuls[-1].set_output_type(0, trt.float32)
        pinned += 1
    for i in range(network.num_outputs):
        network.get_output(i).dtype = trt.float32
    return pinned


def build_engine(
    onnx_path: str | Path,
    out: str | Path,
    min_batch: int = 1,
    opt_batch: int = 4,
    max_batch: int = 8,
    fp16: bool = False,
    workspace_gib: float = 4.0,
    timing_cache: str | Path | None = None,
) -> EngineSidecar:
    """Build and write a serialized engine plus its sidecar (`out.json`)."""
    import torch

    load_tensorrt()
    import tensorrt as trt

    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= min ({min_batch}) <= opt ({opt_batch}) <= max ({max_batch}) batch")
    from export.onnx import onnx_folds_mask_conv, onnx_precision

    if onnx_folds_mask_conv(onnx_path):
        raise ValueError(
            f"{onnx_path} folds the mask head for ONNX Runtime on the CPU (Col2Im, which TensorRT does not "
            "parse); export the ONNX without --fold-mask-conv"
        )
    typed = onnx_precision(onnx_path) == "fp16"  # the graph carries its precision: a strongly typed network
    if typed and not fp16:  # the sidecar's precision must be the one asked for (service/engine_cache.py)
        raise ValueError(f"{onnx_path} is an FP16 graph, which builds FP16 engines only: pass --fp16")
    if fp16 and not typed and not hasattr(trt.BuilderFlag, "FP16"):
        raise ValueError(
            f"TensorRT {trt.__version__} has no BuilderFlag.FP16: it builds strongly typed networks from an "
            "FP16 ONNX; export one with `maskformer export onnx --fp16`"
        )
    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT needs a CUDA GPU")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # explicit batch is the only mode in TensorRT 10+
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if typed else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"TensorRT could not parse {onnx_path}:\n{errors}")

    image = network.get_input(0)
    if image.name != INPUT:
        raise ValueError(f"expected the graph input {INPUT!r}, found {image.name!r}")
    c, h, w = int(image.shape[1]), int(image.shape[2]), int(image.shape[3])
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    profile.set_shape(
        INPUT, trt.Dims([min_batch, c, h, w]), trt.Dims([opt_batch, c, h, w]), trt.Dims([max_batch, c, h, w])
    )
    config.add_optimization_profile(profile)
    if fp16 and not typed:  # strongly typed networks refuse precision flags and per-layer precisions
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        log.info("pinned %d layers to FP32", _keep_fp32(network))

    cache_path = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see its log above)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(bytes(serialized))
    if cache_path:
        # Beside it and renamed: the cache is shared by builds of other engines (other locks), which may be
        # reading it now; a reader sees the old file or the new one, never half of one.
        tmp = cache_path.with_name(f"{cache_path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
            os.replace(tmp, cache_path)
        finally:
            tmp.unlink(missing_ok=True)

    major, minor = torch.cuda.get_device_capability()
    sidecar = EngineSidecar(
        tensorrt_version=str(trt.__version__),
        gpu_name=torch.cuda.get_device_name(),
        compute_capability=f"{major}.{minor}",
        onnx_sha256=sha256(onnx_path),
        input_shape=[c, h, w],
        profile={"min": min_batch, "opt": opt_batch, "max": max_batch},
        precision="fp16" if fp16 else "fp32",
    )
    sidecar.write(out)
    return sidecar


class EngineRunner:
    """Runs a serialized engine on CUDA tensors: uint8 images in, the two raw outputs out (FP32)."""

    def __init__(self, engine_path: str | Path, device: int | None = None) -> None:
        import torch

        trt_module = load_tensorrt()
        self.device = torch.device("cuda", torch.cuda.current_device() if device is None else device)
        self.logger = trt_module.Logger(trt_module.Logger.WARNING)
        runtime: trt.Runtime = trt_module.Runtime(self.logger)
        engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if engine is None:
            raise RuntimeError(f"TensorRT could not load {engine_path}")
        self.engine: trt.ICudaEngine = engine
        self.context: trt.IExecutionContext = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt_module.TensorIOMode.OUTPUT]
        self.stream = torch.cuda.Stream(self.device)

    def __call__(self, images):  # uint8 [B, 3, H, W] on any device -> (pred_logits, pred_masks) on the GPU
        import torch

        # inputs already on the GPU (service/decode_gpu.py) were stacked on the caller's stream
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            x = images.to(self.device, non_blocking=True).contiguous()
            self.context.set_input_shape(INPUT, tuple(x.shape))
            self.context.set_tensor_address(INPUT, x.data_ptr())
            out = {}
            for name in self.outputs:
                dims = self.context.get_tensor_shape(name)
                out[name] = torch.empty([int(dims[i]) for i in range(len(dims))], device=self.device)
                self.context.set_tensor_address(name, out[name].data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()
        return out["pred_logits"], out["pred_masks"]


def verify_engine(
    engine_path: str | Path, onnx_path: str | Path, batches: tuple[int, ...] = (1,), seed: int = 0
) -> dict[str, dict[str, float]]:
    """The engine against ONNX Runtime (CPU, FP32) on the same random images: per batch size, the max abs
    logits diff and the share of pixels whose semantic label agrees (the FP16 target is >= 99 %)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from model.postprocess import postprocess

    runner = EngineRunner(engine_path)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    isthing = [True] * (int(session.get_outputs()[0].shape[-1]) - 1)  # the semantic map ignores thing flags
    g = torch.Generator().manual_seed(seed)
    results = {}
    for n in batches:
        images = torch.randint(0, 256, (n, 3, int(shape[2]), int(shape[3])), dtype=torch.uint8, generator=g)
        logits, masks = (t.float().cpu() for t in runner(images))
        ref_logits, ref_masks = session.run(["pred_logits", "pred_masks"], {INPUT: images.numpy()})
        ours = postprocess({"pred_logits": logits, "pred_masks": masks}, "semantic", isthing)
        ref = {"pred_logits": torch.from_numpy(ref_logits), "pred_masks": torch.from_numpy(ref_masks)}
        theirs = postprocess(ref, "semantic", isthing)
        agree = np.mean([(a.label_map() == b.label_map()).float().mean().item() for a, b in zip(ours, theirs)])
        results[str(n)] = {
            "max_abs_diff_pred_logits": float(np.abs(logits.numpy() - ref_logits).max()),
            "semantic_agreement": float(agree),
        }
    return results
