import os

import pytest
import torch


def _default_threads() -> int:
    """2, or this worker's share of the cores when pytest-xdist runs the suite on several (addopts)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # not macOS
    return max(1, min(2, cores // workers))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("TEST_THREADS", _default_threads())))


def tiny_config(size: int = 128, dropout: float = 0.1, norm: str = "frozen_bn"):
    """A small, fast model configuration for tests (ResNet-10, 64 wide, 2 decoder layers, 10 queries)."""
    from model import BackboneConfig, MaskFormerConfig

    return MaskFormerConfig(
        num_classes=5,
        backbone=BackboneConfig(kind="resnet", block="basic", layers=(1, 1, 1, 1), norm=norm),
        conv_dim=64,
        mask_dim=64,
        hidden_dim=64,
        num_queries=10,
        nheads=4,
        dim_feedforward=128,
        dec_layers=2,
        dropout=dropout,
        input_size=(size, size),
    )


def scene(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A piecewise-constant RGB image batch in 0..255 (horizon plus discs), like a photo's flat regions."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    img = torch.empty(batch, 3, height, width)
    for b in range(batch):
        img[b] = (torch.rand(3, generator=g) * 255)[:, None, None]
        below = yy > height * (0.3 + 0.4 * torch.rand((), generator=g)) + 0.2 * (xx - width / 2)
        img[b][:, below] = torch.rand(3, 1, generator=g) * 255
        for _ in range(4):
            cy, cx = torch.rand(2, generator=g) * torch.tensor([height, width])
            r = 8 + torch.rand((), generator=g) * height / 5
            img[b][:, (yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = torch.rand(3, 1, generator=g) * 255
    return img
