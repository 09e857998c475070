"""DETR-style post-norm transformer layers: the decoder of MaskFormer and the encoder of its pixel decoder.

Attention is written as plain matmuls with static sequence lengths so it exports to ONNX with a dynamic
batch axis and builds cleanly in TensorRT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MultiheadAttention(nn.Module):
    """Multi-head attention on batch-first [B, L, C] tensors, with separate q/k/v projections."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        b, lq, c = query.shape
        lk = key.shape[1]
        q = self.q_proj(query).view(b, lq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(key).view(b, lk, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).view(b, lk, self.num_heads, self.head_dim).transpose(1, 2)
        # Softmax in float32, where FP16 overflows; a no-op for float32 models. `.float()` rather than
        # softmax(dtype=) because the ONNX exporter drops the latter's upcast.
        attn = torch.matmul(q * self.head_dim**-0.5, k.transpose(-2, -1)).float().softmax(dim=-1).to(v.dtype)
        attn = F.dropout(attn, p=self.dropout, training=self.training)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, lq, c)
        return self.out_proj(out)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class TransformerEncoderLayer(nn.Module):
    def __init__(self, dim: int, nheads: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(dim, nheads, dropout)
        self.ffn = FeedForward(dim, dim_feedforward, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor) -> Tensor:
        q = k = src + pos
        src = self.norm1(src + self.dropout1(self.self_attn(q, k, src)))
        return self.norm2(src + self.dropout2(self.ffn(src)))


class TransformerEncoder(nn.Module):
    """Post-norm encoder without a final norm, as in DETR when normalize_before is False."""

    def __init__(self, num_layers: int, dim: int, nheads: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(dim, nheads, dim_feedforward, dropout) for _ in range(num_layers)
        )

    def forward(self, src: Tensor, pos: Tensor) -> Tensor:
        for layer in self.layers:
            src = layer(src, pos)
        return src


class TransformerDecoderLayer(nn.Module):
    def __init__(self, dim: int, nheads: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(dim, nheads, dropout)
        self.cross_attn = MultiheadAttention(dim, nheads, dropout)
        self.ffn = FeedForward(dim, dim_feedforward, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor) -> Tensor:
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, tgt)))
        tgt = self.norm2(tgt + self.dropout2(self.cross_attn(tgt + query_pos, memory + pos, memory)))
        return self.norm3(tgt + self.dropout3(self.ffn(tgt)))


class TransformerDecoder(nn.Module):
    """Stack of decoder layers with a shared final LayerNorm.

    Returns [L, B, Q, C]: every layer's normalised output in training (deep supervision), only the
    last one in eval. The norm is applied to a copy, so it never feeds the next layer.
    """

    def __init__(self, num_layers: int, dim: int, nheads: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerDecoderLayer(dim, nheads, dim_feedforward, dropout) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor) -> Tensor:
        intermediate = []
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos)
            if self.training:
                intermediate.append(self.norm(tgt))
        if self.training:
            return torch.stack(intermediate)
        return self.norm(tgt).unsqueeze(0)
