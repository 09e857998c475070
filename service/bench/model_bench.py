"""Model level: each backend variant at each batch size, on random uint8 images of the input size.

A variant is `backend[:precision][+compile][+graphs][+unfolded]`, e.g. `torch`, `torch:bf16`,
`torch:fp16+graphs`, `onnxruntime`, `onnxruntime+unfolded` (serve's fold_mask_conv off), `tensorrt:fp16`.
Variants this machine cannot run are reported as skipped, with the reason. Each variant also segments a
few shapes validation images, and the report says how many of their semantic pixels agree with torch fp32
on the CPU: what a faster variant costs in fidelity. Each row also says what share of the machine's matmul
rate in its precision the forward pass reaches (service/bench/roofline.py).
"""

from __future__ import annotations

import gc
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from model.checkpoint import load_model, read_metadata
from model.data.shapes import VAL_SEED, generate
from model.inference import folds_mask_conv, prepare_for_inference, run
from model.postprocess import postprocess
from service.backends import create_backend, resolve_device
from service.bench.roofline import Roofline, forward_gflop
from service.settings import ServeSettings


@dataclass
class Variant:
    name: str
    backend: str
    precision: str = "fp32"
    compile: bool = False
    graphs: bool = False
    unfolded: bool = False  # serve's fold_mask_conv off: the A/B of the folded mask head


def parse_variant(text: str) -> Variant:
    head, *flags = text.split("+")
    backend, _, precision = head.partition(":")
    if backend not in ("torch", "onnxruntime", "tensorrt"):
        raise ValueError(f"unknown backend {backend!r} in variant {text!r} (torch, onnxruntime, tensorrt)")
    if precision not in ("", "fp32", "fp16", "bf16"):
        raise ValueError(f"unknown precision {precision!r} in variant {text!r} (fp32, fp16, bf16)")
    unknown = set(flags) - {"compile", "graphs", "unfolded"}
    if unknown:
        raise ValueError(f"unknown flag(s) {sorted(unknown)} in variant {text!r} (+compile, +graphs, +unfolded)")
    return Variant(text, backend, precision or "fp32", "compile" in flags, "graphs" in flags, "unfolded" in flags)


def default_variants() -> list[str]:
    if torch.cuda.is_available():
        return ["torch", "torch:fp16", "torch:fp16+graphs", "onnxruntime", "tensorrt:fp16"]
    from model.inference import cpu_has_bf16

    return ["torch", "torch:bf16", "onnxruntime"] if cpu_has_bf16() else ["torch", "onnxruntime"]


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {f"p{q}_ms": round(float(np.percentile(ms, q)), 3) for q in (50, 90, 99)}


class PeakMemory:
    """Peak memory over a block: what the process holds on a GPU (the caching allocator's reserved memory,
    which counts CUDA graphs' private pools; their replays allocate nothing), resident set size (VmHWM) on
    the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # blocks cached by earlier work are not this block's
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
            self.mib = torch.cuda.max_memory_reserved() / 2**20
        else:
            try:
                status = Path("/proc/self/status").read_text()
                kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
            except (OSError, StopIteration):
                kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
            self.mib = kib / 1024


FIDELITY_IMAGES = 4


def fidelity_images(input_size: tuple[int, int]) -> Tensor:
    """[4, 3, H, W] uint8 shapes validation images at the input size: the same pixels for every variant."""
    images = torch.stack([torch.from_numpy(generate(VAL_SEED + i).image) for i in range(FIDELITY_IMAGES)])
    resized = F.interpolate(images.permute(0, 3, 1, 2).float(), size=input_size, mode="bilinear", antialias=True)
    return resized.round().clamp(0, 255).to(torch.uint8)


def semantic_maps(infer, images: Tensor, batch: int, isthing: list[bool]) -> list[Tensor]:
    """Each image's semantic label map, running `infer` on at most `batch` images at a time."""
    maps = []
    for start in range(0, len(images), batch):
        logits, masks = infer(images[start : start + batch])
        outputs = {"pred_logits": logits.float().cpu(), "pred_masks": masks.float().cpu()}
        maps += [r.label_map() for r in postprocess(outputs, "semantic", isthing)]
    return maps


def reference_maps(weights: Path, images: Tensor, isthing: list[bool]) -> list[Tensor]:
    """The maps of torch fp32 on the CPU, which the variants' agreement is measured against."""
    cpu = torch.device("cpu")
    model = prepare_for_inference(load_model(weights), cpu, "fp32")
    with torch.inference_mode():
        return semantic_maps(lambda x: run(model, x, cpu, "fp32"), images, len(images), isthing)


def agreement(maps: list[Tensor], reference: list[Tensor]) -> float:
    """The worst image's fraction of pixels with the reference's class."""
    return min((a == b).float().mean().item() for a, b in zip(maps, reference))


def bench_variant(
    variant: Variant,
    weights: Path,
    batch_sizes: list[int],
    iters: int,
    warmup: int,
    cache_dir: Path,
    device: str,
    reference: list[Tensor] | None = None,
) -> list[dict]:
    cfg, info = read_metadata(weights)
    settings = ServeSettings.model_validate(
        {
            "weights": weights,
            "backend": variant.backend,
            "precision": variant.precision,
            "device": device,
            "torch_compile": variant.compile,
            "cuda_graphs": variant.graphs,
            "fold_mask_conv": not variant.unfolded,
            "max_batch_size": max(batch_sizes),
            "cache_dir": cache_dir,
        }
    )
    backend = create_backend(settings, weights, cfg)
    if variant.graphs:
        backend.warmup(cfg.input_size)  # captures a CUDA graph per batch size, as the server's start-up does
    fidelity = None
    if reference is not None:  # once per variant, at its largest batch size
        maps = semantic_maps(backend.infer, fidelity_images(cfg.input_size), max(batch_sizes), info.isthing)
        fidelity = round(agreement(maps, reference), 6)
    memory_kind = "cuda_reserved" if backend.device.type == "cuda" else "rss"
    folded = bool(backend.describe().get("fold_mask_conv"))
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
                "semantic_agreement": fidelity,
                "fold_mask_conv": folded,
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
    reference = reference_maps(weights, fidelity_images(cfg.input_size), info.isthing)
    # FLOPs as the server runs them (the mask head folded on a CPU where that saves work), and unfolded
    counted = load_model(weights)
    unfolded = forward_gflop(counted, cfg.input_size)
    try:
        counted.fold_mask_conv = folds_mask_conv(cfg, resolve_device(device))
    except RuntimeError:  # `cuda` without a usable GPU: each variant reports that as its skip reason
        pass
    roofline = Roofline(forward_gflop(counted, cfg.input_size) if counted.fold_mask_conv else unfolded)
    rows, skipped = [], []
    for text in variants:
        variant = parse_variant(text)
        try:
            new = bench_variant(variant, weights, batch_sizes, iters, warmup, cache_dir, device, reference)
        except Exception as err:  # a missing library or device: report it, go on with the others
            skipped.append({"variant": text, "reason": f"{type(err).__name__}: {err}"})
            progress(f"  {text}: skipped ({type(err).__name__}: {err})")
            continue
        finally:
            if torch.cuda.is_available():  # the variant's backend is gone: hand its cached memory back
                gc.collect()
                torch.cuda.empty_cache()
        for r in new:
            progress(f"  {text} batch {r['batch']}: {r['img_per_s']} img/s, p50 {r['p50_ms']} ms")
        if new:
            roofline.sample(new[0]["device"], variant.precision)
        rows += new
    roofline.resample()  # a second sample for every rate, minutes after the first
    for r in rows:
        gflop = roofline.gflop_per_image if r["fold_mask_conv"] else sum(unfolded.values())
        r["of_matmul_rate"] = roofline.fraction(r["img_per_s"], r["device"], r["precision"], gflop)
    return {
        "weights": str(weights),
        "model": info.name,
        "input_size": list(cfg.input_size),
        "threads": torch.get_num_threads(),
        "fidelity_images": FIDELITY_IMAGES,
        "gflop_per_image": roofline.gflop_per_image,
        "gflop_per_image_unfolded": sum(unfolded.values()),
        "fold_mask_conv": counted.fold_mask_conv,
        "gflop_by_op": {op: round(n, 4) for op, n in roofline.gflop_by_op.items()},
        "matmul_gflops": roofline.rates,
        "matmul_samples": roofline.samples,
        "ceiling_img_per_s": roofline.ceilings(),
        "rows": rows,
        "skipped": skipped,
    }
