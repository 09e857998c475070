"""FP16 ONNX for TensorRT's strongly typed networks: strict type inference, which ops run in FP32, and
parity with the float32 PyTorch model through ONNX Runtime (CPU) and ONNX's reference evaluator."""

import json

import numpy as np
import onnx
import torch
from onnx.reference import ReferenceEvaluator
from torch import nn

from export.onnx import compare, export_onnx, onnx_precision
from export.onnx_fp16 import node_precision
from model import BackboneConfig, MaskFormerConfig, ModelInfo, build_model, load_model
from model.data.shapes import VAL_SEED, generate
from service.cli import main as cli
from tests.test_export_tensorrt import NEEDS_TENSORRT_GPU

FP32_ONLY = ("LayerNormalization", "InstanceNormalization", "Softmax")  # GroupNorm exports as InstanceNorm


def check_precision(graph: onnx.ModelProto, model) -> dict[str, dict[str, int]]:
    counts = node_precision(graph)  # strict shape and type inference: raises on any type mismatch
    for op, module in (("LayerNormalization", nn.LayerNorm), ("InstanceNormalization", nn.GroupNorm)):
        assert counts["float32"].get(op, 0) == sum(isinstance(m, module) for m in model.modules())
    for op in FP32_ONLY:
        assert op not in counts["float16"], f"{op} runs in FP16"
    assert counts["float16"]["Conv"] > 0 and "Conv" not in counts["float32"]
    assert counts["float16"]["MatMul"] > counts["float32"]["MatMul"], "most matmuls run in FP16"
    assert {o.type.tensor_type.elem_type for o in graph.graph.output} == {onnx.TensorProto.FLOAT}
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    # the final mask product: the MatMul that pred_masks is reshaped from
    inferred = onnx.shape_inference.infer_shapes(graph, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    producer = {out: n for n in graph.graph.node for out in n.output}
    node = producer["pred_masks"]
    while node.op_type != "MatMul":
        node = producer[node.input[0]]
    assert all(types[name] == onnx.TensorProto.FLOAT for name in node.input), "mask product runs in FP32"
    return counts


def test_shipped_model(tmp_path):
    """`export onnx --fp16` of the default model, then parity on shapes validation images."""
    out = tmp_path / "model.fp16.onnx"
    assert cli(["export", "onnx", "--out", str(out), "--max-batch", "2", "--fp16"]) == 0
    onnx.checker.check_model(str(out), full_check=True)
    graph = onnx.load(str(out))
    assert onnx_precision(graph) == "fp16"
    counts = check_precision(graph, load_model())
    report = json.loads((tmp_path / "model.fp16.onnx.json").read_text())
    assert report["passed"] and report["precision"] == "fp16" and report["node_precision"] == counts
    assert all(r["semantic_agreement"] >= 0.99 for r in report["batches"].values())

    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images = torch.from_numpy(np.stack([generate(VAL_SEED + i).image.transpose(2, 0, 1) for i in range(4)]))
    model = load_model()
    result = compare(model, session, images)  # measured: 99.99 % agreement, max logits diff 1.0e-2
    assert result["semantic_agreement"] >= 0.99
    assert result["max_abs_diff_pred_logits"] < 0.05
    # ORT's CPU provider computes most FP16 ops in FP32 behind casts it inserts; ONNX's reference
    # evaluator runs every op in numpy on the FP16 arrays themselves (one image: about 13 s)
    result = compare(model, ReferenceEvaluator(str(out)), images[:1])  # measured: 99.99 %, 5.5e-3
    assert result["semantic_agreement"] >= 0.99
    assert result["max_abs_diff_pred_logits"] < 0.05


def test_swin_and_transformer_encoder(tmp_path):
    """Norms nested in an FP16 island (Swin's) and the pixel decoder's encoder stay FP32 too."""
    cfg = MaskFormerConfig(
        num_classes=2,
        backbone=BackboneConfig(kind="swin", embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=4),
        pixel_decoder="transformer_encoder",
        transformer_in_feature="transformer_encoder",
        conv_dim=32,
        mask_dim=32,
        enc_layers=1,
        hidden_dim=32,
        num_queries=4,
        nheads=2,
        dim_feedforward=64,
        dec_layers=1,
        input_size=(64, 64),
    )
    model = build_model(cfg, ModelInfo("swin", ["a", "b"], [True, False])).eval()
    graph = onnx.load(str(export_onnx(model, tmp_path / "s.onnx", max_batch=2, fp16=True)))
    check_precision(graph, model)


@NEEDS_TENSORRT_GPU
def test_strongly_typed_engine(tmp_path):  # pragma: no cover - runs only where TensorRT is
    from export.tensorrt import EngineSidecar

    onnx_path, engine = tmp_path / "m.fp16.onnx", tmp_path / "m.engine"
    assert cli(["export", "onnx", "--out", str(onnx_path), "--max-batch", "4", "--fp16"]) == 0
    args = ["--onnx", str(onnx_path), "--out", str(engine), "--max-batch", "4", "--fp16", "--verify"]
    assert cli(["export", "tensorrt", *args]) == 0
    assert EngineSidecar.read(engine).precision == "fp16"
    verify = json.loads((tmp_path / "m.engine.verify.json").read_text())
    assert all(r["semantic_agreement"] >= 0.99 for r in verify.values())
