"""transformers `MaskFormerForInstanceSegmentation` directory -> our checkpoint.

Reads config.json and model.safetensors (or pytorch_model.bin through torch's weights-only loader).
transformers itself is not needed: its config is plain JSON.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from model.classes import available, load_classes
from model.config import IMAGENET_MEAN, IMAGENET_STD, BackboneConfig, MaskFormerConfig
from model.convert.common import (
    ConversionError,
    Rules,
    assemble,
    merge_qkv,
    read_json,
    read_safetensors,
    read_torch_file,
    rename,
    tensors_only,
)
from model.maskformer import MaskFormer, ModelInfo, build_model

log = logging.getLogger(__name__)

SOURCE_FILES = ("config.json", "preprocessor_config.json", "model.safetensors", "pytorch_model.bin")  # all it reads

ENC = r"model\.pixel_level_module\.encoder\."
FPN = r"model\.pixel_level_module\.decoder\."
TM = r"model\.transformer_module\."

RESNET_RULES: Rules = [
    (ENC + r"embedder\.embedder\.convolution\.weight", r"backbone.body.conv1.weight"),
    (ENC + r"embedder\.embedder\.normalization\.(\w+)", r"backbone.body.bn1.\1"),
    (
        ENC + r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.weight",
        r"backbone.body.layer{\1+1}.\2.downsample.0.weight",
    ),
    (
        ENC + r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.(\w+)",
        r"backbone.body.layer{\1+1}.\2.downsample.1.\3",
    ),
    (
        ENC + r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.weight",
        r"backbone.body.layer{\1+1}.\2.conv{\3+1}.weight",
    ),
    (
        ENC + r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\.(\w+)",
        r"backbone.body.layer{\1+1}.\2.bn{\3+1}.\4",
    ),
]

SWIN = ENC + r"model\.encoder\.layers\.(\d+)\."
SWIN_RULES: Rules = [
    (ENC + r"model\.embeddings\.patch_embeddings\.projection\.(\w+)", r"backbone.features.0.0.\1"),
    (ENC + r"model\.embeddings\.norm\.(\w+)", r"backbone.features.0.2.\1"),
    (SWIN + r"blocks\.(\d+)\.layernorm_before\.(\w+)", r"backbone.features.{\1*2+1}.\2.norm1.\3"),
    (SWIN + r"blocks\.(\d+)\.layernorm_after\.(\w+)", r"backbone.features.{\1*2+1}.\2.norm2.\3"),
    (
        SWIN + r"blocks\.(\d+)\.attention\.self\.relative_position_bias_table",
        r"backbone.features.{\1*2+1}.\2.attn.relative_position_bias_table",
    ),
    (SWIN + r"blocks\.(\d+)\.attention\.self\.query\.(\w+)", r"backbone.features.{\1*2+1}.\2.attn.qkv.\3.q"),
    (SWIN + r"blocks\.(\d+)\.attention\.self\.key\.(\w+)", r"backbone.features.{\1*2+1}.\2.attn.qkv.\3.k"),
    (SWIN + r"blocks\.(\d+)\.attention\.self\.value\.(\w+)", r"backbone.features.{\1*2+1}.\2.attn.qkv.\3.v"),
    (SWIN + r"blocks\.(\d+)\.attention\.output\.dense\.(\w+)", r"backbone.features.{\1*2+1}.\2.attn.proj.\3"),
    (SWIN + r"blocks\.(\d+)\.intermediate\.dense\.(\w+)", r"backbone.features.{\1*2+1}.\2.mlp.0.\3"),
    (SWIN + r"blocks\.(\d+)\.output\.dense\.(\w+)", r"backbone.features.{\1*2+1}.\2.mlp.3.\3"),
    (SWIN + r"downsample\.(reduction|norm)\.(\w+)", r"backbone.features.{\1*2+2}.\2.\3"),
    (ENC + r"hidden_states_norms\.(\d+)\.(\w+)", r"backbone.norms.\1.\2"),
]

# The FPN's layers run top-down (layers.0 is stride 16); ours are indexed bottom-up (0 is stride 4).
HEAD_RULES: Rules = [
    (FPN + r"fpn\.stem\.(\d)\.(\w+)", r"pixel_decoder.output_convs.3.\1.\2"),
    (FPN + r"fpn\.layers\.(\d)\.proj\.(\d)\.(\w+)", r"pixel_decoder.lateral_convs.{2-\1}.\2.\3"),
    (FPN + r"fpn\.layers\.(\d)\.block\.(\d)\.(\w+)", r"pixel_decoder.output_convs.{2-\1}.\2.\3"),
    (FPN + r"mask_projection\.(\w+)", r"pixel_decoder.mask_features.\1"),
    (TM + r"queries_embedder\.weight", r"query_embed.weight"),
    (TM + r"input_projection\.(\w+)", r"input_proj.\1"),
    (TM + r"decoder\.layers\.(\d+)\.self_attn\.([qkv]_proj)\.(\w+)", r"decoder.layers.\1.self_attn.\2.\3"),
    (TM + r"decoder\.layers\.(\d+)\.self_attn\.(?:o_proj|out_proj)\.(\w+)", r"decoder.layers.\1.self_attn.out_proj.\2"),
    (TM + r"decoder\.layers\.(\d+)\.encoder_attn\.([qkv]_proj)\.(\w+)", r"decoder.layers.\1.cross_attn.\2.\3"),
    (
        TM + r"decoder\.layers\.(\d+)\.encoder_attn\.(?:o_proj|out_proj)\.(\w+)",
        r"decoder.layers.\1.cross_attn.out_proj.\2",
    ),
    (TM + r"decoder\.layers\.(\d+)\.self_attn_layer_norm\.(\w+)", r"decoder.layers.\1.norm1.\2"),
    (TM + r"decoder\.layers\.(\d+)\.encoder_attn_layer_norm\.(\w+)", r"decoder.layers.\1.norm2.\2"),
    (TM + r"decoder\.layers\.(\d+)\.final_layer_norm\.(\w+)", r"decoder.layers.\1.norm3.\2"),
    (TM + r"decoder\.layers\.(\d+)\.(?:mlp\.)?fc1\.(\w+)", r"decoder.layers.\1.ffn.linear1.\2"),
    (TM + r"decoder\.layers\.(\d+)\.(?:mlp\.)?fc2\.(\w+)", r"decoder.layers.\1.ffn.linear2.\2"),
    (TM + r"decoder\.layernorm\.(\w+)", r"decoder.norm.\1"),
    (r"class_predictor\.(\w+)", r"class_embed.\1"),
    (r"mask_embedder\.(\d)\.0\.(\w+)", r"mask_embed.layers.\1.\2"),
]

IGNORE = [
    r".*\.num_batches_tracked",  # BatchNorm bookkeeping; ours is frozen
    r".*\.relative_position_index",  # derived from the window size
    ENC + r"model\.layernorm\.\w+",  # Swin's classification norm, unused by MaskFormer
    r"criterion\.empty_weight",  # training loss buffer
]


def refuse_unlike(bc: dict, kind: str, **ours: object) -> None:
    """Settings our backbone has fixed (a missing one is transformers' default, the same): converting any
    other value would give a model that loads and computes something else."""
    for key, value in ours.items():
        if bc.get(key, value) != value:
            raise ConversionError(f"{kind} backbone with {key}={bc[key]!r} is not supported (only {value!r})")


def backbone_from_hf(bc: dict) -> BackboneConfig:
    kind = bc.get("model_type")
    if kind == "resnet":
        block = str(bc.get("layer_type", "bottleneck"))
        expansion = 1 if block == "basic" else 4
        expected = [64 * 2**i * expansion for i in range(4)]
        if bc.get("embedding_size", 64) != 64 or list(bc.get("hidden_sizes", [])) != expected:
            raise ConversionError(
                f"ResNet widths {bc.get('embedding_size')}/{bc.get('hidden_sizes')} are not torchvision's "
                f"(64/{expected}); only standard-width ResNets are supported"
            )
        if bc.get("downsample_in_bottleneck") or bc.get("downsample_in_first_stage"):
            raise ConversionError("ResNet with stride in the 1x1 conv or a strided first stage is not supported")
        refuse_unlike(bc, "ResNet", hidden_act="relu")
        return BackboneConfig(kind="resnet", block=block, layers=tuple(bc["depths"]))
    if kind in ("swin", "maskformer-swin"):
        if bc.get("use_absolute_embeddings"):
            raise ConversionError("Swin with absolute position embeddings is not supported")
        refuse_unlike(bc, "Swin", hidden_act="gelu", layer_norm_eps=1e-5)
        return BackboneConfig(
            kind="swin",
            embed_dim=bc["embed_dim"],
            depths=tuple(bc["depths"]),
            num_heads=tuple(bc["num_heads"]),
            window_size=bc["window_size"],
            drop_path_rate=bc.get("drop_path_rate", 0.3),
            patch_size=bc.get("patch_size", 4),
            mlp_ratio=bc.get("mlp_ratio", 4.0),
        )
    raise ConversionError(f"unsupported backbone model_type {kind!r} (ResNet and Swin are supported)")


def read_hf_config(src: Path) -> dict:
    cfg_file = src / "config.json"
    if not cfg_file.is_file():
        raise ConversionError(f"{src}: no config.json (expected a transformers save_pretrained directory)")
    hf = read_json(cfg_file)
    if hf.get("model_type") != "maskformer":
        raise ConversionError(f"{cfg_file}: model_type is {hf.get('model_type')!r}, not 'maskformer'")
    return hf


def class_names(hf: dict, class_rows: int, cfg_file: Path) -> list[str]:
    """id2label's names, which must fill 0..N-1. transformers leaves the default labels (2, LABEL_0 and
    LABEL_1) out of config.json, so without id2label num_labels, else class_predictor's rows less the
    "no object" row, give N, and the names are LABEL_i."""
    raw = hf.get("id2label") or {}
    if not isinstance(raw, dict):
        raise ConversionError(f"{cfg_file}: id2label is a {type(raw).__name__}, not an object of id -> name")
    try:
        id2label = {int(k): str(v) for k, v in raw.items()}
    except ValueError as err:
        raise ConversionError(f"{cfg_file}: id2label's keys must be class ids ({err})") from err
    if sorted(id2label) != list(range(len(id2label))):
        raise ConversionError(f"{cfg_file}: id2label's ids {sorted(id2label)} are not 0..{len(id2label) - 1}")
    count = len(id2label) or hf.get("num_labels") or class_rows - 1
    if count != class_rows - 1:
        raise ConversionError(
            f"{cfg_file} gives {count} classes, but class_predictor.weight has {class_rows} rows "
            "(one per class and one for 'no object')"
        )
    return [id2label.get(i, f"LABEL_{i}") for i in range(count)]


def input_size(size: object, pre_file: Path) -> tuple[int, int] | None:
    """The processor's resize target, each side down to a multiple of 32: a legacy int `size` or
    {"shortest_edge": S, ...} is a square of S, {"height": H, "width": W} is H x W."""
    if size is None:
        return None
    if not isinstance(size, dict):
        sides = [size, size]
    elif "shortest_edge" in size:
        sides = [size["shortest_edge"]] * 2
    else:
        sides = [size.get("height"), size.get("width")]
    pixels = [s for s in sides if isinstance(s, int) and not isinstance(s, bool) and s >= 32]
    if len(pixels) != 2:
        raise ConversionError(
            f"{pre_file}: size {size!r} is not an int, {{'shortest_edge': S}} or {{'height': H, 'width': W}} "
            "of at least 32 pixels"
        )
    return pixels[0] // 32 * 32, pixels[1] // 32 * 32


def config_from_hf(src: Path, hf: dict, class_rows: int) -> tuple[MaskFormerConfig, list[str]]:
    dec = hf.get("decoder_config") or {}
    names = class_names(hf, class_rows, src / "config.json")
    mean, std, size = IMAGENET_MEAN, IMAGENET_STD, (512, 512)
    pre = src / "preprocessor_config.json"
    if pre.is_file():
        p = read_json(pre)
        mean = tuple(255.0 * v for v in p.get("image_mean", [m / 255 for m in IMAGENET_MEAN]))
        std = tuple(255.0 * v for v in p.get("image_std", [s / 255 for s in IMAGENET_STD]))
        size = input_size(p.get("size"), pre) or size
    cfg = MaskFormerConfig(
        num_classes=len(names),
        backbone=backbone_from_hf(hf["backbone_config"]),
        pixel_decoder="fpn",  # transformers implements only the FPN pixel decoder
        conv_dim=hf.get("fpn_feature_size", 256),
        mask_dim=hf.get("mask_feature_size", 256),
        hidden_dim=dec.get("d_model", 256),
        num_queries=dec.get("num_queries", 100),
        nheads=dec.get("decoder_attention_heads", 8),
        dim_feedforward=dec.get("decoder_ffn_dim", 2048),
        dropout=dec.get("dropout", 0.1),
        dec_layers=dec.get("decoder_layers", 6),
        pixel_mean=mean,
        pixel_std=std,
        input_size=size,
    )
    if dec.get("activation_function", "relu") != "relu":
        raise ConversionError("only ReLU decoder FFNs are supported")
    return cfg, names


def thing_flags(names: list[str], classes: str | None = None) -> list[bool]:
    """Thing flags of the shipped class list `classes`, else of the one with the same names (compared stripped
    and lower-cased: label files differ in such details, e.g. ADE20K's "bed "); otherwise all things, with a
    warning."""
    if classes is not None:
        listed = load_classes(classes)
        if len(listed) != len(names):
            raise ConversionError(f"--classes {classes} has {len(listed)} classes, the model {len(names)}")
        return list(listed.isthing)
    for shipped in available():
        listed = load_classes(shipped)
        if [normalised(n) for n in listed.names] == [normalised(n) for n in names]:
            return list(listed.isthing)
    log.warning("class names match no shipped class list; marking every class as a thing (see --classes)")
    return [True] * len(names)


def normalised(name: str) -> str:
    return name.strip().lower()


def read_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    if (src / "model.safetensors").is_file():
        return read_safetensors(src / "model.safetensors")
    if (src / "pytorch_model.bin").is_file():
        return tensors_only(read_torch_file(src / "pytorch_model.bin"), src / "pytorch_model.bin")
    raise ConversionError(f"{src}: neither model.safetensors nor pytorch_model.bin found")


def class_rows(state: dict[str, torch.Tensor], src: Path) -> int:
    """Rows of the class head: the number of classes, plus one for "no object"."""
    weight = state.get("class_predictor.weight")
    if weight is None or weight.dim() != 2:
        raise ConversionError(f"{src}: no class_predictor.weight matrix among the weights")
    return weight.shape[0]


def convert_hf(src: str | Path, name: str | None = None, classes: str | None = None) -> MaskFormer:
    """`classes`: the shipped class list whose thing flags to take (default: the one whose names match)."""
    src = Path(src)
    hf = read_hf_config(src)
    weights = read_hf_weights(src)
    cfg, names = config_from_hf(src, hf, class_rows(weights, src))
    info = ModelInfo(name=name or src.name, class_names=names, isthing=thing_flags(names, classes))
    rules = HEAD_RULES + (RESNET_RULES if cfg.backbone.kind == "resnet" else SWIN_RULES)
    state = merge_qkv(rename(weights, rules, IGNORE))
    return assemble(build_model(cfg, info), state, str(src))
