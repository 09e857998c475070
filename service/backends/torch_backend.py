"""PyTorch eager (or torch.compile) on CPU or CUDA, in fp32, fp16 or bf16, optionally with CUDA graphs.

The model is prepared by model/inference.py: batch norms folded, weights cast once, channels_last
activations on a CPU (bf16 there needs AMX or AVX512-BF16) and in fp16/bf16 on CUDA, and fp32 on CUDA
without TF32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from model.inference import prepare_for_inference, run
from model.maskformer import MaskFormer
from service.backends.base import Backend


class TorchBackend(Backend):
    name = "torch"

    def __init__(
        self,
        model: MaskFormer,
        device: torch.device,
        precision: str,
        max_batch_size: int,
        compile: bool = False,
        cuda_graphs: bool = False,
        fold_mask_conv: bool = True,
    ) -> None:
        if cuda_graphs and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.device, self.precision, self.max_batch_size = device, precision, max_batch_size
        self.overlaps_postprocessing = device.type != "cuda"  # on CUDA, both use the current stream
        # ValueError for a precision it can't run
        self.model = prepare_for_inference(model, device, precision, fold_mask_conv)
        self.module = torch.compile(self.model, dynamic=False) if compile else self.model
        self.cuda_graphs = cuda_graphs
        # batch size -> (graph, static input, static outputs); captured at warm-up
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor, tuple[Tensor, Tensor]]] = {}

    def _forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return run(self.module, images, self.device, self.precision)

    @torch.no_grad()
    def infer(self, images: Tensor) -> tuple[Tensor, Tensor]:
        graph = self.graphs.get(images.shape[0])
        if graph is None:
            return self._forward(images.to(self.device, non_blocking=True))
        g, static_in, (logits, masks) = graph
        static_in.copy_(images, non_blocking=True)
        g.replay()
        return logits.clone(), masks.clone()  # the next replay overwrites the static outputs

    def warmup(self, input_size: tuple[int, int]) -> list[int]:
        sizes = super().warmup(input_size)
        if self.cuda_graphs:
            # Largest first, and all in the first graph's memory pool: one pool sized for the largest batch
            # instead of one private pool per batch size. Safe because replays run one at a time on one
            # stream and infer() clones a replay's outputs before the next replay can overwrite them (graphs
            # that never run at once and never read each other's outputs may share a pool in any replay order:
            # pytorch/pytorch#166975, which vLLM relies on).
            pool = None  # a pool handle: a tuple of ints in torch 2.11, an opaque type in later versions
            for b in sorted(sizes, reverse=True):
                self.graphs[b] = self._capture(b, input_size, pool)
                if pool is None:
                    pool = self.graphs[b][0].pool()
        return sizes

    @torch.no_grad()
    def _capture(self, batch: int, input_size: tuple[int, int], pool: Any = None):
        static_in = torch.zeros(batch, 3, *input_size, dtype=torch.uint8, device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm up on a side stream, as capture requires
            for _ in range(2):
                self._forward(static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            static_out = self._forward(static_in)
        return g, static_in, static_out

    def describe(self) -> dict[str, object]:
        return {
            **super().describe(),
            "torch_compile": self.module is not self.model,
            "cuda_graphs": self.cuda_graphs,
            "fold_mask_conv": self.model.fold_mask_conv,
        }
