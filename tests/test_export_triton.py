"""`maskformer export triton`: a model repository whose config.pbtxt Triton's own schema accepts."""

from __future__ import annotations

import json

import pytest
import torch

from export.onnx import export_onnx
from export.triton import config_pbtxt
from model.maskformer import ModelInfo, build_model
from service.cli import main as cli
from tests.conftest import tiny_config

model_config_pb2 = pytest.importorskip(
    "tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] is not installed (pip install -e '.[dev]')"
)
text_format = pytest.importorskip("google.protobuf.text_format")


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    torch.manual_seed(0)
    names, things = ["sky", "ground", "circle", "square", "triangle"], [False, False, True, True, True]
    model = build_model(tiny_config(128), ModelInfo("tiny", names, things))
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "m.onnx")


def parse(text: str):
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_repository_for_onnx_runtime(onnx_file, tmp_path):
    repo = tmp_path / "repo"
    args = ["export", "triton", "--onnx", str(onnx_file), "--repo", str(repo), "--max-batch", "6"]
    assert cli(args) == 0
    assert (repo / "maskformer" / "1" / "model.onnx").read_bytes() == onnx_file.read_bytes()
    config = parse((repo / "maskformer" / "config.pbtxt").read_text())
    assert config.name == "maskformer" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 6
    [images] = config.input
    assert images.name == "images" and list(images.dims) == [3, 128, 128]
    assert model_config_pb2.DataType.Name(images.data_type) == "TYPE_UINT8"
    outputs = {o.name: list(o.dims) for o in config.output}
    assert outputs == {"pred_logits": [10, 6], "pred_masks": [10, 32, 32]}
    assert list(config.dynamic_batching.preferred_batch_size) == [3, 6]
    assert config.dynamic_batching.max_queue_delay_microseconds == 5000
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == "KIND_GPU"
    info = json.loads(config.parameters["maskformer.info"].string_value)
    assert info["class_names"][2] == "circle" and info["isthing"][2] is True


def test_tensorrt_plan_and_cpu_configs(onnx_file):
    plan = parse(config_pbtxt(onnx_file, "mf", "tensorrt_plan", 4))
    assert plan.platform == "tensorrt_plan" and list(plan.dynamic_batching.preferred_batch_size) == [2, 4]
    cpu = parse(config_pbtxt(onnx_file, "mf", "onnxruntime_onnx", 1, gpu=False, instances=2))
    assert cpu.instance_group[0].count == 2
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(cpu.instance_group[0].kind) == "KIND_CPU"


def test_an_engine_must_match_its_onnx_and_batch(onnx_file, tmp_path, capsys):
    """The config's shapes come from the ONNX, so the engine must be built from it, with a profile that
    takes the configured batch (checked from the engine's sidecar; no engine is built here)."""
    from export.tensorrt import EngineSidecar, sha256

    engine = tmp_path / "m.engine"
    engine.write_bytes(b"serialized engine bytes")
    base = ["export", "triton", "--onnx", str(onnx_file), "--engine", str(engine), "--out", str(tmp_path / "repo")]
    assert cli([*base, "--max-batch", "4"]) == 2
    assert "has no sidecar" in capsys.readouterr().err
    fields = ("10.13.0", "NVIDIA H100", "9.0", sha256(onnx_file), [3, 128, 128], {"min": 1, "opt": 2, "max": 4})
    EngineSidecar(*fields, "fp16").write(engine)
    assert cli([*base, "--max-batch", "8"]) == 2
    assert "above the engine's profile maximum 4" in capsys.readouterr().err
    assert cli([*base, "--max-batch", "4"]) == 0
    config = parse((tmp_path / "repo" / "maskformer" / "config.pbtxt").read_text())
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 4
    assert (tmp_path / "repo" / "maskformer" / "1" / "model.plan").read_bytes() == engine.read_bytes()
    EngineSidecar("10.13.0", "NVIDIA H100", "9.0", "0" * 64, *fields[4:], "fp16").write(engine)
    assert cli([*base, "--max-batch", "4"]) == 2
    assert "built from another ONNX file" in capsys.readouterr().err


def test_bad_arguments_leave_an_existing_repository_as_it_was(onnx_file, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert cli(["export", "triton", "--onnx", str(onnx_file), "--out", str(repo)]) == 0
    files = sorted(p for p in repo.rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in files}
    (tmp_path / "a.pth").write_bytes(b"PK\x03")
    bad = [
        (["--onnx", str(tmp_path / "a.pth")], "is not an ONNX model"),
        (["--onnx", str(tmp_path)], "Is a directory"),
        (["--onnx", str(onnx_file), "--max-batch", "0"], "max batch 0 must be at least 1"),
        (["--onnx", str(onnx_file), "--instances", "0"], "instances 0 must be at least 1"),
    ]
    for args, says in bad:
        assert cli(["export", "triton", *args, "--out", str(repo)]) == 2, args
        assert says in capsys.readouterr().err
    assert sorted(p for p in repo.rglob("*") if p.is_file()) == files
    assert {p: p.read_bytes() for p in files} == before
    assert cli(["export", "triton", "--onnx", str(tmp_path / "missing.onnx"), "--out", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()  # nothing made for a missing model


def test_switching_to_the_onnx_removes_a_stale_plan(onnx_file, tmp_path):
    model_dir = tmp_path / "repo" / "maskformer"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.plan").write_bytes(b"an engine from an earlier export")
    assert cli(["export", "triton", "--onnx", str(onnx_file), "--out", str(tmp_path / "repo")]) == 0
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["model.onnx"]
