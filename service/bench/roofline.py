"""How close a forward pass runs to what this machine's arithmetic allows.

A forward pass's floating-point work is counted once, by torch's FlopCounterMode (nearly all of it is
convolutions). A large square matmul in the same precision, on the same device and threads, measures how
many of those operations per second the machine sustains. A shared machine's speed drifts over minutes, so
the rate is sampled next to each variant's timings and again at the end, and the best sample counts. Their
quotient is a guide, not a bound: a convolution kernel can beat a plain matmul, TensorRT may run fp32 in
TF32, and a variant timed in a fast moment can beat a rate sampled in slower ones. It says how much a
backend could still gain without changing precision or the arithmetic itself, and how fast the forward
pass alone could serve images.
"""

from __future__ import annotations

import time

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MATMUL_SIDE = {"cpu": 4096, "cuda": 8192}  # large enough to reach a device's sustained rate
MATMUL_SECONDS = 1.0  # timed products stop after this much time (at least two run)


def forward_gflop(model: nn.Module, input_size: tuple[int, int]) -> dict[str, float]:
    """GFLOP (multiply and add counted apart) of one image's forward pass at the input size, per operator."""
    from torch.utils.flop_counter import FlopCounterMode

    model = model.float().eval()
    # frozen parameters record no autograd graph (FlopCounterMode's module tracker fails under no_grad)
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, *input_size))
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    counts = counter.get_flop_counts()["Global"]
    return {str(op).split(".")[-1]: n / 1e9 for op, n in sorted(counts.items(), key=lambda kv: -kv[1])}


def matmul_gflops(device: torch.device, precision: str) -> float:
    """GFLOP/s of the best timed product of two square matrices, with this process's threads."""
    n = MATMUL_SIDE.get(device.type, 4096)
    a = torch.randn(n, n, device=device).to(DTYPES[precision])
    b = torch.randn(n, n, device=device).to(DTYPES[precision])
    times: list[float] = []
    a @ b  # warm-up: kernel choice and first-touch of the output
    start = time.perf_counter()
    while len(times) < 2 or (time.perf_counter() - start < MATMUL_SECONDS and len(times) < 20):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Roofline:
    """The best matmul rate sampled per (device, precision), and each forward pass's share of it."""

    def __init__(self, gflop_by_op: dict[str, float]) -> None:
        self.gflop_by_op = gflop_by_op
        self.gflop_per_image = sum(gflop_by_op.values())
        self.rates: dict[str, float] = {}
        self.samples: dict[str, int] = {}

    def sample(self, device: str, precision: str) -> None:
        key = f"{device} {precision}"
        rate = round(matmul_gflops(torch.device(device), precision), 1)
        self.rates[key] = max(self.rates.get(key, 0.0), rate)
        self.samples[key] = self.samples.get(key, 0) + 1

    def resample(self) -> None:
        for key in list(self.rates):
            self.sample(*key.split(" "))

    def fraction(self, img_per_s: float, device: str, precision: str, gflop: float | None = None) -> float:
        """The forward pass's GFLOP/s (`gflop` per image, default the counted pass's) over the best matmul
        rate sampled on that device in that precision."""
        per_image = self.gflop_per_image if gflop is None else gflop
        return round(img_per_s * per_image / self.rates[f"{device} {precision}"], 3)

    def ceilings(self) -> dict[str, float]:
        """img/s if the forward pass ran at the matmul's rate, per measured device and precision."""
        return {key: round(rate / self.gflop_per_image, 3) for key, rate in self.rates.items()}
