"""Local ImageNet weights for the backbone (torchvision or timm state dicts). Nothing is downloaded."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from model.convert.common import read_safetensors, read_torch_file, tensors_only
from model.maskformer import MaskFormer

log = logging.getLogger(__name__)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    state = read_torch_file(path)
    for key in ("state_dict", "model"):  # common wrappers
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return tensors_only(state, path)


def _swin_key(key: str, merge_first: bool) -> str | None:
    """timm/official Swin names -> torchvision's `features` layout (patch merging at the end of a stage).

    merge_first: newer timm puts each patch merging at the start of the next stage (layers.1..3).
    """
    rules = [
        (r"patch_embed\.proj\.(\w+)", r"features.0.0.\1"),
        (r"patch_embed\.norm\.(\w+)", r"features.0.2.\1"),
        (r"layers\.(\d+)\.blocks\.(\d+)\.(norm1|norm2)\.(\w+)", "features.{b}.\\2.\\3.\\4"),
        (r"layers\.(\d+)\.blocks\.(\d+)\.attn\.(qkv|proj)\.(\w+)", "features.{b}.\\2.attn.\\3.\\4"),
        (
            r"layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table",
            "features.{b}.\\2.attn.relative_position_bias_table",
        ),
        (r"layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.(\w+)", "features.{b}.\\2.mlp.0.\\3"),
        (r"layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.(\w+)", "features.{b}.\\2.mlp.3.\\3"),
        (r"layers\.(\d+)\.downsample\.(reduction|norm)\.(\w+)", "features.{d}.\\2.\\3"),
    ]
    for pattern, repl in rules:
        m = re.fullmatch(pattern, key)
        if m:
            if not key.startswith("layers."):
                return m.expand(repl)
            stage = int(m[1])
            merge = 2 * stage if merge_first else 2 * stage + 2
            return m.expand(repl.replace("{b}", str(2 * stage + 1)).replace("{d}", str(merge)))
    return None


def load_backbone_weights(model: MaskFormer, path: str | Path) -> None:
    """Load ImageNet weights into model.backbone; classification heads and final norms are skipped.

    ResNet: torchvision and timm share names (conv1, bn1, layer1..4). Swin: torchvision (`features.*`) or
    the original/timm layout (`layers.N.blocks.M.*`, patch merging at the end of each stage).
    """
    state = read_state_dict(path)
    kind = model.cfg.backbone.kind
    mapped: dict[str, torch.Tensor] = {}
    merge_first = not any(k.startswith("layers.0.downsample") for k in state)
    for key, value in state.items():
        if key.startswith(("fc.", "head", "norm.")) or key.endswith(
            ("num_batches_tracked", "relative_position_index", "attn_mask")
        ):
            continue
        if kind == "resnet":
            mapped["body." + key] = value
        elif key.startswith("features."):
            mapped[key] = value
        else:
            new = _swin_key(key, merge_first)
            if new is None:
                raise ValueError(f"{path}: no Swin mapping for {key}")
            mapped[new] = value
    backbone = model.backbone
    expected = backbone.state_dict()
    unexpected = sorted(set(mapped) - set(expected))
    wrong = sorted(k for k in set(mapped) & set(expected) if mapped[k].shape != expected[k].shape)
    if unexpected or wrong:
        raise ValueError(
            f"{path} does not fit the {kind} backbone: unexpected {unexpected[:5]}, wrong shape {wrong[:5]}"
        )
    missing = sorted(k for k in set(expected) - set(mapped) if not k.endswith("relative_position_index"))
    # Only MaskFormer's own additions (the per-stage Swin norms) may be missing.
    if any(not k.startswith("norms.") for k in missing):
        raise ValueError(f"{path} lacks backbone weights: {missing[:5]}")
    backbone.load_state_dict(mapped, strict=False)
    log.info("loaded %d backbone tensors from %s", len(mapped), path)
