"""MaskFormer in PyTorch: model, presets, checkpoints and post-processing."""

from model.checkpoint import load_model, read_metadata, save_model
from model.config import PRESETS, BackboneConfig, MaskFormerConfig, get_preset
from model.maskformer import MaskFormer, ModelInfo, build_model

__all__ = [
    "PRESETS",
    "BackboneConfig",
    "MaskFormer",
    "MaskFormerConfig",
    "ModelInfo",
    "build_model",
    "get_preset",
    "load_model",
    "read_metadata",
    "save_model",
]
