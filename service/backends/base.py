"""The one interface every inference backend implements."""

from __future__ import annotations

import abc

import torch
from torch import Tensor


class Backend(abc.ABC):
    """Runs the raw model: uint8 images [B, 3, H, W] in, (pred_logits, pred_masks) out on `device`.

    The input size is static; B ranges over 1..max_batch_size. Post-processing runs on `device` too.
    """

    name: str
    device: torch.device
    precision: str
    max_batch_size: int

    @abc.abstractmethod
    def infer(self, images: Tensor) -> tuple[Tensor, Tensor]: ...

    def warmup(self, input_size: tuple[int, int]) -> list[int]:
        """Run every batch size once, so no request pays for first-run allocation or tuning."""
        sizes = list(range(1, self.max_batch_size + 1))
        for b in sizes:
            self.infer(torch.zeros(b, 3, *input_size, dtype=torch.uint8))
        return sizes

    def describe(self) -> dict[str, object]:
        return {"backend": self.name, "device": str(self.device), "precision": self.precision}
