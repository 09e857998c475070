"""Sine positional encoding (DETR), normalised to [0, 2pi] over the feature map."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = 2 * math.pi

    def forward(self, x: Tensor) -> Tensor:
        """Returns [1, 2 * num_pos_feats, H, W] for a [B, C, H, W] map.

        It depends only on H and W (never on the batch or on padding), so for a static input size it
        exports as a constant and broadcasts over any batch.
        """
        h, w = x.shape[-2:]
        eps = 1e-6
        # cumsum of ones over rows/cols, written as arange; divided by the last value (normalize=True)
        y = torch.arange(1, h + 1, dtype=torch.float32, device=x.device)
        xs = torch.arange(1, w + 1, dtype=torch.float32, device=x.device)
        y = y / (h + eps) * self.scale
        xs = xs / (w + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = xs[:, None] / dim_t  # [W, F]
        pos_y = y[:, None] / dim_t  # [H, F]
        pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)
        pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)
        pos = torch.cat((pos_y[:, None, :].expand(h, w, -1), pos_x[None, :, :].expand(h, w, -1)), dim=2)  # [H, W, 2F]
        return pos.permute(2, 0, 1).unsqueeze(0).to(x.dtype)
