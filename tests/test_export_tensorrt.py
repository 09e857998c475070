"""TensorRT export. Building needs TensorRT and a GPU; the engine-cache decision and the error paths do not."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from export.tensorrt import EngineSidecar, TensorRTUnavailable, engine_matches, load_tensorrt
from service.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]


def have_tensorrt() -> bool:
    try:
        load_tensorrt()
        return True
    except TensorRTUnavailable:
        return False


SIDECAR = EngineSidecar("10.13.0", "NVIDIA H100", "9.0", "abc", [3, 512, 512], {"min": 1, "opt": 4, "max": 8}, "fp16")


def test_engine_cache_decision():
    assert engine_matches(SIDECAR, "10.13.0", "9.0", "abc") == (True, "matches")
    ok, why = engine_matches(SIDECAR, "10.14.1", "9.0", "abc")
    assert not ok and "TensorRT 10.13.0" in why
    ok, why = engine_matches(SIDECAR, "10.13.0", "8.9", "abc")
    assert not ok and "compute capability 9.0" in why
    assert engine_matches(SIDECAR, "10.13.0", "9.0", "def") == (False, "built from a different ONNX file")


def test_sidecar_round_trip(tmp_path):
    SIDECAR.write(tmp_path / "m.engine")
    assert EngineSidecar.read(tmp_path / "m.engine") == SIDECAR


@pytest.mark.skipif(have_tensorrt(), reason="TensorRT is installed here")
def test_clear_error_without_tensorrt(tmp_path, capsys):
    assert cli(["export", "tensorrt", "--onnx", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "m.engine")]) == 2
    assert "TensorRT" in capsys.readouterr().err
    assert not (tmp_path / "m.engine").exists()


@pytest.mark.skipif(not have_tensorrt(), reason="TensorRT is not installed (GPU nodes only: pip install '.[gpu]')")
def test_build_engine_from_onnx(tmp_path):  # pragma: no cover - runs only where TensorRT is
    from model import ModelInfo, build_model, save_model
    from tests.conftest import tiny_config

    model = build_model(tiny_config(128), ModelInfo("t", list("abcde"), [True] * 5))
    weights = save_model(model, tmp_path / "m.safetensors")
    assert cli(["export", "onnx", "--weights", str(weights), "--out", str(tmp_path / "m.onnx")]) == 0
    engine = tmp_path / "m.engine"
    assert cli(["export", "tensorrt", "--onnx", str(tmp_path / "m.onnx"), "--out", str(engine), "--verify"]) == 0
    assert EngineSidecar.read(engine).input_shape == [3, 128, 128]
    verify = json.loads((tmp_path / "m.engine.verify.json").read_text())
    assert all(r["semantic_agreement"] >= 0.999 and r["max_abs_diff_pred_logits"] < 1e-2 for r in verify.values())


def test_mypy_against_tensorrt_stubs(tmp_path):
    """The TensorRT code is type-checked against tensorrt-stubs (installed by scripts/setup.sh)."""
    prepared = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "tensorrt_stubs.py"), str(tmp_path)], capture_output=True, text=True
    )
    if prepared.returncode:
        pytest.skip(prepared.stderr.strip())
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "export/tensorrt.py", "service/backends/trt_backend.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"MYPYPATH": str(tmp_path), "PATH": ""},
    )
    assert result.returncode == 0, result.stdout + result.stderr
