"""Backbones built from torchvision's classes, each returning stride 4/8/16/32 feature maps.

ResNet uses FrozenBatchNorm2d, as detectron2 and DETR do. Swin gets one LayerNorm per stage output,
as MaskFormer's D2SwinTransformer adds them.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet
from torchvision.models import swin_transformer as tv_swin
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

from model.config import BackboneConfig


class ResNetBackbone(nn.Module):
    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        block = tv_resnet.BasicBlock if cfg.block == "basic" else tv_resnet.Bottleneck
        norm = FrozenBatchNorm2d if cfg.norm == "frozen_bn" else nn.BatchNorm2d
        net = tv_resnet.ResNet(block, list(cfg.layers), norm_layer=norm)
        # Keys stay torchvision's (body.conv1, body.layer1...), so ImageNet weights load as they are.
        self.body = IntermediateLayerGetter(
            net, return_layers={"layer1": "res2", "layer2": "res3", "layer3": "res4", "layer4": "res5"}
        )
        self.out_channels = cfg.out_channels

    def forward(self, x: Tensor) -> list[Tensor]:
        return list(self.body(x).values())


def shifted_window_attention(
    x: Tensor,
    qkv: nn.Linear,
    proj: nn.Linear,
    relative_position_bias: Tensor,
    window_size: int,
    num_heads: int,
    shift_size: int,
    attention_dropout: float,
    dropout: float,
    training: bool,
) -> Tensor:
    """(Shifted) window attention on [B, H, W, C] as in the official Swin used by MaskFormer.

    Unlike torchvision, the shift is kept even when the padded map is no larger than one window, so
    outputs match the official and transformers' implementations at every resolution.
    """
    B, H, W, C = x.shape
    ws = window_size
    pad_r = (ws - W % ws) % ws
    pad_b = (ws - H % ws) % ws
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    Hp, Wp = H + pad_b, W + pad_r
    if shift_size > 0:
        x = torch.roll(x, shifts=(-shift_size, -shift_size), dims=(1, 2))

    nw = (Hp // ws) * (Wp // ws)
    x = x.view(B, Hp // ws, ws, Wp // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B * nw, ws * ws, C)
    head_dim = C // num_heads
    q, k, v = qkv(x).reshape(B * nw, ws * ws, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    attn = (q * head_dim**-0.5).matmul(k.transpose(-2, -1)) + relative_position_bias

    if shift_size > 0:
        # Tokens from different regions of the rolled map must not attend to each other.
        region = torch.zeros((Hp, Wp), dtype=x.dtype, device=x.device)
        bounds = ((0, Hp - ws), (Hp - ws, Hp - shift_size), (Hp - shift_size, Hp))
        wbounds = ((0, Wp - ws), (Wp - ws, Wp - shift_size), (Wp - shift_size, Wp))
        count = 0
        for h0, h1 in bounds:
            for w0, w1 in wbounds:
                region[h0:h1, w0:w1] = count
                count += 1
        region = region.view(Hp // ws, ws, Wp // ws, ws).permute(0, 2, 1, 3).reshape(nw, ws * ws)
        mask = region.unsqueeze(1) - region.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, -100.0)
        attn = attn.view(B, nw, num_heads, ws * ws, ws * ws) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(B * nw, num_heads, ws * ws, ws * ws)

    # Softmax in float32 (see model/transformer.py); a no-op for float32 models
    attn = F.dropout(attn.float().softmax(dim=-1).to(v.dtype), p=attention_dropout, training=training)
    x = attn.matmul(v).transpose(1, 2).reshape(B * nw, ws * ws, C)
    x = F.dropout(proj(x), p=dropout, training=training)

    x = x.view(B, Hp // ws, Wp // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
    if shift_size > 0:
        x = torch.roll(x, shifts=(shift_size, shift_size), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


class ShiftedWindowAttention(tv_swin.ShiftedWindowAttention):
    """torchvision's module (same parameters and keys) with the official shifting rule."""

    def forward(self, x: Tensor) -> Tensor:
        return shifted_window_attention(
            x,
            self.qkv,
            self.proj,
            self.get_relative_position_bias(),
            self.window_size[0],
            self.num_heads,
            self.shift_size[0],
            self.attention_dropout,
            self.dropout,
            self.training,
        )


class SwinBackbone(nn.Module):
    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        net = tv_swin.SwinTransformer(
            patch_size=[cfg.patch_size, cfg.patch_size],
            embed_dim=cfg.embed_dim,
            depths=list(cfg.depths),
            num_heads=list(cfg.num_heads),
            window_size=[cfg.window_size, cfg.window_size],
            mlp_ratio=cfg.mlp_ratio,
            stochastic_depth_prob=cfg.drop_path_rate,
            block=partial(tv_swin.SwinTransformerBlock, attn_layer=ShiftedWindowAttention),
        )
        # features = [patch embed, stage 1, merge, stage 2, merge, stage 3, merge, stage 4]
        self.features = net.features
        self.stage_ends = [2 * i + 1 for i in range(len(cfg.depths))]
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in cfg.out_channels)
        self.out_channels = cfg.out_channels

    def forward(self, x: Tensor) -> list[Tensor]:
        outs: list[Tensor] = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.stage_ends:
                norm = self.norms[len(outs)]
                outs.append(norm(x).permute(0, 3, 1, 2).contiguous())
        return outs


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    return ResNetBackbone(cfg) if cfg.kind == "resnet" else SwinBackbone(cfg)
