"""TensorRT export. Building needs TensorRT and a GPU; the engine-cache decision and the error paths do not."""

import json
import os
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


def can_build_engines() -> bool:
    import torch

    return have_tensorrt() and torch.cuda.is_available()


NEEDS_TENSORRT_GPU = pytest.mark.skipif(
    not can_build_engines(), reason="needs TensorRT and a CUDA GPU (GPU nodes only: pip install '.[gpu]')"
)


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


@NEEDS_TENSORRT_GPU
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


@NEEDS_TENSORRT_GPU
def test_fp16_flag_on_the_fp32_graph_with_a_timing_cache(tmp_path):  # pragma: no cover - GPU nodes only
    """TensorRT 10's route: BuilderFlag.FP16 with LayerNorm, softmax and the mask product pinned to FP32; the
    timing cache is written by the first build and read by the next."""
    if not hasattr(load_tensorrt().BuilderFlag, "FP16"):
        pytest.skip("this TensorRT has no BuilderFlag.FP16; test_strongly_typed_engine covers its FP16 route")
    from model import ModelInfo, build_model, save_model
    from tests.conftest import tiny_config

    model = build_model(tiny_config(128), ModelInfo("t", list("abcde"), [True] * 5))
    weights = save_model(model, tmp_path / "m.safetensors")
    assert cli(["export", "onnx", "--weights", str(weights), "--out", str(tmp_path / "m.onnx")]) == 0
    cache = tmp_path / "timing.cache"
    for name in ("a.engine", "b.engine"):
        args = ["--onnx", str(tmp_path / "m.onnx"), "--out", str(tmp_path / name), "--fp16", "--verify"]
        assert cli(["export", "tensorrt", *args, "--timing-cache", str(cache)]) == 0
        assert cache.stat().st_size > 0
        assert EngineSidecar.read(tmp_path / name).precision == "fp16"
        verify = json.loads((tmp_path / f"{name}.verify.json").read_text())
        assert all(r["semantic_agreement"] >= 0.99 for r in verify.values())


def test_mypy_against_tensorrt_stubs(tmp_path):
    """The TensorRT code is type-checked against tensorrt-stubs (installed by scripts/setup.sh). A planted
    misuse of the API must be reported, or the stubs were not read (mypy would take tensorrt as Any)."""
    stubs = tmp_path / "stubs"
    prepared = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "tensorrt_stubs.py"), str(stubs)], capture_output=True, text=True
    )
    if prepared.returncode:
        if os.environ.get("CI"):
            pytest.fail(f"CI must type-check the TensorRT code: {prepared.stderr.strip()}")
        pytest.skip(prepared.stderr.strip())
    planted = tmp_path / "planted_misuse.py"
    planted.write_text(
        "import tensorrt as trt\n\ndef build(logger: trt.Logger) -> None:\n    trt.Builder(logger).create_netwrk(0)\n"
    )
    ours = ["export/tensorrt.py", "service/backends/trt_backend.py"]
    result = subprocess.run(
        # a cache of its own: mypy's incremental cache would replay an earlier run's planted file
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"), *ours, str(planted)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"MYPYPATH": str(stubs), "PATH": ""},
    )
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert errors, result.stdout + result.stderr
    assert all(line.startswith(str(planted)) for line in errors), result.stdout  # our code is clean
    assert '"Builder" has no attribute "create_netwrk"' in result.stdout


@pytest.mark.skipif(have_tensorrt(), reason="TensorRT is installed here")
def test_doctor_says_tensorrt_is_absent(capsys):
    cli(["doctor"])
    [row] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("tensorrt ")]
    assert "absent (GPU nodes: pip install '.[gpu]'" in row
