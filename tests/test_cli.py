import json
import os
import subprocess
import sys

from model.checkpoint import default_weights
from service.cli import main as cli
from service.metrics import Metrics
from service.pipeline import Pipeline
from service.runtime import Capabilities, choose_backend


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
    assert choose_backend(Capabilities(python="3.11", torch="2", cuda=False, tensorrt="10.1"))[0] == "torch"


def test_console_script_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "service.cli", "presets"], capture_output=True, text=True, check=True)
    assert "r50-ade20k" in out.stdout and "swin-l-coco-panoptic" in out.stdout


def test_convert_needs_a_preset_for_detectron2(tmp_path, capsys):
    assert (
        cli(["convert", "--from", "detectron2", str(tmp_path / "m.pkl"), "--out", str(tmp_path / "o.safetensors")]) == 2
    )


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
