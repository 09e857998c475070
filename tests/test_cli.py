import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from model.checkpoint import default_weights
from service.backends import resolve_device
from service.cli import main as cli
from service.metrics import Metrics
from service.pipeline import Pipeline
from service.runtime import Capabilities, choose_backend, cuda_available, driver_requirement, probe


def test_doctor_reports_the_machine_and_the_backend(capsys):
    assert cli(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["torch"] and report["torchvision"], "torch and torchvision must import together"
    assert report["backend"] in ("tensorrt", "onnxruntime", "torch")
    cli(["doctor"])
    text = capsys.readouterr().out
    assert "tensorrt" in text and "serve backend" in text


def test_backend_choice():
    cpu = Capabilities(python="3.11", torch="2", cuda=False)
    assert choose_backend(cpu)[0] == "torch"
    assert choose_backend(Capabilities(python="3.11", torch="2", cuda=False, onnxruntime="1.2"))[0] == "onnxruntime"
    gpu = Capabilities(python="3.11", torch="2", cuda=True, onnxruntime="1.2", tensorrt="10.1")
    assert choose_backend(gpu)[0] == "tensorrt"
    assert choose_backend(gpu, on_cpu=True)[0] == "onnxruntime"  # MASKFORMER_DEVICE=cpu on a GPU node
    assert choose_backend(Capabilities(python="3.11", torch="2", cuda=False, tensorrt="10.1"))[0] == "torch"


def test_tensorrt_on_a_cpu_is_refused_before_any_export(monkeypatch, tmp_path):
    import service.backends.ort_backend as ort_backend
    from model.checkpoint import default_weights, read_metadata
    from service.backends import create_backend
    from service.settings import ServeSettings

    def no_export(*args, **kwargs):
        raise AssertionError("exported an ONNX for a backend that cannot run")

    monkeypatch.setattr(ort_backend, "cached_onnx", no_export)
    settings = ServeSettings(backend="tensorrt", device="cpu", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="the tensorrt backend needs a CUDA device, not cpu"):
        create_backend(settings, default_weights(), read_metadata(default_weights())[0])


def test_console_script_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "service.cli", "presets"], capture_output=True, text=True, check=True)
    assert "r50-ade20k" in out.stdout and "swin-l-coco-panoptic" in out.stdout


def test_convert_needs_a_preset_for_detectron2(tmp_path, capsys):
    assert (
        cli(["convert", "--from", "detectron2", str(tmp_path / "m.pkl"), "--out", str(tmp_path / "o.safetensors")]) == 2
    )


def test_convert_takes_classes_only_from_hf(tmp_path, capsys):
    out = str(tmp_path / "o.safetensors")
    assert (
        cli(["convert", "--from", "maskformer", str(tmp_path / "m.safetensors"), "--classes", "shapes", "--out", out])
        == 2
    )
    assert "--classes is for --from hf" in capsys.readouterr().err


def test_serve_without_arguments_serves_the_shipped_model_on_port_8000_of_every_interface(monkeypatch):
    for name in list(os.environ):
        if name.startswith("MASKFORMER_"):
            monkeypatch.delenv(name)
    served = []
    monkeypatch.setattr("service.server.serve", served.append)  # the settings `serve` would run with
    assert cli(["serve"]) == 0
    [settings] = served
    assert (settings.host, settings.port, settings.backend, settings.weights) == ("0.0.0.0", 8000, "auto", None)
    weights = Pipeline(settings, Metrics(settings.max_batch_size)).weights
    assert weights == default_weights() and weights.is_file()


@pytest.fixture
def gpu_too_old(monkeypatch):
    """torch as it behaves on a GPU node whose driver is older than torch's CUDA: a warning, no GPU."""

    def is_available() -> bool:
        warnings.warn(
            "CUDA initialization: The NVIDIA driver on your system is too old (found version 12080).", stacklevel=2
        )
        return False

    monkeypatch.setattr(torch.cuda, "is_available", is_available)
    cuda_available.cache_clear()
    yield
    cuda_available.cache_clear()


def test_driver_requirement_of_torchs_cuda():
    assert driver_requirement("13.0") == "torch's CUDA 13.0 needs an NVIDIA driver >= 580"
    assert driver_requirement("12.8") == "torch's CUDA 12.8 needs an NVIDIA driver >= 525"
    assert driver_requirement(None) is None  # a CPU-only torch


def test_a_gpu_that_torch_cannot_use_is_explained(gpu_too_old, capsys, caplog):
    need = driver_requirement(torch.version.cuda) or ""
    caps = probe()
    assert not caps.cuda and caps.cuda_build == torch.version.cuda
    [problem] = [p for p in caps.problems if p.startswith("CUDA:")]
    assert "driver on your system is too old (found version 12080)" in problem and need in problem
    assert cli(["doctor"]) == 1  # a GPU node that would silently serve on the CPU fails `doctor`
    out = capsys.readouterr().out
    assert f"problem: {problem}" in out and "CUDA build" in out
    with pytest.raises(RuntimeError, match=r"--device cuda but no CUDA GPU is usable \(CUDA initialization: .*too old"):
        resolve_device("cuda")
    with caplog.at_level(logging.WARNING, logger="service.backends"):
        assert resolve_device("auto") == torch.device("cpu")
    assert "no usable CUDA GPU (CUDA initialization: The NVIDIA driver on your system is too old" in caplog.text
    assert resolve_device("cpu") == torch.device("cpu")


def test_no_driver_at_all_falls_back_quietly(monkeypatch, caplog):
    """A CPU machine: torch warns of nothing, `auto` picks the CPU without a warning and `cuda` still refuses."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cuda_available.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="service.backends"):
            assert resolve_device("auto") == torch.device("cpu")
        assert not caplog.records
        with pytest.raises(RuntimeError, match="no CUDA GPU is usable"):
            resolve_device("cuda")
        assert not [p for p in probe().problems if p.startswith("CUDA:")]
    finally:
        cuda_available.cache_clear()


def required(command: str, tmp: Path) -> list[str]:
    """The flags each command needs, pointing nowhere (or at nothing to write) should a bad number pass."""
    return {
        "train": ["train", "--data", str(tmp / "none"), "--out", str(tmp / "run")],
        "eval": ["eval", "--weights", str(tmp / "w.safetensors"), "--data", str(tmp / "none")],
        "data": ["data", "shapes", "--out", str(tmp / "data"), "--train", "0", "--val", "0"],
    }[command]


BAD_NUMBERS = [
    *[("train", "--steps", v) for v in ("0", "-3")],
    *[("train", "--batch-size", v) for v in ("0", "-2")],
    *[("train", flag, "0") for flag in ("--checkpoint-every", "--crop", "--min-scale", "--max-scale", "--eval-images")],
    *[("train", flag, "0") for flag in ("--lr", "--clip-grad-norm", "--dist-timeout")],
    *[("train", flag, "-1") for flag in ("--eval-every", "--workers", "--seed", "--warmup-steps", "--weight-decay")],
    *[("train", flag, "-1") for flag in ("--backbone-lr-mult", "--ce-weight")],
    ("eval", "--limit", "0"),
    ("eval", "--batch-size", "0"),
    ("data", "--train", "-1"),
    ("data", "--val", "-5"),
]


@pytest.mark.parametrize(("command", "flag", "value"), BAD_NUMBERS)
def test_numbers_a_command_cannot_run_with_are_refused_when_parsed(command, flag, value, capsys, tmp_path):
    with pytest.raises(SystemExit) as exited:
        cli([*required(command, tmp_path), flag, value])
    assert exited.value.code == 2
    assert f"argument {flag}: {value} is not" in capsys.readouterr().err
