"""Official MaskFormer (detectron2) model-zoo checkpoint (`model_final_*.pkl`, or a torch.save `.pth`) -> our
checkpoint.

The architecture is not stored in those files, so a preset names it. The key mapping follows the
official module structure (see tests/fixtures/detectron2_keys/). The released .pkl files keep the pixel
decoder's tensors directly under `sem_seg_head.`; state dicts re-saved through detectron2 have them
under `sem_seg_head.pixel_decoder.`, and both are accepted.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from model.classes import load_classes
from model.config import get_preset
from model.convert.common import (
    ConversionError,
    Rules,
    assemble,
    read_torch_file,
    rename,
    split_fused_qkv,
    unreadable_as,
)
from model.maskformer import MaskFormer, ModelInfo, build_model

log = logging.getLogger(__name__)

RES = r"backbone\.res(\d)\.(\d+)\."
RESNET_RULES: Rules = [
    (r"backbone\.stem\.conv1\.weight", r"backbone.body.conv1.weight"),
    (r"backbone\.stem\.conv1\.norm\.(\w+)", r"backbone.body.bn1.\1"),
    (RES + r"conv(\d)\.weight", r"backbone.body.layer{\1-1}.\2.conv\3.weight"),
    (RES + r"conv(\d)\.norm\.(\w+)", r"backbone.body.layer{\1-1}.\2.bn\3.\4"),
    (RES + r"shortcut\.weight", r"backbone.body.layer{\1-1}.\2.downsample.0.weight"),
    (RES + r"shortcut\.norm\.(\w+)", r"backbone.body.layer{\1-1}.\2.downsample.1.\3"),
]

BLK = r"backbone\.layers\.(\d+)\.blocks\.(\d+)\."
SWIN_RULES: Rules = [
    (r"backbone\.patch_embed\.proj\.(\w+)", r"backbone.features.0.0.\1"),
    (r"backbone\.patch_embed\.norm\.(\w+)", r"backbone.features.0.2.\1"),
    (BLK + r"(norm1|norm2)\.(\w+)", r"backbone.features.{\1*2+1}.\2.\3.\4"),
    (BLK + r"attn\.(qkv|proj)\.(\w+)", r"backbone.features.{\1*2+1}.\2.attn.\3.\4"),
    (BLK + r"attn\.relative_position_bias_table", r"backbone.features.{\1*2+1}.\2.attn.relative_position_bias_table"),
    (BLK + r"mlp\.fc1\.(\w+)", r"backbone.features.{\1*2+1}.\2.mlp.0.\3"),
    (BLK + r"mlp\.fc2\.(\w+)", r"backbone.features.{\1*2+1}.\2.mlp.3.\3"),
    (r"backbone\.layers\.(\d+)\.downsample\.(reduction|norm)\.(\w+)", r"backbone.features.{\1*2+2}.\2.\3"),
    (r"backbone\.norm(\d)\.(\w+)", r"backbone.norms.\1.\2"),
]

PD = r"sem_seg_head\.(?:pixel_decoder\.)?"
ENC = PD + r"transformer\.encoder\.layers\.(\d+)\."
DEC = r"sem_seg_head\.predictor\.transformer\.decoder\.layers\.(\d+)\."
HEAD_RULES: Rules = [
    # adapter_n / layer_n are numbered from 1 at res2; ours are indexed from 0.
    (PD + r"adapter_(\d)\.weight", r"pixel_decoder.lateral_convs.{\1-1}.0.weight"),
    (PD + r"adapter_(\d)\.norm\.(\w+)", r"pixel_decoder.lateral_convs.{\1-1}.1.\2"),
    (PD + r"layer_(\d)\.weight", r"pixel_decoder.output_convs.{\1-1}.0.weight"),
    (PD + r"layer_(\d)\.norm\.(\w+)", r"pixel_decoder.output_convs.{\1-1}.1.\2"),
    (PD + r"mask_features\.(\w+)", r"pixel_decoder.mask_features.\1"),
    (PD + r"input_proj\.(\w+)", r"pixel_decoder.input_proj.\1"),
    (ENC + r"self_attn\.in_proj_(\w+)", r"pixel_decoder.encoder.layers.\1.self_attn.in_proj.\2"),
    (ENC + r"self_attn\.out_proj\.(\w+)", r"pixel_decoder.encoder.layers.\1.self_attn.out_proj.\2"),
    (ENC + r"(linear1|linear2)\.(\w+)", r"pixel_decoder.encoder.layers.\1.ffn.\2.\3"),
    (ENC + r"(norm1|norm2)\.(\w+)", r"pixel_decoder.encoder.layers.\1.\2.\3"),
    (r"sem_seg_head\.predictor\.query_embed\.weight", r"query_embed.weight"),
    (r"sem_seg_head\.predictor\.input_proj\.(\w+)", r"input_proj.\1"),
    (DEC + r"self_attn\.in_proj_(\w+)", r"decoder.layers.\1.self_attn.in_proj.\2"),
    (DEC + r"self_attn\.out_proj\.(\w+)", r"decoder.layers.\1.self_attn.out_proj.\2"),
    (DEC + r"multihead_attn\.in_proj_(\w+)", r"decoder.layers.\1.cross_attn.in_proj.\2"),
    (DEC + r"multihead_attn\.out_proj\.(\w+)", r"decoder.layers.\1.cross_attn.out_proj.\2"),
    (DEC + r"(linear1|linear2)\.(\w+)", r"decoder.layers.\1.ffn.\2.\3"),
    (DEC + r"(norm1|norm2|norm3)\.(\w+)", r"decoder.layers.\1.\2.\3"),
    (r"sem_seg_head\.predictor\.transformer\.decoder\.norm\.(\w+)", r"decoder.norm.\1"),
    (r"sem_seg_head\.predictor\.class_embed\.(\w+)", r"class_embed.\1"),
    (r"sem_seg_head\.predictor\.mask_embed\.layers\.(\d)\.(\w+)", r"mask_embed.layers.\1.\2"),
]

IGNORE = [
    r"criterion\.empty_weight",  # training loss buffer
    r"pixel_(mean|std)",  # taken from the preset
    r".*\.relative_position_index",  # derived from the window size
    r".*\.num_batches_tracked",
]


def read_detectron2_pkl(path: str | Path) -> dict[str, torch.Tensor]:
    """A detectron2 checkpoint: a torch.save zip file (a .pth; weights-only loader), else a pickle (the model
    zoo's .pkl). Pickle runs code: only use files from sources you trust."""
    data = read_torch_file(path) if zipfile.is_zipfile(path) else unpickle(path)
    state = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: expected a dict of arrays (optionally under 'model')")
    out = {}
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path}: {key} is a {type(value).__name__}, not an array")
        out[key] = value
    return out


def unpickle(path: str | Path) -> object:
    log.warning("%s: loading a pickle; treat it as trusted input only (it can execute code)", path)
    with unreadable_as(path, "pickle"), open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")  # noqa: S301 - documented trusted input


def map_detectron2_keys(state: dict[str, torch.Tensor], backbone_kind: str) -> dict[str, torch.Tensor]:
    rules = HEAD_RULES + (RESNET_RULES if backbone_kind == "resnet" else SWIN_RULES)
    return split_fused_qkv(rename(state, rules, IGNORE))


def convert_detectron2(path: str | Path, preset: str, name: str | None = None) -> MaskFormer:
    p = get_preset(preset)
    classes = load_classes(p.classes)
    state = map_detectron2_keys(read_detectron2_pkl(path), p.config.backbone.kind)
    info = ModelInfo(name=name or Path(path).stem, class_names=list(classes.names), isthing=list(classes.isthing))
    return assemble(build_model(p.config, info), state, str(path))
