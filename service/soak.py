"""`maskformer soak`: a bounded load test of a real `maskformer serve` process on loopback.

`concurrency` clients send back-to-back requests for `seconds`: valid JPEG/PNG/WebP images for all three
tasks (multipart, raw body and /segment/batch), hostile inputs, and clients that give up mid-request. It
passes when every answer is the expected one (200 or the input's 4xx, or an explicit 503/429 under
overload), nothing is a 5xx or a dropped connection, the server's RSS after warm-up grows less than
`max_rss_growth`, and the queue is empty at the end. tests/test_soak.py runs a short version in CI.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from model.data.shapes import VAL_SEED, generate
from service.bench.load import ServerProcess, serve_command

OVERLOAD = {503, 429}  # explicit refusals: allowed under load, never silent
STOPPED = (0, -signal.SIGTERM)  # how a server that drained and stopped on SIGTERM exits


@dataclass(frozen=True)
class Kind:
    """One kind of request in the mix and the statuses it may get besides OVERLOAD."""

    name: str
    weight: int
    expected: frozenset[int]


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _images(size: int) -> dict[str, list[bytes]]:
    scenes = [Image.fromarray(generate(VAL_SEED + i).image).resize((size, size)) for i in range(6)]
    return {fmt: [_encode(s, fmt) for s in scenes] for fmt in ("JPEG", "PNG", "WEBP")}


OK = frozenset({200})
KINDS = [
    Kind("multipart", 30, OK),
    Kind("raw-body", 30, OK),
    Kind("batch", 10, OK),
    Kind("garbage", 4, frozenset({400})),
    Kind("truncated", 4, frozenset({400, 200})),  # cut just before the end, an image may still decode
    Kind("gif", 3, frozenset({415})),
    Kind("too-many-pixels", 3, frozenset({413})),
    Kind("bad-parameter", 3, frozenset({422})),
    Kind("abandoned", 3, frozenset()),  # the client gives up after 50 ms; any answer it still gets counts
]


class Mix:
    def __init__(self, image_size: int, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.images = _images(image_size)
        self.gif = _encode(Image.new("RGB", (32, 32)), "GIF")
        self.huge = _encode(Image.new("L", (7000, 7000)), "PNG")  # 49 Mpx > the default 40 Mpx limit

    def request(self, kind: Kind) -> dict[str, Any]:
        """httpx.post keyword arguments for one request of this kind."""
        fmt = self.rng.choice(list(self.images))
        data = self.rng.choice(self.images[fmt])
        params = {"task": self.rng.choice(["semantic", "panoptic", "instance"])}
        media = f"image/{fmt.lower()}"
        raw = {"url": "/segment", "params": params, "headers": {"Content-Type": media}}
        if kind.name == "multipart":
            return {"url": "/segment", "params": params, "files": {"image": ("x", data, media)}}
        if kind.name == "batch":
            pair = [("image", ("a", data, media)), ("image", ("b", data, media))]
            return {"url": "/segment/batch", "params": params, "files": pair}
        if kind.name == "garbage":
            return {**raw, "content": self.rng.randbytes(self.rng.randint(1, 4096))}
        if kind.name == "truncated":
            return {**raw, "content": data[: self.rng.randint(1, len(data) - 1)]}
        if kind.name == "gif":
            return {"url": "/segment", "files": {"image": ("x.gif", self.gif, "image/gif")}}
        if kind.name == "too-many-pixels":
            return {**raw, "headers": {"Content-Type": "image/png"}, "content": self.huge}
        if kind.name == "bad-parameter":
            return {"url": "/segment", "params": {"threshold": "2"}, "files": {"image": ("x", data, media)}}
        if kind.name == "abandoned":
            return {**raw, "content": data, "timeout": 0.05}
        return {**raw, "content": data}


def rss_mb(pid: int) -> float:
    """Resident set size of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def queue_depth(metrics_text: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith("maskformer_queue_depth "):
            return float(line.split()[1])
    raise RuntimeError("the server exports no maskformer_queue_depth")


async def drive(url: str, pid: int, seconds: float, concurrency: int, sample_s: float, image_size: int) -> dict:
    mix = Mix(image_size)
    kinds, weights = KINDS, [k.weight for k in KINDS]
    outcomes: Counter[str] = Counter()  # "kind status", status being a code or an exception name
    unexpected: Counter[str] = Counter()
    latencies: list[float] = []
    rss: list[tuple[float, float]] = []
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        start = time.monotonic()
        stop_at = start + seconds

        async def worker() -> None:
            while time.monotonic() < stop_at:
                kind = mix.rng.choices(kinds, weights)[0]
                kwargs = mix.request(kind)
                t0 = time.perf_counter()
                try:
                    r = await client.post(**kwargs)
                except httpx.TimeoutException as err:
                    result = type(err).__name__
                    if kind.name != "abandoned":
                        unexpected[f"{kind.name} {result}"] += 1
                except httpx.HTTPError as err:  # a dropped or refused connection is never acceptable
                    result = type(err).__name__
                    unexpected[f"{kind.name} {result}"] += 1
                else:
                    result = str(r.status_code)
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - t0)
                    allowed = kind.expected | OVERLOAD | (OK if kind.name == "abandoned" else frozenset())
                    if r.status_code not in allowed:
                        unexpected[f"{kind.name} {result}"] += 1
                outcomes[f"{kind.name} {result}"] += 1

        async def sampler() -> None:
            while True:
                rss.append((round(time.monotonic() - start, 1), round(rss_mb(pid), 1)))
                await asyncio.sleep(sample_s)

        sampling = asyncio.create_task(sampler())
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - start
        depth = -1.0
        for _ in range(100):  # answered requests leave the queue; give abandoned ones a moment to be pruned
            depth = queue_depth((await client.get("/metrics")).text)
            if depth == 0:
                break
            await asyncio.sleep(0.1)
        sampling.cancel()
        rss.append((round(time.monotonic() - start, 1), round(rss_mb(pid), 1)))
        ready = (await client.get("/readyz")).status_code
    statuses: Counter[str] = Counter()
    for key, n in outcomes.items():
        statuses[key.split(" ", 1)[1]] += n
    ms = np.asarray(latencies) * 1000
    return {
        "seconds": round(elapsed, 1),
        "concurrency": concurrency,
        "requests": sum(outcomes.values()),
        "ok_per_s": round(len(latencies) / elapsed, 2),
        "status_mix": dict(sorted(statuses.items())),
        "by_kind": dict(sorted(outcomes.items())),
        "unexpected": dict(unexpected),
        "latency_ms_200": {f"p{q}": round(float(np.percentile(ms, q)), 1) for q in (50, 90, 99)} if len(ms) else {},
        "rss_mb": rss,
        "queue_depth_end": depth,
        "ready_end": ready,
    }


def judge(result: dict, warmup_s: float, max_rss_growth: float) -> list[str]:
    """Why the run failed (empty when it passed); also adds the RSS growth figures to `result`."""
    after = [mb for t, mb in result["rss_mb"] if t >= warmup_s]
    base = after[0] if after else result["rss_mb"][-1][1]
    growth = (max(after, default=base) - base) / base
    result["rss_after_warmup_mb"], result["rss_growth"] = base, round(growth, 4)
    result["rss_samples_after_warmup"] = len(after)
    result["server_errors"] = sum(n for s, n in result["status_mix"].items() if s[0] == "5" and int(s) not in OVERLOAD)
    problems = [f"{n} x {what}" for what, n in result["unexpected"].items()]
    if result["server_errors"]:
        problems.append(f"{result['server_errors']} server errors (5xx other than 503)")
    if len(after) < 2:  # a growth of 0 from one sample would pass without measuring anything
        problems.append(f"RSS growth not measured: {len(after)} sample(s) after the {warmup_s:g} s warm-up")
    elif growth >= max_rss_growth:
        problems.append(f"RSS grew {growth:.1%} after warm-up (limit {max_rss_growth:.0%})")
    if result["queue_depth_end"] != 0:
        problems.append(f"queue depth {result['queue_depth_end']} at the end")
    if result["ready_end"] != 200:
        problems.append(f"/readyz {result['ready_end']} at the end")
    if not result["latency_ms_200"]:
        problems.append("no request succeeded")
    if result["exit_code"] not in STOPPED:
        problems.append(f"exit code {result['exit_code']} after SIGTERM (-9: killed, not stopped within 60 s)")
    return problems


def plot_rss(result: dict, warmup_s: float, max_rss_growth: float, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    t, mb = zip(*result["rss_mb"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(t, mb, marker="o", markersize=3)
    ax.axvline(warmup_s, color="grey", linestyle="--", label="end of warm-up")
    base = result["rss_after_warmup_mb"]
    ax.axhline(base * (1 + max_rss_growth), color="red", linestyle=":", label=f"limit: +{max_rss_growth:.0%}")
    ax.set(xlabel="seconds", ylabel="server RSS (MiB)", title="maskformer serve RSS during the soak")
    ax.set_ylim(bottom=0)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def report(result: dict) -> str:
    """The figures as Markdown, for benchmarks/results/soak/README.md."""
    lat = result["latency_ms_200"]
    lines = [
        f"# Soak: {result['concurrency']} clients for {result['seconds']} s",
        "",
        f"`{' '.join(['maskformer serve', *result['serve_args']])}` on loopback: "
        f"{'passed' if result['passed'] else 'FAILED'}.",
        "",
        f"- requests: {result['requests']} ({result['ok_per_s']} answered 200 per second)",
        f"- status mix: {', '.join(f'{s}: {n}' for s, n in result['status_mix'].items())}",
        f"- unexpected answers: {sum(result['unexpected'].values())}; server errors (5xx but 503): "
        f"{result['server_errors']}",
        f"- latency of 200s: p50 {lat.get('p50')} ms, p90 {lat.get('p90')} ms, p99 {lat.get('p99')} ms",
        f"- RSS after warm-up {result['rss_after_warmup_mb']} MiB, growth {result['rss_growth']:.1%} "
        f"(samples in soak.json, curve in rss.png)",
        f"- queue depth at the end: {result['queue_depth_end']:g}; /readyz {result['ready_end']}; "
        f"exit code after SIGTERM {result['exit_code']}",
        "",
        "| request kind | outcome | count |",
        "| --- | --- | ---: |",
        *(f"| {k.split(' ', 1)[0]} | {k.split(' ', 1)[1]} | {n} |" for k, n in result["by_kind"].items()),
    ]
    if result["problems"]:
        lines += ["", "Problems:", *(f"- {p}" for p in result["problems"])]
    return "\n".join(lines) + "\n"


def soak(
    out: Path | None,
    seconds: float = 300,
    concurrency: int = 32,
    sample_s: float = 10,
    warmup_s: float = 60,
    max_rss_growth: float = 0.10,
    image_size: int = 256,
    port: int = 8766,
    serve_args: list[str] | None = None,
    progress: Any = print,
) -> tuple[dict, list[str]]:
    """Start `maskformer serve`, drive it, stop it with SIGTERM; returns (figures, problems)."""
    url = f"http://127.0.0.1:{port}"
    log = (out or Path("/tmp")) / "soak-serve.log"
    command = serve_command(None, port, serve_args or [])
    with ServerProcess(command, url, log) as server:
        assert server.proc is not None
        progress(f"soak: {concurrency} clients for {seconds:g} s against {' '.join(command[2:])}")
        result = asyncio.run(drive(url, server.proc.pid, seconds, concurrency, sample_s, image_size))
    result["exit_code"] = server.proc.returncode
    result["serve_args"] = serve_args or []
    problems = judge(result, warmup_s, max_rss_growth)
    result["passed"], result["problems"] = not problems, problems
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "README.md").write_text(report(result))
        plot_rss(result, warmup_s, max_rss_growth, out / "rss.png")
    return result, problems
