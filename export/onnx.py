"""Checkpoint -> ONNX with a dynamic batch axis, checked and compared against PyTorch.

The graph input is `images`: uint8 RGB [N, 3, H, W]. uint8 moves 4x fewer bytes from host to device than
float32; the cast and the normalisation with the checkpoint's mean/std happen inside the graph. H and W are
static (by default the checkpoint's input size), so positional encodings and attention shapes are
constants for TensorRT; only the batch varies. The outputs are the raw `pred_logits` [N, Q, K+1] and
`pred_masks` [N, Q, H/4, W/4]: post-processing stays outside, so one graph serves every task.
`fp16=True` exports the FP16 graph of export/onnx_fp16.py instead (outputs still float32).
`fold_mask_conv=True` exports the mask head folded into the pixel decoder's last conv (model/heads.py):
fewer FLOPs for ONNX Runtime on the CPU, but through Col2Im, which TensorRT does not parse.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from model.maskformer import MaskFormer
from model.postprocess import postprocess

log = logging.getLogger(__name__)

INPUT = "images"
OUTPUTS = ("pred_logits", "pred_masks")
MAX_ABS_DIFF = 1e-3
MIN_FP16_AGREEMENT = 0.99  # FP16 graphs pass on semantic agreement; their diffs are reported


class ExportWrapper(nn.Module):
    """uint8 images in, the two raw outputs out."""

    def __init__(self, model: MaskFormer) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(images.float())
        return out["pred_logits"], out["pred_masks"]  # type: ignore[return-value]


@dataclass
class ParityReport:
    onnx_sha256: str
    input_shape: list[int | str]
    opset: int
    batches: dict[str, dict[str, float]]  # batch size -> max abs diffs and semantic agreement
    max_abs_diff: float
    passed: bool
    precision: str = "fp32"
    pass_rule: str = f"max_abs_diff <= {MAX_ABS_DIFF}"
    node_precision: dict[str, dict[str, int]] = field(default_factory=dict)  # dtype -> op type -> nodes


def export_onnx(
    model: MaskFormer,
    out: str | Path,
    size: tuple[int, int] | None = None,
    max_batch: int = 16,
    opset: int = 18,
    simplify: bool = True,
    fp16: bool = False,
    fold_mask_conv: bool = False,
) -> Path:
    """Write `out` (a .onnx file) with the model's metadata in the graph's metadata_props."""
    import onnx

    from export.onnx_fp16 import half_model

    out = Path(out)
    size = size or model.cfg.input_size
    if any(s <= 0 or s % 32 for s in size):
        raise ValueError(f"height and width {size} must be positive multiples of 32")
    if max_batch < 1:
        raise ValueError(f"max batch {max_batch} must be at least 1")
    if opset < 17:
        raise ValueError(f"opset {opset} splits LayerNorm into several nodes; use 17 or later")
    model = model.eval().cpu()
    if fold_mask_conv:
        if fp16:
            raise ValueError("fold_mask_conv is for ONNX Runtime on the CPU; the FP16 graph is for TensorRT")
        if model.attend_pixel_embedding:
            raise ValueError("this model's decoder attends the pixel embedding: its mask head cannot be folded")
        model = copy.deepcopy(model)  # the caller's model keeps its own forward
        model.fold_mask_conv = True
    example = torch.zeros(2, 3, *size, dtype=torch.uint8)  # 2: torch.export specialises an axis of size 1
    # The ONNX batch axis is symbolic whatever its bound; a bound below the example's cannot be traced.
    batch = torch.export.Dim("batch", min=1, max=max(max_batch, 2))
    program = torch.onnx.export(
        ExportWrapper(half_model(model) if fp16 else model).eval(),
        (example,),
        dynamo=True,
        input_names=[INPUT],
        output_names=list(OUTPUTS),
        dynamic_shapes=({0: batch},),
        opset_version=opset,
    )
    assert program is not None
    out.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(out))
    graph = onnx.load(str(out))
    if simplify:
        graph = _simplify(graph)
    info = model.info
    meta = {
        "maskformer.config": json.dumps(model.cfg.to_dict()),
        "maskformer.info": json.dumps(asdict(info)) if info else "",
        "maskformer.input_size": json.dumps(list(size)),
        "maskformer.input_dtype": "uint8",
        "maskformer.precision": "fp16" if fp16 else "fp32",
        "maskformer.fold_mask_conv": json.dumps(fold_mask_conv),
    }
    del graph.metadata_props[:]
    for key, value in meta.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(out))
    onnx.checker.check_model(str(out), full_check=True)
    return out


def _simplify(graph):
    """Constant folding and graph clean-up with onnxslim when it is installed."""
    try:
        import onnxslim
    except ImportError:
        log.info("onnxslim is not installed; the graph is saved unsimplified")
        return graph
    return onnxslim.slim(graph)


def parity_report(
    model: MaskFormer, onnx_path: str | Path, batches: tuple[int, ...] = (1, 4), seed: int = 0
) -> ParityReport:
    """ONNX Runtime (CPU) against PyTorch (float32) on the same random uint8 images, per batch size: the
    max abs diff of both outputs and the share of pixels whose semantic label agrees. An FP32 graph passes
    on the max diff, an FP16 one on the agreement; its report also counts the nodes per dtype."""
    import onnx
    import onnxruntime as ort

    onnx_path = Path(onnx_path)
    graph = onnx.load(str(onnx_path), load_external_data=False)
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    shape: list[int | str] = [d.dim_param or d.dim_value for d in dims]
    size = (int(shape[2]), int(shape[3]))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(seed)
    results = {
        str(n): compare(model, session, torch.randint(0, 256, (n, 3, *size), dtype=torch.uint8, generator=g))
        for n in batches
    }
    # np.max, not max(): a NaN anywhere must fail the check, not be skipped by a comparison
    worst = float(np.max([v for r in results.values() for k, v in r.items() if k.startswith("max_abs_diff")]))
    report = ParityReport(
        onnx_sha256=hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
        input_shape=shape,
        opset=int(graph.opset_import[0].version),
        batches=results,
        max_abs_diff=worst,
        passed=worst <= MAX_ABS_DIFF,
    )
    if onnx_precision(graph) == "fp16":
        from export.onnx_fp16 import node_precision

        report.precision = "fp16"
        report.pass_rule = f"semantic_agreement >= {MIN_FP16_AGREEMENT}"
        report.passed = min(r["semantic_agreement"] for r in results.values()) >= MIN_FP16_AGREEMENT
        report.node_precision = node_precision(graph)
    return report


def compare(model: MaskFormer, session, images: Tensor) -> dict[str, float]:
    """One uint8 batch through ONNX Runtime and PyTorch: max abs diff of both outputs, semantic agreement."""
    isthing = model.info.isthing if model.info else [True] * model.cfg.num_classes
    with torch.no_grad():
        ref = ExportWrapper(model.eval().cpu())(images)
    got = session.run(list(OUTPUTS), {INPUT: images.numpy()})
    diffs = {name: float(np.abs(o - r.numpy()).max()) for name, o, r in zip(OUTPUTS, got, ref)}
    ours = postprocess(dict(zip(OUTPUTS, ref)), "semantic", isthing)
    theirs = postprocess({k: torch.from_numpy(v) for k, v in zip(OUTPUTS, got)}, "semantic", isthing)
    agree = np.mean([(a.label_map() == b.label_map()).float().mean().item() for a, b in zip(ours, theirs)])
    return {**{f"max_abs_diff_{k}": v for k, v in diffs.items()}, "semantic_agreement": float(agree)}


def onnx_metadata(graph_or_path) -> dict[str, str]:
    """The `maskformer.*` (and any other) metadata_props of a graph or .onnx file."""
    import onnx

    if isinstance(graph_or_path, (str, Path)):
        graph_or_path = onnx.load(str(graph_or_path), load_external_data=False)
    return {p.key: p.value for p in graph_or_path.metadata_props}


def onnx_precision(graph_or_path) -> str:
    """The graph's precision: fp16 from `export_onnx(fp16=True)`, else fp32 (also where the key is absent)."""
    return onnx_metadata(graph_or_path).get("maskformer.precision", "fp32")


def onnx_folds_mask_conv(graph_or_path) -> bool:
    """Whether the graph was exported with `fold_mask_conv=True` (false where the key is absent)."""
    return json.loads(onnx_metadata(graph_or_path).get("maskformer.fold_mask_conv", "false"))


def write_report(report: ParityReport, onnx_path: str | Path) -> Path:
    """The JSON sidecar next to the model: `model.onnx` -> `model.onnx.json`."""
    path = Path(str(onnx_path) + ".json")
    path.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return path
