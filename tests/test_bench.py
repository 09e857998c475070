"""`maskformer bench` in a small configuration: the report is produced and well-formed (no timing asserted).

The server level runs both servers the real benchmark compares: `maskformer serve` and the transformers
baseline in benchmarks/, on the same (tiny, random) weights.
"""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from service.bench import report as bench_report
from service.bench import roofline as roofline_module
from service.bench.model_bench import agreement, parse_variant
from service.bench.roofline import Roofline, forward_gflop
from service.cli import main as cli
from tests.test_docker_scripts import SHELLCHECK

transformers = pytest.importorskip("transformers")


def tiny_hf_dir(path):
    backbone = transformers.ResNetConfig(
        layer_type="basic",
        depths=[1, 1, 1, 1],
        hidden_sizes=[64, 128, 256, 512],
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    cfg = transformers.MaskFormerConfig(backbone_config=backbone, num_labels=3)
    cfg.decoder_config.decoder_layers = 1
    torch.manual_seed(0)  # the same weights every run
    transformers.MaskFormerForInstanceSegmentation(cfg).eval().save_pretrained(path)
    size = {"shortest_edge": 128, "longest_edge": 128}
    transformers.MaskFormerImageProcessor(size=size, size_divisor=32).save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bench_writes_json_markdown_and_plot(tmp_path):
    hf = tiny_hf_dir(tmp_path / "hf")
    weights = tmp_path / "tiny.safetensors"
    assert cli(["convert", "--from", "hf", str(hf), "--out", str(weights)]) == 0
    out = tmp_path / "report"
    args = ["bench", "--weights", str(weights), "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    args += ["--variants", "torch,torch+unfolded,onnxruntime,tensorrt:fp16", "--batch-sizes", "1,2"]
    args += ["--iters", "2", "--warmup", "1"]
    args += ["--baseline", str(hf), "--concurrency", "1,3", "--requests", "6", "--seconds", "60"]
    args += ["--image-size", "96", "--port", str(free_port())]
    args += ["--serve-args", "--max-batch-size 2", "--serve-args", "--backend torch --max-batch-size 2"]
    assert cli(args) == 0

    report = json.loads((out / "bench.json").read_text())
    assert report["kind"] == "maskformer-bench" and report["command"].startswith("maskformer bench --weights")
    # what the figures depend on: the CPU's model and the vector instructions torch's kernels use on it
    assert report["machine"]["cpu"] and report["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert f"({report['machine']['cpu_capability']}), " in (out / "bench.md").read_text()
    rows = report["model"]["rows"]
    variants = ("torch", "torch+unfolded", "onnxruntime")
    assert [(r["variant"], r["batch"]) for r in rows] == [(v, b) for v in variants for b in (1, 2)]
    # the CPU backends fold the mask head (this model's decoder reads res5), unless the variant says not to
    assert [r["fold_mask_conv"] for r in rows] == [True, True, False, False, True, True]
    for r in rows:
        assert r["img_per_s"] > 0 and r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["peak_mib"] > 0
    # torch fp32 on the CPU is the reference (run at another batch size); the ONNX export matches it
    assert all(r["semantic_agreement"] >= 0.999 for r in rows)
    # both variants run fp32 on the CPU: one matmul rate, and each row's share of it
    model = report["model"]
    assert model["gflop_per_image"] == pytest.approx(sum(model["gflop_by_op"].values()), rel=1e-3)
    assert model["gflop_by_op"]["convolution"] > 0 and list(model["matmul_gflops"]) == ["cpu fp32"]
    assert model["matmul_samples"] == {"cpu fp32": 4}  # next to each of the three variants, and at the end
    rate = model["matmul_gflops"]["cpu fp32"]
    assert model["ceiling_img_per_s"] == {"cpu fp32": round(rate / model["gflop_per_image"], 3)}
    assert model["fold_mask_conv"] and 0 < model["gflop_per_image"] < model["gflop_per_image_unfolded"]
    for r in rows:
        gflop = model["gflop_per_image" if r["fold_mask_conv"] else "gflop_per_image_unfolded"]
        assert r["of_matmul_rate"] == pytest.approx(r["img_per_s"] * gflop / rate, abs=2e-3)
    try:
        import tensorrt  # noqa: F401
    except ImportError:  # no TensorRT here: the variant is reported as skipped, with the reason
        assert [s["variant"] for s in report["model"]["skipped"]] == ["tensorrt:fp16"]

    server = report["server"]
    names = ["maskformer --max-batch-size 2", "maskformer --backend torch --max-batch-size 2", "transformers-baseline"]
    assert [s["name"] for s in server["servers"]] == names
    for s in server["servers"]:
        assert [r["concurrency"] for r in s["rows"]] == [1, 3]
        for r in s["rows"]:
            assert r["requests"] == r["ok"] == 6 and r["errors"] == r["cut_off"] == 0 and r["status"] == {"200": 6}
            assert r["p50_ms"] <= r["p99_ms"]
    ours = server["servers"][0]["rows"]
    assert ours[0]["avg_batch"] == 1.0 and 1.0 <= ours[1]["avg_batch"] <= 3.0  # read from /metrics
    assert server["servers"][2]["rows"][0]["avg_batch"] is None  # the baseline does not batch
    for r in ours:  # each image's stages, from the server's histograms over the level
        assert list(r["stage_ms"]) == ["decode", "queue", "infer", "postprocess", "encode"]
        assert all(ms > 0 for ms in r["stage_ms"].values())
    assert server["servers"][2]["rows"][0]["stage_ms"] is None
    assert [(r["server"], r["concurrency"]) for r in server["ratios"]] == [(n, c) for n in names[:2] for c in (1, 3)]
    # each of our servers against its own backend's model-level row at its max batch size (2); the default
    # server on a CPU runs ONNX Runtime
    eff = [(r["server"], r["concurrency"], r["variant"], r["batch"]) for r in server["efficiency"]]
    assert eff == [(n, c, v, 2) for n, v in zip(names[:2], ("onnxruntime", "torch")) for c in (1, 3)]
    assert all(r["ratio"] == round(r["server_img_per_s"] / r["raw_img_per_s"], 3) > 0 for r in server["efficiency"])
    baseline = {r["concurrency"]: r["img_per_s"] for r in server["servers"][2]["rows"]}
    ceiling = model["ceiling_img_per_s"]["cpu fp32"]
    assert server["ceiling_ratios"] == [
        {"ceiling": "cpu fp32", "concurrency": c, "ratio": round(ceiling / baseline[c], 3)} for c in (1, 3)
    ]

    md = (out / "bench.md").read_text()
    assert "| torch | cpu | 1 |" in md and " % |" in md and "Agreement: semantic pixels" in md
    assert f"(cpu fp32 {rate} GFLOP/s, best of 4 samples)" in md and "as the CPU backends run it (" in md
    assert f"would serve cpu fp32 {ceiling} img/s" in md
    assert "The forward pass alone at the cpu fp32 matmul rate / transformers baseline, img/s:" in md
    assert "| transformers-baseline | 3 | 6 | 0 | 0 |" in md and "tensorrt:fp16" in md
    assert "| decode / queue / infer / postprocess / encode ms |" in md and "Stages: each image's mean" in md
    stages = ours[0]["stage_ms"]
    assert f"| {stages['decode']} / {stages['queue']} / {stages['infer']} / " in md
    assert "maskformer --backend torch --max-batch-size 2 / transformers baseline, img/s:" in md
    assert "maskformer --backend torch --max-batch-size 2 / its raw backend (torch at batch 2), img/s:" in md
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_variants_are_checked_before_anything_runs(tmp_path, capsys):
    assert parse_variant("torch:fp16+graphs").graphs
    assert cli(["bench", "--variants", "torch:fp8", "--out", str(tmp_path)]) == 2
    assert "unknown precision 'fp8'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_bench_measures_a_running_server_with_an_api_key(tmp_path):
    from service.settings import ServeSettings
    from tests.live_server import live_server

    settings = ServeSettings.model_validate({"backend": "torch", "api_key": "k3y", "max_batch_size": 2})
    with live_server(settings) as (url, _):
        for key, status in (("k3y", "200"), ("wrong", "401")):
            out = tmp_path / status
            args = ["bench", "--skip-model", "--url", url, "--api-key", key, "--out", str(out)]
            assert cli([*args, "--concurrency", "2", "--requests", "3", "--image-size", "64"]) == 0
            (server,) = json.loads((out / "bench.json").read_text())["server"]["servers"]
            (row,) = server["rows"]
            if key == "k3y":  # what it ran, as GET /v1/model says
                assert server["backend"]["backend"] == "torch" and server["backend"]["overlap_postprocessing"] is True
            assert row["requests"] == 3 and row["status"] == {status: 3}
            assert row["errors"] == (0 if status == "200" else 3)
            for report in ("bench.json", "bench.md"):  # reports get committed: the key is not in them
                text = (out / report).read_text()
                assert key not in text and "--api-key REDACTED" in text


def test_recorded_commands_hide_api_keys():
    from service.commands_bench import masked

    argv = ["bench", "--api-key", "k1", "--api-key=k2", "--serve-args", "--backend torch --api-key k3", "--x"]
    hidden = ["bench", "--api-key", "REDACTED", "--api-key=REDACTED", "--serve-args"]
    assert masked(argv) == [*hidden, "--backend torch --api-key REDACTED", "--x"]


def test_a_level_ends_at_its_seconds_and_cuts_off_what_is_still_in_flight():
    import asyncio
    import threading
    import time

    import uvicorn
    from fastapi import FastAPI, Response

    from service.bench.load import run_level

    app, calls = FastAPI(), []

    @app.post("/segment")
    async def segment() -> Response:  # 200, 503, 500, then one that outlasts the level, over and over
        calls.append(len(calls))
        kind = (len(calls) - 1) % 4
        if kind == 3:
            await asyncio.sleep(4)
        return Response(status_code=(200, 503, 500, 200)[kind])

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        row = asyncio.run(run_level(url, [b"x"], "semantic", 2, max_requests=50, max_seconds=1.5))
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
    assert row["seconds"] < 2.5  # not the 4 s the slow answers take
    assert row["cut_off"] == 2  # each client ends waiting on a slow one
    assert row["status"].get("503") and row["status"].get("500") and "TimeoutError" not in row["status"]
    assert row["errors"] == row["status"]["503"] + row["status"]["500"]
    assert row["requests"] == row["ok"] + row["errors"] + row["cut_off"]
    assert row["img_per_s"] == round(row["ok"] / row["seconds"], 3)


def test_a_server_command_that_exits_at_once_leaves_no_open_log(tmp_path):
    from service.bench.load import ServerProcess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ServerProcess([sys.executable, "-c", "raise SystemExit(3)"], f"http://127.0.0.1:{port}", tmp_path / "l")
    with pytest.raises(RuntimeError, match="exited with 3"):
        server.__enter__()
    assert server._log.closed


@pytest.mark.parametrize(
    "flags",
    [["--iters", "0"], ["--warmup", "-1"], ["--requests", "0"], ["--seconds", "0"], ["--image-size", "0"]],
)
def test_bench_refuses_numbers_it_cannot_run_with(tmp_path, capsys, flags):
    with pytest.raises(SystemExit) as exit_info:
        cli(["bench", *flags, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"argument {flags[0]}: " in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_server_totals_give_each_levels_means():
    from service.bench.load import mean_over, server_totals

    def page(batches: float, images: float, decode_s: float) -> str:
        return (
            f"maskformer_batch_size_sum {images}\nmaskformer_batch_size_count {batches}\n"
            f'maskformer_stage_seconds_sum{{stage="decode"}} {decode_s}\n'
            f'maskformer_stage_seconds_count{{stage="decode"}} {images}\n'
            'maskformer_stage_seconds_bucket{le="0.005",stage="decode"} 1.0\n'
        )

    before, after = server_totals(page(2, 3, 0.5)), server_totals(page(5, 12, 1.4))
    assert mean_over(before, after, "batch") == 3.0  # 9 images in 3 batches
    assert mean_over(before, after, "decode") == pytest.approx(0.1)  # 0.9 s over 9 images
    assert mean_over(before, after, "infer") is None  # not on the page
    assert mean_over(after, after, "batch") is None  # nothing happened
    assert mean_over({}, after, "decode") == pytest.approx(1.4 / 12)  # the series began during the level
    assert server_totals("baseline_requests_total 3\n") == {}


def test_agreement_is_the_worst_images_fraction():
    ref = [torch.zeros(4, 5, dtype=torch.long), torch.ones(2, 2, dtype=torch.long)]
    maps = [ref[0].clone(), ref[1].clone()]
    assert agreement(maps, ref) == 1.0
    maps[0][0, :2] = 7  # 2 of 20 pixels
    maps[1][0, 0] = 0  # 1 of 4
    assert agreement(maps, ref) == 0.75


def test_efficiency_skips_servers_that_cannot_be_matched():
    raw = {"variant": "torch", "device": "cpu", "batch": 2, "img_per_s": 4.0}
    model = {"model": "m", "input_size": [64, 64], "rows": [raw]}
    rows = [{"concurrency": 4, "img_per_s": 3.0}]
    info = {"model": "m", "input_size": [64, 64], "backend": "torch", "device": "cpu", "precision": "fp32"}
    servers = [
        {"name": "ours", "backend": {**info, "max_batch_size": 2}, "rows": rows},
        {"name": "loading", "backend": {"model": "m", "input_size": [64, 64], "backend": None}, "rows": rows},
        {"name": "other model", "backend": {**info, "model": "x", "max_batch_size": 2}, "rows": rows},
        {"name": "batch 8", "backend": {**info, "max_batch_size": 8}, "rows": rows},
        {"name": "baseline", "rows": rows},
    ]
    (only,) = bench_report.efficiency(servers, model)
    assert (only["server"], only["variant"], only["batch"], only["ratio"]) == ("ours", "torch", 2, 0.75)
    assert bench_report.efficiency(servers, None) == []


def test_plot_labels_say_the_arguments_all_our_servers_share_once():
    timeout = "--request-timeout-s 300"
    names = [f"maskformer {timeout}", f"maskformer --backend torch --precision bf16 {timeout}", bench_report.BASELINE]
    assert bench_report.plot_labels(names) == (
        ["maskformer", "maskformer --backend torch --precision bf16", bench_report.BASELINE],
        timeout,
    )
    both = ["maskformer --backend torch --max-batch-size 2", "maskformer --backend onnxruntime --max-batch-size 2"]
    assert bench_report.plot_labels(both) == (
        ["maskformer --backend torch", "maskformer --backend onnxruntime"],
        "--max-batch-size 2",
    )
    # nothing shared, or a single server of ours: the names stay whole
    for names in (["maskformer", "maskformer --backend torch"], [f"maskformer {timeout}", bench_report.BASELINE]):
        assert bench_report.plot_labels(names) == (names, "")


def test_forward_flops_are_counted_once_and_leave_the_model_as_it_was():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    model[2].requires_grad_(False)
    flop = 2 * (8 * 3 * 9 + 4 * 8) * 16 * 20  # multiply-adds per output pixel, counted twice
    assert forward_gflop(model, (16, 20)) == {"convolution": pytest.approx(flop / 1e9)}
    assert [p.requires_grad for p in model.parameters()] == [True, True, False, False]


def test_roofline_keeps_the_best_sample(monkeypatch):
    measured = iter([150.0, 200.0, 120.0])
    monkeypatch.setattr(roofline_module, "matmul_gflops", lambda device, precision: next(measured))
    roofline = Roofline({"convolution": 45.0, "addmm": 5.0})
    roofline.sample("cpu", "fp32")
    roofline.sample("cpu", "fp32")
    roofline.resample()
    assert roofline.rates == {"cpu fp32": 200.0} and roofline.samples == {"cpu fp32": 3}
    assert roofline.fraction(3.0, "cpu", "fp32") == 0.75 and roofline.ceilings() == {"cpu fp32": 4.0}
    baseline = {"name": bench_report.BASELINE, "rows": [{"concurrency": 4, "img_per_s": 1.6}]}
    model = {"ceiling_img_per_s": roofline.ceilings()}
    assert bench_report.ceiling_ratios([baseline], model) == [{"ceiling": "cpu fp32", "concurrency": 4, "ratio": 2.5}]
    assert bench_report.ceiling_ratios([], model) == [] and bench_report.ceiling_ratios([baseline], None) == []


BENCH_SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.sh"))


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck is not installed (pip install -e '.[dev]')")
def test_benchmark_scripts_pass_shellcheck():
    assert {p.name for p in BENCH_SCRIPTS} >= {"run_cpu.sh", "run_gpu.sh", "gpu_wheels.sh"}
    result = subprocess.run([str(SHELLCHECK), *map(str, BENCH_SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_benchmark_refuses_without_a_gpu(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run_gpu.sh"
    command = ["bash", str(script), str(tmp_path / "out"), sys.executable]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2 and "no CUDA GPU" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing built, nothing written


def test_preprocessing_benchmark_writes_its_report(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "preprocess_vs_transformers.py"
    command = [sys.executable, str(script), "--out", str(tmp_path), "--repeats", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "preprocess.json").read_text())
    assert [r["size"] for r in report["rows"]] == [[512, 512], [480, 640], [1080, 1920], [3000, 4000]]
    for row in report["rows"]:
        assert all(row[f"{side}_ms"] > 0 for side in ("ours", "ours_full_decode", "ours_float_resize", "transformers"))
        # reduced-scale decoding only where the JPEG is at least twice the input size
        small = row["size"][0] <= 512
        assert (row["max_abs_diff_vs_full_decode"] == 0) == small, row
    table = (tmp_path / "preprocess.md").read_text()
    assert table.count("\n| 3000x4000 |") == 1 and "ours / transformers" in table


def test_the_model_level_is_written_before_the_server_level_starts(tmp_path, monkeypatch):
    out = tmp_path / "report"
    seen = {}

    def servers(args, weights, images, level):  # what a run cut short during the server level leaves
        seen.update(json.loads((out / "bench.json").read_text()))
        raise KeyboardInterrupt

    monkeypatch.setattr("service.commands_bench._interleaved_servers", servers)
    args = ["bench", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--variants", "torch"]
    with pytest.raises(KeyboardInterrupt):
        cli([*args, "--batch-sizes", "1", "--iters", "1", "--warmup", "0", "--concurrency", "1"])
    assert [r["batch"] for r in seen["model"]["rows"]] == [1] and "server" not in seen
    # the shipped model's decoder attends the pixel embedding: nothing folds, and the report does not say so
    assert not seen["model"]["fold_mask_conv"] and not seen["model"]["rows"][0]["fold_mask_conv"]
    assert seen["model"]["gflop_per_image"] == seen["model"]["gflop_per_image_unfolded"]
    assert "GFLOP per image (convolution" in (out / "bench.md").read_text()
