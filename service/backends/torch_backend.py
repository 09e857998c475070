"""PyTorch eager (or torch.compile) on CPU or CUDA, in fp32, fp16 or bf16."""

from __future__ import annotations

import torch
from torch import Tensor

from model.maskformer import MaskFormer
from service.backends.base import Backend

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchBackend(Backend):
    name = "torch"

    def __init__(
        self, model: MaskFormer, device: torch.device, precision: str, max_batch_size: int, compile: bool = False
    ) -> None:
        if precision != "fp32" and device.type != "cuda":
            raise ValueError(f"{precision} needs a CUDA device; use fp32 on the CPU")
        self.device, self.precision, self.max_batch_size = device, precision, max_batch_size
        self.dtype = DTYPES[precision]
        self.model = model.to(device).eval()
        self.forward = torch.compile(self.model, dynamic=False) if compile else self.model

    @torch.inference_mode()
    def infer(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = images.to(self.device, non_blocking=True).float()
        with torch.autocast(self.device.type, self.dtype, enabled=self.precision != "fp32"):
            out = self.forward(x)
        return out["pred_logits"].float(), out["pred_masks"].float()
