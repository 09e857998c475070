"""ONNX export: dynamic batch, uint8 input, metadata, and parity with PyTorch through ONNX Runtime."""

import dataclasses
import hashlib
import json

import onnx
import pytest

from model import ModelInfo, build_model, get_preset, save_model
from service.cli import main as cli
from tests.conftest import tiny_config

NAMES = ["sky", "ground", "circle", "square", "triangle"]


def check_export(tmp_path, model, extra_args=()):
    weights = save_model(model, tmp_path / "m.safetensors")
    out = tmp_path / "m.onnx"
    assert cli(["export", "onnx", "--weights", str(weights), "--out", str(out), "--max-batch", "4", *extra_args]) == 0
    graph = onnx.load(str(out))
    (inp,) = graph.graph.input
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]][0] == 3
    assert [o.name for o in graph.graph.output] == ["pred_logits", "pred_masks"]
    assert any(n.op_type == "LayerNormalization" for n in graph.graph.node), "opset >= 17 keeps LayerNorm whole"
    meta = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(meta["maskformer.info"])["class_names"] == model.info.class_names
    report = json.loads((tmp_path / "m.onnx.json").read_text())
    assert report["passed"] and set(report["batches"]) == {"1", "4"}
    for r in report["batches"].values():
        assert r["max_abs_diff_pred_logits"] <= 1e-3 and r["max_abs_diff_pred_masks"] <= 1e-3
        assert r["semantic_agreement"] >= 0.999
    return graph, report


def test_tiny_model(tmp_path):
    model = build_model(tiny_config(128), ModelInfo("tiny", NAMES, [False, False, True, True, True]))
    check_export(tmp_path, model)


def test_random_init_r50_preset(tmp_path):
    preset = get_preset("r50-ade20k")
    from model.classes import load_classes

    classes = load_classes(preset.classes)
    model = build_model(preset.config, ModelInfo("r50", list(classes.names), list(classes.isthing)))
    graph, report = check_export(tmp_path, model, ["--height", "256", "--width", "256"])
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[2:]] == [256, 256]


def test_bad_sizes_and_outputs_are_refused(tmp_path, capsys):
    model = build_model(tiny_config(128), ModelInfo("tiny", NAMES, [False, False, True, True, True]))
    weights = save_model(model, tmp_path / "m.safetensors")
    base = ["export", "onnx", "--weights", str(weights), "--out", str(tmp_path / "x.onnx")]
    for height in ("100", "0"):  # 0 was taken for "unset" and the model's own height exported
        assert cli([*base, "--height", height]) == 2
        assert "positive multiples of 32" in capsys.readouterr().err
    assert cli([*base, "--max-batch", "0"]) == 2
    assert "must be at least 1" in capsys.readouterr().err
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("not a folder")
    for out, says in ((tmp_path / "folder", "is a directory"), (tmp_path / "file" / "m.onnx", "File exists")):
        assert cli(["export", "onnx", "--weights", str(weights), "--out", str(out)]) == 2
        assert says in capsys.readouterr().err  # a message, no traceback, and before any export work
    assert not (tmp_path / "x.onnx").exists()


def test_max_batch_1_and_a_nan_fails_parity(tmp_path, monkeypatch):
    import math

    import export.onnx

    model = build_model(tiny_config(128), ModelInfo("tiny", NAMES, [False, False, True, True, True]))
    weights = save_model(model, tmp_path / "m.safetensors")
    out = tmp_path / "m.onnx"
    assert cli(["export", "onnx", "--weights", str(weights), "--out", str(out), "--max-batch", "1"]) == 0
    assert set(json.loads((tmp_path / "m.onnx.json").read_text())["batches"]) == {"1"}
    diffs = iter([1e-6, float("nan")])  # a NaN after a finite diff: max() would have kept 1e-6
    fake = {"max_abs_diff_pred_logits": 0.0, "max_abs_diff_pred_masks": 0.0, "semantic_agreement": 1.0}
    monkeypatch.setattr(export.onnx, "compare", lambda *a: {**fake, "max_abs_diff_pred_masks": next(diffs)})
    report = export.onnx.parity_report(model, out, batches=(1, 2))
    assert math.isnan(report.max_abs_diff) and not report.passed


def test_without_simplification(tmp_path):
    model = build_model(tiny_config(128), ModelInfo("tiny", NAMES, [False, False, True, True, True]))
    check_export(tmp_path, model, ["--no-simplify"])


def test_an_opset_that_splits_layernorm_is_refused(tmp_path, capsys):
    model = build_model(tiny_config(128), ModelInfo("tiny", NAMES, [False, False, True, True, True]))
    weights = save_model(model, tmp_path / "m.safetensors")
    assert cli(["export", "onnx", "--weights", str(weights), "--out", str(tmp_path / "x.onnx"), "--opset", "16"]) == 2
    assert "use 17 or later" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()


def test_a_graph_that_drifts_from_pytorch_fails_loudly(tmp_path, capsys, monkeypatch):
    """An exporter bug, simulated by scaling the largest weight of the written graph: exit 1, FAILED on
    stderr, and a sidecar that says so."""
    import numpy as np
    from onnx import numpy_helper

    import export.onnx

    export_onnx = export.onnx.export_onnx

    def drifting_export(*args, **kwargs):
        out = export_onnx(*args, **kwargs)
        graph = onnx.load(str(out))
        largest = max(graph.graph.initializer, key=lambda t: int(np.prod(t.dims)))
        largest.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(largest) * 1.5, largest.name))
        onnx.save(graph, str(out))
        return out

    model = build_model(tiny_config(128), ModelInfo("tiny", NAMES, [False, False, True, True, True]))
    weights = save_model(model, tmp_path / "m.safetensors")
    args = ["export", "onnx", "--weights", str(weights), "--out", str(tmp_path / "m.onnx")]
    assert cli(args) == 0  # a good model first: a failing re-export must leave it and its report alone
    good = {name: (tmp_path / name).read_bytes() for name in ("m.onnx", "m.onnx.json")}
    monkeypatch.setattr(export.onnx, "export_onnx", drifting_export)
    assert cli(args) == 1
    err = capsys.readouterr().err
    assert "FAILED: the fp32 graph misses max_abs_diff <= 0.001" in err and "m.onnx is unchanged" in err
    assert {name: (tmp_path / name).read_bytes() for name in good} == good
    report = json.loads((tmp_path / "m.failed.onnx.json").read_text())  # the failed graph, kept for a look
    assert report["passed"] is False and report["max_abs_diff"] > 1e-3
    assert report["onnx_sha256"] == hashlib.sha256((tmp_path / "m.failed.onnx").read_bytes()).hexdigest()
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_the_folded_mask_head_for_the_cpu(tmp_path, capsys, monkeypatch):
    """--fold-mask-conv: a graph with Col2Im that still matches PyTorch's unfolded model (check_export's
    parity checks), marked in its metadata, and refused by the TensorRT builder before it builds anything
    (a stand-in `tensorrt` module here: the refusal needs nothing from TensorRT)."""
    import sys
    from types import SimpleNamespace

    from export.onnx import onnx_folds_mask_conv
    from export.tensorrt import build_engine

    model = build_model(tiny_config(128), ModelInfo("tiny", NAMES, [False, False, True, True, True]))
    graph, _ = check_export(tmp_path, model, ["--fold-mask-conv"])
    ops = {n.op_type for n in graph.graph.node}
    assert "Col2Im" in ops and onnx_folds_mask_conv(graph) and not model.fold_mask_conv
    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(Builder=None))
    with pytest.raises(ValueError, match="TensorRT does not parse"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.engine")
    assert not (tmp_path / "m.engine").exists()
    weights = tmp_path / "m.safetensors"
    out = str(tmp_path / "x.onnx")
    assert cli(["export", "onnx", "--weights", str(weights), "--out", out, "--fold-mask-conv", "--fp16"]) == 2
    assert "the FP16 graph is for TensorRT" in capsys.readouterr().err
    attends = dataclasses.replace(tiny_config(128), transformer_in_feature="pixel_embedding")
    save_model(build_model(attends, model.info), weights)
    assert cli(["export", "onnx", "--weights", str(weights), "--out", out, "--fold-mask-conv"]) == 2
    assert "cannot be folded" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()
