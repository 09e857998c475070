"""The short soak in CI: `maskformer soak`'s load (service/soak.py) for 20 s against a real `maskformer serve`
on a small model. The 5-minute version is `maskformer soak` (README, "Soak, fuzz and fault tests")."""

from __future__ import annotations

import torch

from model.checkpoint import save_model
from model.maskformer import ModelInfo, build_model
from service.soak import soak
from tests.conftest import tiny_config
from tests.test_serve_process import free_port


def test_short_soak_answers_everything_and_leaks_nothing(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "tiny.safetensors"
    names, things = ["sky", "ground", "circle", "square", "triangle"], [False, False, True, True, True]
    save_model(build_model(tiny_config(128), ModelInfo("tiny", names, things)), weights)
    serve = ["--weights", str(weights), "--backend", "torch", "--threads", "1", "--cache-dir", str(tmp_path)]
    result, problems = soak(
        tmp_path / "out",
        seconds=20,
        concurrency=32,
        sample_s=2,
        warmup_s=8,
        image_size=128,
        port=free_port(),
        serve_args=serve,
        progress=lambda _: None,
    )
    assert not problems, (problems, result["by_kind"])
    assert result["requests"] > 100 and result["status_mix"].get("200", 0) > 50
    kinds = {k.split(" ")[0] for k in result["by_kind"]}
    assert {"multipart", "raw-body", "batch", "garbage", "abandoned"} <= kinds
    assert result["exit_code"] in (0, -15)  # drained and stopped on SIGTERM
    assert (tmp_path / "out" / "README.md").is_file() and (tmp_path / "out" / "soak.json").is_file()
