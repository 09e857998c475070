"""The one interface every inference backend implements."""

from __future__ import annotations

import abc
from collections.abc import Sequence

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
    # Whether one batch's post-processing (on `device`, in another thread) may overlap the next batch's
    # forward pass. Not when the forward pass is queued on the CUDA stream post-processing uses too: its
    # host syncs would then wait for the next batch's whole forward pass, and nothing would be gained.
    # Where it may, the `overlap_postprocessing` setting can still turn it off (Pipeline.overlaps_postprocessing).
    overlaps_postprocessing: bool = True

    @abc.abstractmethod
    def infer(self, images: Tensor) -> tuple[Tensor, Tensor]: ...

    def stack(self, images: Sequence[Tensor]) -> Tensor:
        """The batch on the host, page-locked when the device is a GPU: its copy to the device is then an
        asynchronous DMA that leaves the host free for the launches that follow, not a staged synchronous
        copy. (PyTorch's pinned-memory cache reuses the buffers and waits for a pending copy before reuse.)

        Where some inputs are already on the GPU (service/decode_gpu.py) the batch is stacked there, on the
        current stream; each such input was made on the decoder's stream, so it is marked used on this one
        before it is freed (else the decoder could reuse its memory while the stack still reads it)."""
        if any(t.is_cuda for t in images):
            stream = torch.cuda.current_stream(self.device)
            for t in images:
                if t.is_cuda:
                    t.record_stream(stream)
            return torch.stack([t.to(self.device, non_blocking=True) for t in images])
        out = torch.empty((len(images), *images[0].shape), dtype=images[0].dtype, pin_memory=self.device.type == "cuda")
        return torch.stack(list(images), out=out)

    def warmup(self, input_size: tuple[int, int]) -> list[int]:
        """Run every batch size once, so no request pays for first-run allocation or tuning."""
        sizes = list(range(1, self.max_batch_size + 1))
        for b in sizes:
            self.infer(torch.zeros(b, 3, *input_size, dtype=torch.uint8))
        return sizes

    def describe(self) -> dict[str, object]:
        return {"backend": self.name, "device": str(self.device), "precision": self.precision}
