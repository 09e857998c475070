"""A Triton Inference Server model repository from our ONNX (or a TensorRT engine built from it).

Layout: REPO/NAME/config.pbtxt and REPO/NAME/1/model.onnx (or model.plan). Triton then serves the raw
outputs with its own dynamic batching; post-processing stays with the client (model/postprocess.py), as
with our own service. Shapes come from the ONNX graph, whose batch axis is the dynamic one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from model.atomic_write import replace_atomically

TRITON_TYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 10: "TYPE_FP16"}  # onnx.TensorProto element types


def _tensors(values) -> list[tuple[str, str, list[int]]]:
    out = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        if dims[0] != -1:
            raise ValueError(f"{v.name}: the first axis must be the dynamic batch, got {dims}")
        if t.elem_type not in TRITON_TYPES:
            raise ValueError(f"{v.name}: element type {t.elem_type} has no Triton mapping here")
        out.append((v.name, TRITON_TYPES[t.elem_type], dims[1:]))
    return out


def _block(kind: str, tensors: list[tuple[str, str, list[int]]]) -> str:
    items = ",\n".join(
        f'  {{\n    name: "{name}"\n    data_type: {dtype}\n    dims: [ {", ".join(map(str, dims))} ]\n  }}'
        for name, dtype, dims in tensors
    )
    return f"{kind} [\n{items}\n]\n"


def config_pbtxt(
    onnx_path: str | Path,
    name: str,
    platform: str,
    max_batch_size: int,
    max_queue_delay_us: int = 5000,
    instances: int = 1,
    gpu: bool = True,
) -> str:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        graph = onnx.load(str(onnx_path), load_external_data=False)
    except DecodeError as err:
        raise ValueError(f"{onnx_path} is not an ONNX model ({err})") from None
    meta = {p.key: p.value for p in graph.metadata_props}
    preferred = sorted({b for b in (max_batch_size // 2, max_batch_size) if b >= 1})
    text = (
        f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: {max_batch_size}\n'
        + _block("input", _tensors(graph.graph.input))
        + _block("output", _tensors(graph.graph.output))
        + "dynamic_batching {\n"
        + f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
        + f"  max_queue_delay_microseconds: {max_queue_delay_us}\n}}\n"
        + f"instance_group [\n  {{\n    count: {instances}\n    kind: {'KIND_GPU' if gpu else 'KIND_CPU'}\n  }}\n]\n"
    )
    for key in ("maskformer.info", "maskformer.input_size"):
        if key in meta:  # class names and thing flags travel with the model, for the client's post-processing
            value = json.dumps(meta[key], ensure_ascii=False)  # a quoted, escaped string, valid in text format
            text += f'parameters {{\n  key: "{key}"\n  value: {{ string_value: {value} }}\n}}\n'
    return text


def _check_engine(engine: Path, onnx_path: Path, max_batch_size: int) -> None:
    """The engine must come from this ONNX (the config's shapes are read from it) and take max_batch_size."""
    from export.tensorrt import EngineSidecar, sha256

    try:
        sidecar = EngineSidecar.read(engine)
    except FileNotFoundError:
        raise ValueError(f"{engine} has no sidecar {engine}.json; build it with `maskformer export tensorrt`") from None
    if sidecar.onnx_sha256 != sha256(onnx_path):
        raise ValueError(f"{engine} was built from another ONNX file than {onnx_path}")
    if max_batch_size > sidecar.profile["max"]:
        raise ValueError(
            f"max batch {max_batch_size} is above the engine's profile maximum {sidecar.profile['max']}; "
            "rebuild it with a larger --max-batch or lower this one"
        )


def write_repository(
    onnx_path: str | Path,
    repo: str | Path,
    name: str = "maskformer",
    engine: str | Path | None = None,
    max_batch_size: int = 8,
    max_queue_delay_us: int = 5000,
    instances: int = 1,
    gpu: bool = True,
) -> Path:
    """Write REPO/NAME/{config.pbtxt, 1/model.onnx|model.plan}; returns the config path.

    Everything is checked before anything is written, and each file is replaced whole, so a bad argument
    leaves an existing repository as it was."""
    for value, what in ((max_batch_size, "max batch"), (instances, "instances")):
        if value < 1:
            raise ValueError(f"{what} {value} must be at least 1")
    if max_queue_delay_us < 0:
        raise ValueError(f"max queue delay {max_queue_delay_us} us must be at least 0")
    if engine is not None:
        if not gpu:
            raise ValueError("a TensorRT engine runs on the GPU only")
        _check_engine(Path(engine), Path(onnx_path), max_batch_size)
    platform = "tensorrt_plan" if engine else "onnxruntime_onnx"
    text = config_pbtxt(onnx_path, name, platform, max_batch_size, max_queue_delay_us, instances, gpu)
    model_dir = Path(repo) / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    kept, stale = ("model.plan", "model.onnx") if engine else ("model.onnx", "model.plan")
    replace_atomically(model_dir / "1" / kept, lambda tmp: shutil.copyfile(engine or onnx_path, tmp))
    config = model_dir / "config.pbtxt"
    replace_atomically(config, lambda tmp: tmp.write_text(text))
    (model_dir / "1" / stale).unlink(missing_ok=True)  # the other platform's file: the config no longer names it
    return config
