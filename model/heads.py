"""Prediction heads on the decoder's per-query embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    """Linear layers with ReLU between them (none after the last): the mask-embedding head."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def folded_mask_logits(mask_embed: Tensor, y: Tensor, conv: nn.Conv2d) -> Tensor:
    """mask_embed · conv(y) for [B, Q, D] embeddings and the [B, C, H, W] map under `conv` (D out channels).

    The same numbers as the product after the conv, up to float rounding, but each image's embeddings are
    folded into the conv's weights first: the stride-4 conv then has Q output channels instead of D (for
    the ADE20K R50 preset, 100 instead of 256: 7.5 instead of 19.3 GFLOP per 512x512 image), and the
    [B, D, H, W] map and the product over it are never formed.

    Eager runs it as one grouped conv (group b holds image b's weights). torch.export needs the batch to
    stay symbolic, which a group count cannot be, so the exported graph computes each tap's product as
    one batched matmul and sums the shifted taps with fold (ONNX Col2Im; ONNX Runtime runs it, TensorRT
    does not parse it).
    """
    b, q, _ = mask_embed.shape
    c, (h, w), k = y.shape[1], y.shape[-2:], conv.kernel_size[0]
    weight = (mask_embed @ conv.weight.flatten(1)).view(b, q, c, k, k)
    bias = mask_embed @ conv.bias if conv.bias is not None else mask_embed.new_zeros(b, q)  # [B, Q]
    if not torch.compiler.is_exporting():
        grouped = weight.reshape(b * q, c, k, k)
        if y.is_contiguous(memory_format=torch.channels_last):
            grouped = grouped.contiguous(memory_format=torch.channels_last)  # else the conv copies y to NCHW
        out = F.conv2d(y.reshape(1, b * c, h, w), grouped, bias.reshape(-1), padding=k // 2, groups=b)
        return out.view(b, q, h, w)
    # fold sums block (i, j) of tap (u, v) into pixel (i + u - k//2, ...): a conv reads (i - u + k//2, ...),
    # hence the flipped taps
    taps = weight.flip(-2, -1).permute(0, 1, 3, 4, 2).reshape(b, q * k * k, c)
    cols = torch.matmul(taps, y.flatten(2))  # [B, Q*k*k, HW]
    return F.fold(cols, (h, w), k, padding=k // 2) + bias[..., None, None]
