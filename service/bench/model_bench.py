"""Model level: each backend variant at each batch size, on random uint8 images of the input size.

A variant is `backend[:precision][+compile][+graphs]`, e.g. `torch`, `torch:bf16`, `torch:fp16+graphs`,
`onnxruntime`, `tensorrt:fp16`. Variants this machine cannot run are reported as skipped, with the reason.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import read_metadata
from service.backends import create_backend
from service.settings import ServeSettings


@dataclass
class Variant:
    name: str
    backend: str
    precision: str = "fp32"
    compile: bool = False
    graphs: bool = False


def parse_variant(text: str) -> Variant:
    head, *flags = text.split("+")
    backend, _, precision = head.partition(":")
    if backend not in ("torch", "onnxruntime", "tensorrt"):
        raise ValueError(f"unknown backend {backend!r} in variant {text!r} (torch, onnxruntime, tensorrt)")
    if precision not in ("", "fp32", "fp16", "bf16"):
        raise ValueError(f"unknown precision {precision!r} in variant {text!r} (fp32, fp16, bf16)")
    unknown = set(flags) - {"compile", "graphs"}
    if unknown:
        raise ValueError(f"unknown flag(s) {sorted(unknown)} in variant {text!r} (+compile, +graphs)")
    return Variant(text, backend, precision or "fp32", "compile" in flags, "graphs" in flags)


def default_variants() -> list[str]:
    if torch.cuda.is_available():
        return ["torch", "torch:fp16", "torch:fp16+graphs", "onnxruntime", "tensorrt:fp16"]
    from model.inference import cpu_has_bf16

    return ["torch", "torch:bf16", "onnxruntime"] if cpu_has_bf16() else ["torch", "onnxruntime"]


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {f"p{q}_ms": round(float(np.percentile(ms, q)), 3) for q in (50, 90, 99)}


class PeakMemory:
    """Peak memory over a block: CUDA allocations on a GPU, resident set size (VmHWM) on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            except OSError:
                pass  # not Linux, or not allowed: VmHWM (or ru_maxrss) is then the process's peak so far
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mib = torch.cuda.max_memory_allocated() / 2**20
        else:
            try:
                status = Path("/proc/self/status").read_text()
                kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
            except (OSError, StopIteration):
                kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
            self.mib = kib / 1024


def bench_variant(
    variant: Variant, weights: Path, batch_sizes: list[int], iters: int, warmup: int, cache_dir: Path, device: str
) -> list[dict]:
    cfg, _ = read_metadata(weights)
    settings = ServeSettings.model_validate(
        {
            "weights": weights,
            "backend": variant.backend,
            "precision": variant.precision,
            "device": device,
            "torch_compile": variant.compile,
            "cuda_graphs": variant.graphs,
            "max_batch_size": max(batch_sizes),
            "cache_dir": cache_dir,
        }
    )
    backend = create_backend(settings, weights, cfg)
    memory_kind = "cuda_allocated" if backend.device.type == "cuda" else "rss"
    rows = []
    for b in batch_sizes:
        images = torch.randint(0, 256, (b, 3, *cfg.input_size), dtype=torch.uint8)
        for _ in range(warmup):
            backend.infer(images)
        times = []
        with PeakMemory(backend.device) as peak:
            for _ in range(iters):
                t0 = time.perf_counter()
                logits, masks = backend.infer(images)
                if masks.is_cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        rows.append(
            {
                "variant": variant.name,
                "backend": backend.name,
                "device": str(backend.device),
                "precision": variant.precision,
                "batch": b,
                "iters": iters,
                "img_per_s": round(b * iters / sum(times), 3),
                **percentiles(times),
                "peak_mib": round(peak.mib, 1),
                "memory": memory_kind,
            }
        )
    return rows


def bench_models(
    weights: Path,
    variants: list[str],
    batch_sizes: list[int],
    iters: int,
    warmup: int,
    cache_dir: Path,
    device: str = "auto",
    progress=print,
) -> dict:
    """Rows for every variant and batch size; a variant that cannot run here gives one `skipped` row."""
    cfg, info = read_metadata(weights)
    rows, skipped = [], []
    for text in variants:
        variant = parse_variant(text)
        try:
            new = bench_variant(variant, weights, batch_sizes, iters, warmup, cache_dir, device)
        except Exception as err:  # a missing library or device: report it, go on with the others
            skipped.append({"variant": text, "reason": f"{type(err).__name__}: {err}"})
            progress(f"  {text}: skipped ({type(err).__name__}: {err})")
            continue
        rows += new
        for r in new:
            progress(f"  {text} batch {r['batch']}: {r['img_per_s']} img/s, p50 {r['p50_ms']} ms")
    return {
        "weights": str(weights),
        "model": info.name,
        "input_size": list(cfg.input_size),
        "threads": torch.get_num_threads(),
        "rows": rows,
        "skipped": skipped,
    }
