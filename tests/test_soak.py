"""The short soak in CI: `maskformer soak`'s load (service/soak.py) for 20 s against a real `maskformer serve`
on a small model. The 5-minute version is `maskformer soak` (README, "Soak, fuzz and fault tests")."""

from __future__ import annotations

import pytest
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


def _run(rss: list[tuple[float, float]], exit_code: int = -15) -> dict:
    return {
        "rss_mb": rss,
        "status_mix": {"200": 10},
        "unexpected": {},
        "queue_depth_end": 0,
        "ready_end": 200,
        "latency_ms_200": {"p50": 1.0},
        "exit_code": exit_code,
    }


def test_rss_growth_needs_two_samples_after_the_warm_up():
    from service.soak import judge

    doubling = [(float(t), 500.0 * (1 + t / 30)) for t in range(0, 31, 10)]
    assert judge(_run(doubling), warmup_s=60, max_rss_growth=0.1) == [
        "RSS growth not measured: 0 sample(s) after the 60 s warm-up"
    ]
    assert judge(_run(doubling), warmup_s=10, max_rss_growth=0.1) == ["RSS grew 50.0% after warm-up (limit 10%)"]
    assert judge(_run(doubling), warmup_s=10, max_rss_growth=0.6) == []


def test_a_server_killed_after_sigterm_fails_the_soak():
    from service.soak import judge

    flat = [(0.0, 500.0), (10.0, 500.0), (20.0, 500.0)]
    assert judge(_run(flat, exit_code=0), 0, 0.1) == judge(_run(flat, exit_code=-15), 0, 0.1) == []
    assert judge(_run(flat, exit_code=-9), 0, 0.1) == [
        "exit code -9 after SIGTERM (-9: killed, not stopped within 60 s)"
    ]


def test_the_rss_plot_draws_the_limit_the_soak_judged_by(tmp_path, monkeypatch):
    plt = pytest.importorskip("matplotlib.pyplot")
    from service.soak import judge, plot_rss

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    run = _run([(0.0, 400.0), (10.0, 500.0), (20.0, 510.0)])
    judge(run, warmup_s=5, max_rss_growth=0.25)
    assert plot_rss(run, 5, 0.25, tmp_path / "rss.png") and (tmp_path / "rss.png").is_file()
    (ax,) = figures[0].axes
    limit = [line for line in ax.get_lines() if line.get_label() == "limit: +25%"]
    assert len(limit) == 1 and list(limit[0].get_ydata()) == [500.0 * 1.25] * 2


def test_soak_refuses_a_run_too_short_to_measure_rss_growth(capsys):
    from service.cli import main as cli

    assert cli(["soak", "--seconds", "30", "--warmup", "20", "--sample-every", "10"]) == 2
    assert "leaves under two RSS samples after the 20 s warm-up" in capsys.readouterr().err
