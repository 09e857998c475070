"""Numerical parity with transformers' MaskFormer, built from configs with random weights (offline).

Each model goes through `maskformer convert --from hf` and `load_model`, exactly as a user's would.
transformers is fed (x/255 - mean)/std; ours takes x in 0..255 and normalises inside.
"""

import pytest
import torch

from model import load_model
from service.cli import main as cli
from tests.conftest import scene

transformers = pytest.importorskip("transformers")

STAGES = ["stage1", "stage2", "stage3", "stage4"]


def resnet(layer_type, depths, widths):
    return transformers.ResNetConfig(layer_type=layer_type, depths=depths, hidden_sizes=widths, out_features=STAGES)


def swin(embed_dim, depths, heads, window):
    return transformers.SwinConfig(
        embed_dim=embed_dim, depths=depths, num_heads=heads, window_size=window, out_features=STAGES
    )


CONFIGS = {
    # small configs
    "resnet-basic-small": (resnet("basic", [1, 1, 1, 1], [64, 128, 256, 512]), (256, 320)),
    "resnet-bottleneck-small": (resnet("bottleneck", [1, 1, 2, 1], [256, 512, 1024, 2048]), (256, 256)),
    "swin-small": (swin(32, [1, 1, 2, 2], [1, 2, 4, 8], 7), (256, 320)),
    # stage 4 exactly one window wide: the shift must still happen, as in the official Swin
    "swin-small-224": (swin(32, [2, 2, 2, 2], [1, 2, 4, 8], 7), (224, 224)),
    # full-size configs
    "resnet50": (resnet("bottleneck", [3, 4, 6, 3], [256, 512, 1024, 2048]), (256, 256)),
    "resnet18": (resnet("basic", [2, 2, 2, 2], [64, 128, 256, 512]), (256, 256)),
    "swin-tiny": (swin(96, [2, 2, 6, 2], [3, 6, 12, 24], 7), (256, 256)),
}


def convert(hf_model, tmp_path):
    src = tmp_path / "hf"
    hf_model.save_pretrained(src)
    out = tmp_path / "ours.safetensors"
    assert cli(["convert", "--from", "hf", str(src), "--out", str(out)]) == 0
    return load_model(out)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_outputs_match_transformers(name, tmp_path):
    backbone, (h, w) = CONFIGS[name]
    cfg = transformers.MaskFormerConfig(backbone_config=backbone, num_labels=11)
    hf = transformers.MaskFormerForInstanceSegmentation(cfg).eval()
    ours = convert(hf, tmp_path)
    assert not ours.training
    assert ours.info.class_names == [f"LABEL_{i}" for i in range(11)]

    x = torch.cat([scene(1, h, w), torch.rand(1, 3, h, w) * 255])
    with torch.no_grad():
        out = ours(x)
        ref = hf(pixel_values=(x - ours.pixel_mean) / ours.pixel_std)
    assert out["pred_logits"].shape == (2, 100, 12)
    assert out["pred_masks"].shape == (2, 100, h // 4, w // 4)
    torch.testing.assert_close(out["pred_logits"], ref.class_queries_logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(out["pred_masks"], ref.masks_queries_logits, rtol=0, atol=1e-4)
