"""Server level: a closed-loop load generator (async httpx) against a server on loopback, and the server
processes it measures (`maskformer serve`, or any command that serves POST /segment and GET /readyz).

Each concurrency level runs `concurrency` clients that send back-to-back requests until `max_requests`
have been sent or `max_seconds` have passed, whichever comes first, so every level is bounded: requests
still in flight at `max_seconds` are cut off there and counted as such, not as errors.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
from PIL import Image

from model.data.shapes import VAL_SEED, generate
from service.bench.model_bench import percentiles
from service.client import Client, ServiceError
from service.metrics import STAGES


def sample_images(count: int, size: int) -> list[bytes]:
    """JPEGs of shapes validation scenes, resized to size x size (what a client would upload)."""
    out = []
    for i in range(count):
        img = Image.fromarray(generate(VAL_SEED + i).image).resize((size, size), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def server_totals(metrics_text: str) -> dict[str, float]:
    """Running totals from a `maskformer serve` /metrics page: `batch_sum` and `batch_count` of the batch-size
    histogram, and `<stage>_sum` and `<stage>_count` of the per-image stage histogram. Empty for a server
    that exports neither (the baseline)."""
    totals = {
        f"batch_{kind}": float(value)
        for kind, value in re.findall(r"^maskformer_batch_size_(sum|count) (\S+)$", metrics_text, re.MULTILINE)
    }
    pattern = r'^maskformer_stage_seconds_(sum|count)\{stage="(\w+)"\} (\S+)$'
    for kind, stage, value in re.findall(pattern, metrics_text, re.MULTILINE):
        totals[f"{stage}_{kind}"] = float(value)
    return totals


def mean_over(before: dict[str, float], after: dict[str, float], name: str) -> float | None:
    """The mean of one histogram over the observations between two /metrics readings (a labelled series
    appears at its first observation, so one missing before counts from zero)."""
    total, count = f"{name}_sum", f"{name}_count"
    if not {total, count} <= after.keys():
        return None
    n = after[count] - before.get(count, 0.0)
    return (after[total] - before.get(total, 0.0)) / n if n > 0 else None


async def _server_totals(client: httpx.AsyncClient) -> dict[str, float]:
    try:
        r = await client.get("/metrics")
    except httpx.HTTPError:
        return {}
    return server_totals(r.text) if r.status_code == 200 else {}


async def run_level(
    url: str,
    images: list[bytes],
    task: str,
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    api_key: str | None = None,
) -> dict:
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    sent = cut_off = 0
    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, headers=headers) as client:
        before = await _server_totals(client)
        start = time.perf_counter()
        stop_at = start + max_seconds

        async def worker() -> None:
            nonlocal sent, cut_off
            while sent < max_requests and time.perf_counter() < stop_at:
                data = images[sent % len(images)]
                sent += 1
                t0 = time.perf_counter()
                try:
                    post = client.post(
                        "/segment", params={"task": task}, files={"image": ("image.jpg", data, "image/jpeg")}
                    )
                    r = await asyncio.wait_for(post, stop_at - t0)  # the level ends at max_seconds, in flight or not
                    statuses[str(r.status_code)] += 1
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - t0)
                except httpx.HTTPError as err:
                    statuses[type(err).__name__] += 1
                except asyncio.TimeoutError:  # TimeoutError from 3.11 on
                    cut_off += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        after = await _server_totals(client)
    row: dict = {
        "concurrency": concurrency,
        "requests": sent,
        "ok": len(latencies),
        "errors": sum(n for s, n in statuses.items() if s != "200"),
        "status": dict(statuses),
        "cut_off": cut_off,  # still in flight at max_seconds: neither answered nor an error
        "seconds": round(elapsed, 3),
        "img_per_s": round(len(latencies) / elapsed, 3),
        **(percentiles(latencies) if latencies else {}),
    }
    batch = mean_over(before, after, "batch")
    row["avg_batch"] = None if batch is None else round(batch, 3)
    # Each image's mean time per stage, from the server's own histograms ("infer" is its batch's forward pass)
    stages = {stage: mean_over(before, after, stage) for stage in STAGES}
    row["stage_ms"] = {k: round(1000 * v, 3) for k, v in stages.items() if v is not None} or None
    return row


def sweep(
    url: str,
    images: list[bytes],
    task: str,
    levels: list[int],
    max_requests: int,
    max_seconds: float,
    api_key: str | None = None,
    progress=print,
) -> list[dict]:
    rows = []
    for c in levels:
        row = asyncio.run(run_level(url, images, task, c, max_requests, max_seconds, api_key))
        progress(
            f"  concurrency {c}: {row['img_per_s']} img/s, p50 {row.get('p50_ms')} ms, p99 {row.get('p99_ms')} ms, "
            f"avg batch {row['avg_batch']}, errors {row['errors']} {row['status']}, cut off {row['cut_off']}"
        )
        rows.append(row)
    return rows


def server_backend(url: str, api_key: str | None = None) -> dict | None:
    """What a `maskformer serve` runs (backend, device, precision, max batch size...), from GET /v1/model;
    None for a server without that endpoint (the baseline)."""
    try:
        with Client(url, api_key, timeout=10) as client:
            described = client.model()
    except (httpx.HTTPError, ServiceError):
        return None
    keys = {"name", "input_size", "backend", "device", "precision", "max_batch_size"}
    keys |= {"torch_compile", "cuda_graphs", "fold_mask_conv", "overlap_postprocessing"}
    info = {k: v for k, v in described.items() if k in keys}
    return {**info, "model": info.pop("name", None)}


class ServerProcess:
    """Starts a server command, waits for GET /readyz, and stops it with SIGTERM on exit."""

    def __init__(self, command: list[str], url: str, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.command, self.url, self.log_path = command, url, log_path
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        try:  # something already answering there would be measured instead of the server started here
            httpx.get(f"{self.url}/healthz", timeout=1)
            raise RuntimeError(f"{self.url} is already in use; pick another --port")
        except httpx.TransportError:
            pass
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + 600  # a first start exports the ONNX
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.close()
                raise RuntimeError(f"{self.command[0]} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"{self.url} not ready after 600 s; see {self.log_path}")

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def serve_command(weights: Path | None, port: int, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if weights:
        cmd += ["--weights", str(weights)]
    return cmd + extra


def baseline_command(hf_dir: Path, port: int) -> list[str]:
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "baseline_server.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script}: the baseline server lives in the repository's benchmarks/ folder")
    return [sys.executable, str(script), "--model", str(hf_dir), "--port", str(port)]
