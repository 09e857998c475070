"""Presets mirror the official configs: parameter counts as in the paper, and the shipped class lists."""

import pytest
import torch

from model import PRESETS, build_model
from model.classes import load_classes

# Paper, Tables 1 and 2 (millions of parameters).
PAPER_PARAMS_M = {
    "r50-ade20k": 41,
    "r101-ade20k": 60,
    "swin-t-ade20k": 42,
    "swin-s-ade20k": 63,
    "swin-b-ade20k": 102,
    "swin-l-ade20k": 212,
    "r50-coco-panoptic": 45,
    "r101-coco-panoptic": 64,
    "swin-t-coco-panoptic": 42,
    "swin-s-coco-panoptic": 63,
    "swin-b-coco-panoptic": 102,
    "swin-l-coco-panoptic": 212,
}


@pytest.mark.parametrize("name", list(PAPER_PARAMS_M))
def test_parameter_count_matches_paper(name):
    with torch.device("meta"):  # count without allocating Swin-L's weights
        model = build_model(PRESETS[name].config)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert round(millions) == PAPER_PARAMS_M[name], f"{name}: {millions:.2f} M"


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_class_list_fits(name):
    preset = PRESETS[name]
    assert len(load_classes(preset.classes)) == preset.config.num_classes


def test_official_architecture_choices():
    r50 = PRESETS["r50-ade20k"].config
    assert (r50.num_queries, r50.hidden_dim, r50.nheads, r50.dim_feedforward, r50.dec_layers) == (100, 256, 8, 2048, 6)
    assert r50.dropout == 0.1 and r50.pixel_decoder == "fpn" and r50.conv_dim == r50.mask_dim == 256
    coco = PRESETS["r50-coco-panoptic"].config
    assert coco.pixel_decoder == "transformer_encoder" and coco.enc_layers == 6 and coco.num_classes == 133


def test_shipped_class_lists():
    ade = load_classes("ade20k-150")
    assert len(ade) == 150 and ade.names[0] == "wall" and ade.names[-1] == "flag" and sum(ade.isthing) == 100
    coco = load_classes("coco-panoptic-133")
    assert len(coco) == 133 and sum(coco.isthing) == 80 and coco.names[0] == "person"
    assert coco.dataset_ids[0] == 1 and coco.dataset_ids[-1] == 200
    with pytest.raises(KeyError, match="shipped"):
        load_classes("cityscapes")
