"""MaskFormer: backbone + pixel decoder -> per-pixel embeddings; transformer decoder -> N (class, mask) pairs.

Forward contract (export, service and tests rely on it):
  input   float32 RGB in 0..255, [B, 3, H, W]; normalised inside with the stored mean/std
  output  {"pred_logits": [B, Q, K+1], "pred_masks": [B, Q, H/4, W/4]} (mask logits);
          "aux_outputs" (one dict per earlier decoder layer) only in training.
`fold_mask_conv` (off by default; see `mask_conv_folds_cheaper`) computes the same masks in inference
with the mask embeddings folded into the pixel decoder's last conv (model/heads.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from model.backbone import build_backbone
from model.config import MaskFormerConfig
from model.heads import MLP, folded_mask_logits
from model.pixel_decoder import FPNPixelDecoder, TransformerEncoderPixelDecoder
from model.position_encoding import PositionEmbeddingSine
from model.transformer import TransformerDecoder


@dataclass
class ModelInfo:
    """What a served model needs besides its weights."""

    name: str
    class_names: list[str]
    isthing: list[bool]
    version: str = "0"
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.class_names) != len(self.isthing):
            raise ValueError("class_names and isthing must have the same length")


class MaskFormer(nn.Module):
    pixel_mean: Tensor
    pixel_std: Tensor
    fold_mask_conv: bool = False

    def __init__(self, cfg: MaskFormerConfig, info: ModelInfo | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.info = info
        if info is not None and len(info.class_names) != cfg.num_classes:
            raise ValueError(f"{len(info.class_names)} class names for a model with {cfg.num_classes} classes")
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(1, 3, 1, 1))

        self.backbone = build_backbone(cfg.backbone)
        channels = cfg.backbone.out_channels
        if cfg.pixel_decoder == "fpn":
            self.pixel_decoder = FPNPixelDecoder(channels, cfg.conv_dim, cfg.mask_dim)
        else:
            self.pixel_decoder = TransformerEncoderPixelDecoder(
                channels, cfg.conv_dim, cfg.mask_dim, cfg.enc_layers, cfg.nheads, cfg.dim_feedforward, cfg.dropout
            )
        self.attend_pixel_embedding = cfg.transformer_in_feature == "pixel_embedding"
        in_ch = cfg.mask_dim if self.attend_pixel_embedding else self.pixel_decoder.transformer_in_channels
        self.input_proj = nn.Conv2d(in_ch, cfg.hidden_dim, 1) if in_ch != cfg.hidden_dim else nn.Identity()
        self.pe_layer = PositionEmbeddingSine(cfg.hidden_dim // 2)
        self.query_embed = nn.Embedding(cfg.num_queries, cfg.hidden_dim)
        self.decoder = TransformerDecoder(cfg.dec_layers, cfg.hidden_dim, cfg.nheads, cfg.dim_feedforward, cfg.dropout)
        self.class_embed = nn.Linear(cfg.hidden_dim, cfg.num_classes + 1)
        self.mask_embed = MLP(cfg.hidden_dim, cfg.hidden_dim, cfg.mask_dim, 3)

    def forward(self, images: Tensor) -> dict[str, Tensor | list[dict[str, Tensor]]]:
        x = (images - self.pixel_mean) / self.pixel_std
        features = self.backbone(x)
        fold = self.fold_mask_conv and not self.training
        if fold and self.attend_pixel_embedding:
            raise ValueError("fold_mask_conv: this model's decoder attends the pixel embedding, which folding skips")
        if fold:
            y, transformer_input = self.pixel_decoder.fpn(features)
        else:
            mask_features, transformer_input = self.pixel_decoder(features)
            if self.attend_pixel_embedding:
                transformer_input = mask_features

        src = self.input_proj(transformer_input)
        b, c, h, w = src.shape
        pos = self.pe_layer(src).flatten(2).transpose(1, 2)  # [1, HW, C]
        memory = src.flatten(2).transpose(1, 2)  # [B, HW, C]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(b, -1, -1)
        hs = self.decoder(torch.zeros_like(query_pos), memory, pos, query_pos)  # [L, B, Q, C]

        if not self.training:
            hs = hs[-1:]  # inference reads the last layer only: skip the other layers' heads and mask products
        logits = self.class_embed(hs)
        mask_embed = self.mask_embed(hs)
        if fold:
            masks = folded_mask_logits(mask_embed[-1], y, self.pixel_decoder.mask_features)[None]
        else:
            # [L, B, Q, C] @ [B, C, HW] as one batched matmul (cheaper for TensorRT than an einsum)
            mh, mw = mask_features.shape[-2:]
            masks = torch.matmul(mask_embed, mask_features.flatten(2)).view(*mask_embed.shape[:3], mh, mw)

        out: dict[str, Tensor | list[dict[str, Tensor]]] = {"pred_logits": logits[-1], "pred_masks": masks[-1]}
        if self.training:
            out["aux_outputs"] = [{"pred_logits": a, "pred_masks": m} for a, m in zip(logits[:-1], masks[:-1])]
        return out


def mask_conv_folds_cheaper(cfg: MaskFormerConfig) -> bool:
    """Whether `fold_mask_conv` applies and saves work: the decoder must not attend the pixel embedding
    (it needs the embedding before the mask embeddings exist), and the folded 3x3 conv's Q*9*C
    multiply-adds per pixel must be fewer than the conv's D*9*C plus the product's Q*D."""
    if cfg.transformer_in_feature == "pixel_embedding":
        return False
    q, d, c = cfg.num_queries, cfg.mask_dim, cfg.conv_dim
    return q * 9 * c < d * 9 * c + q * d


def build_model(cfg: MaskFormerConfig, info: ModelInfo | None = None) -> MaskFormer:
    return MaskFormer(cfg, info)
