"""Pixel decoders: the paper's FPN, and the variant with a transformer encoder on the stride-32 map.

Both return (mask_features, transformer_input): the stride-4 per-pixel embeddings and the map the
transformer decoder attends to.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from model.position_encoding import PositionEmbeddingSine
from model.transformer import TransformerEncoder


def conv_norm(in_ch: int, out_ch: int, kernel: int, relu: bool) -> nn.Sequential:
    """Conv (no bias) + GroupNorm(32) [+ ReLU], the FPN building block of the official configs."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False),
        nn.GroupNorm(32, out_ch),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class FPNPixelDecoder(nn.Module):
    """Top-down FPN over res2..res5; the transformer decoder reads the raw res5 map."""

    def __init__(self, in_channels: tuple[int, ...], conv_dim: int, mask_dim: int, top_channels: int = 0) -> None:
        super().__init__()
        # Indexed bottom-up: [0] is res2 (stride 4) ... [3] is res5 (stride 32, no lateral).
        self.lateral_convs = nn.ModuleList(conv_norm(c, conv_dim, 1, relu=False) for c in in_channels[:-1])
        self.output_convs = nn.ModuleList(
            [conv_norm(conv_dim, conv_dim, 3, relu=True) for _ in in_channels[:-1]]
            + [conv_norm(top_channels or in_channels[-1], conv_dim, 3, relu=True)]
        )
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 3, padding=1)
        self.transformer_in_channels = in_channels[-1]

    def top(self, res5: Tensor) -> tuple[Tensor, Tensor]:
        """(FPN top map, transformer decoder input) from res5."""
        return self.output_convs[-1](res5), res5

    def fpn(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(the FPN's stride-4 map before the mask_features conv, transformer decoder input)."""
        y, transformer_input = self.top(features[-1])
        for level in range(len(features) - 2, -1, -1):
            lateral = self.lateral_convs[level](features[level])
            y = lateral + F.interpolate(y, size=lateral.shape[-2:], mode="nearest")
            y = self.output_convs[level](y)
        return y, transformer_input

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        y, transformer_input = self.fpn(features)
        return self.mask_features(y), transformer_input


class TransformerEncoderPixelDecoder(FPNPixelDecoder):
    """FPN whose top is a transformer encoder on res5 (the COCO R50/R101 panoptic configs).

    The encoder output both feeds the FPN top (through a 3x3 conv) and is the transformer decoder input.
    """

    def __init__(
        self,
        in_channels: tuple[int, ...],
        conv_dim: int,
        mask_dim: int,
        enc_layers: int,
        nheads: int,
        dim_feedforward: int,
        dropout: float,
    ) -> None:
        super().__init__(in_channels, conv_dim, mask_dim, top_channels=conv_dim)
        self.input_proj = nn.Conv2d(in_channels[-1], conv_dim, 1)
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2)
        self.encoder = TransformerEncoder(enc_layers, conv_dim, nheads, dim_feedforward, dropout)
        self.transformer_in_channels = conv_dim

    def top(self, res5: Tensor) -> tuple[Tensor, Tensor]:
        src = self.input_proj(res5)
        b, c, h, w = src.shape
        pos = self.pe_layer(src).flatten(2).transpose(1, 2)  # [1, HW, C]
        memory = self.encoder(src.flatten(2).transpose(1, 2), pos)
        memory = memory.transpose(1, 2).reshape(b, c, h, w)
        return self.output_convs[-1](memory), memory
