"""The FP16 graph for TensorRT's strongly typed networks, which take every layer's precision from the ONNX
(TensorRT 11 has no BuilderFlag.FP16 to pick it at build time).

So the precision policy is exported with the model: a half-precision copy whose float32 islands are
where FP16 overflows or loses too much.
  - LayerNorm and GroupNorm (their variance overflows FP16 on large activations),
  - the attention softmax (model code upcasts it, a no-op for float32 models),
  - the class head, the mask-embedding head and the final mask product mask_embed . pixel_embeddings
    (mask logits reach tens and feed a sigmoid; pixel embeddings come out of their FP16 conv as FP32).
The uint8 input is cast and normalised in float32 as in the FP32 graph, then cast to FP16; both outputs
are float32. Everything else (convolutions, linear layers, attention matmuls) is FP16.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import Tensor, nn

from model.maskformer import MaskFormer

F16, F32 = torch.float16, torch.float32
FP32_MODULES = (nn.LayerNorm, nn.GroupNorm)
# Submodules of MaskFormer -> (compute dtype, output dtype)
ISLANDS = {
    "backbone": (F16, F16),  # its input is the float32 normalised image
    "input_proj": (F16, F16),  # reads the float32 pixel embeddings when the decoder attends to them
    "pixel_decoder.mask_features": (F16, F32),  # the pixel embeddings, for the float32 mask product
    "class_embed": (F32, F32),
    "mask_embed": (F32, F32),
}


class CastIO(nn.Module):
    """`inner` fed `compute` tensors (its parameters must already be in it), its output(s) cast to `out`."""

    def __init__(self, inner: nn.Module, compute: torch.dtype, out: torch.dtype) -> None:
        super().__init__()
        self.inner = inner
        self.compute = compute
        self.out = out

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        y = self.inner(x.to(self.compute))
        if isinstance(y, (list, tuple)):
            return [t.to(self.out) for t in y]
        return y.to(self.out)


def half_model(model: MaskFormer) -> MaskFormer:
    """A half-precision copy of `model` with the float32 islands above; `model` itself is untouched."""
    half = copy.deepcopy(model).eval().half()
    half.pixel_mean = model.pixel_mean.float().clone()
    half.pixel_std = model.pixel_std.float().clone()
    for path, (compute, out) in ISLANDS.items():
        parent_path, _, name = path.rpartition(".")
        parent = half.get_submodule(parent_path)
        setattr(parent, name, CastIO(getattr(parent, name).to(compute), compute, out))
    # after the islands, so that casting those to FP16 leaves the norms inside them (Swin's) in FP32
    for parent in list(half.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FP32_MODULES):
                setattr(parent, name, CastIO(child.float(), F32, F16))
    return half


def node_precision(graph) -> dict[str, dict[str, int]]:
    """Node counts per op type, grouped by the element type of each node's first output, after full
    strict shape and type inference (which raises on any inconsistent type)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(graph, check_type=True, strict_mode=True, data_prop=True)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.value_info, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    counts: dict[str, Counter[str]] = {}
    for node in g.node:
        elem = types.get(node.output[0], onnx.TensorProto.UNDEFINED)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem).name if elem else "unknown"
        counts.setdefault(dtype, Counter())[node.op_type] += 1
    return {dtype: dict(sorted(c.items())) for dtype, c in sorted(counts.items())}
