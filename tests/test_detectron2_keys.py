"""The detectron2 key mapping against the official key names and shapes of the model-zoo checkpoints.

The fixtures list every tensor of the official R50-FPN (ADE20K) and R50+6Enc (COCO panoptic) models;
see tests/fixtures/detectron2_keys/SOURCES.md for where each name comes from.
"""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from model import get_preset, load_model
from model.convert.common import ConversionError
from model.convert.detectron2 import map_detectron2_keys
from model.transformer import MultiheadAttention
from service.cli import main as cli

FIXTURES = Path(__file__).parent / "fixtures" / "detectron2_keys"
CLASS_EMBED = "sem_seg_head.predictor.class_embed.weight"
CASES = {
    "maskformer_R50_FPN_ade20k": "r50-ade20k",
    "maskformer_R50_6enc_coco_panoptic": "r50-coco-panoptic",
}


def official_state(fixture):
    state = {}
    for line in (FIXTURES / f"{fixture}.txt").read_text().splitlines():
        key, shape = line.split()
        state[key] = np.random.default_rng(len(state)).standard_normal([int(s) for s in shape.split(",")])
    return {k: v.astype(np.float32) for k, v in state.items()}


@pytest.mark.parametrize("fixture", list(CASES))
def test_every_official_key_maps_onto_the_preset(fixture, tmp_path):
    state = official_state(fixture)
    pkl = tmp_path / "model_final.pkl"
    pkl.write_bytes(pickle.dumps({"model": state, "__author__": "test"}))
    out = tmp_path / "converted.safetensors"
    assert cli(["convert", "--from", "detectron2", str(pkl), "--preset", CASES[fixture], "--out", str(out)]) == 0
    model = load_model(out)
    ours = model.state_dict()
    # spot checks of values, not just names
    np.testing.assert_array_equal(ours["backbone.body.layer1.0.conv1.weight"], state["backbone.res2.0.conv1.weight"])
    np.testing.assert_array_equal(
        ours["pixel_decoder.lateral_convs.0.0.weight"], state["sem_seg_head.adapter_1.weight"]
    )
    np.testing.assert_array_equal(ours["class_embed.weight"], state[CLASS_EMBED])
    q = state["sem_seg_head.predictor.transformer.decoder.layers.5.multihead_attn.in_proj_weight"][:256]
    np.testing.assert_array_equal(ours["decoder.layers.5.cross_attn.q_proj.weight"], q)
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 64) * 255)
    assert out["pred_logits"].shape[-1] == get_preset(CASES[fixture]).config.num_classes + 1


def test_a_torch_save_pth_loads_without_unpickling(tmp_path, caplog):
    state = {k: torch.from_numpy(v) for k, v in official_state("maskformer_R50_FPN_ade20k").items()}
    pth = tmp_path / "model_final.pth"
    torch.save({"model": state, "iteration": 5}, pth)  # as detectron2's checkpointer saves, zip format
    out = tmp_path / "converted.safetensors"
    assert cli(["convert", "--from", "detectron2", str(pth), "--preset", "r50-ade20k", "--out", str(out)]) == 0
    torch.testing.assert_close(load_model(out).state_dict()["class_embed.weight"], state[CLASS_EMBED])
    assert "loading a pickle" not in caplog.text


def test_unreadable_checkpoints_are_one_line_naming_the_file(tmp_path, capsys):
    pkl = tmp_path / "model_final.pkl"
    pkl.write_bytes(pickle.dumps({"model": official_state("maskformer_R50_FPN_ade20k")})[:5000])
    pth = tmp_path / "model_final.pth"
    torch.save({"model": {"a": torch.zeros(100)}}, pth)
    data = pth.read_bytes()
    pth.write_bytes(data[:100] + b"\0" * 200 + data[300:])  # still a zip file, but torch cannot read it
    for path, what in ((pkl, "pickle"), (pth, "torch file")):
        out = tmp_path / "x.safetensors"
        assert cli(["convert", "--from", "detectron2", str(path), "--preset", "r50-ade20k", "--out", str(out)]) == 2
        assert capsys.readouterr().err.startswith(f"error: {path}: not a readable {what} (")


def test_pixel_decoder_prefix_of_resaved_state_dicts_is_accepted():
    state = {k: torch.from_numpy(v) for k, v in official_state("maskformer_R50_FPN_ade20k").items()}
    resaved = {
        k.replace("sem_seg_head.", "sem_seg_head.pixel_decoder.")
        if not k.startswith("sem_seg_head.predictor")
        else k: v
        for k, v in state.items()
    }
    assert map_detectron2_keys(resaved, "resnet").keys() == map_detectron2_keys(state, "resnet").keys()


def test_unknown_keys_are_an_error():
    state = {k: torch.from_numpy(v) for k, v in official_state("maskformer_R50_FPN_ade20k").items()}
    state["sem_seg_head.predictor.extra_head.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match="no mapping"):
        map_detectron2_keys(state, "resnet")


def test_wrong_preset_is_a_clear_error(tmp_path):
    pkl = tmp_path / "model_final.pkl"
    pkl.write_bytes(pickle.dumps({"model": official_state("maskformer_R50_FPN_ade20k")}))
    out = tmp_path / "x.safetensors"
    assert cli(["convert", "--from", "detectron2", str(pkl), "--preset", "r50-coco-panoptic", "--out", str(out)]) == 2
    assert not out.exists()


def test_split_in_proj_matches_torch_multihead_attention():
    """The official layers are nn.MultiheadAttention; its packed in_proj splits into our q/k/v."""
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    torch.nn.init.normal_(ref.in_proj_bias)
    state = {
        f"sem_seg_head.predictor.transformer.decoder.layers.0.self_attn.{k}": v for k, v in ref.state_dict().items()
    }
    mapped = map_detectron2_keys(state, "resnet")
    ours = MultiheadAttention(32, 4).eval()
    ours.load_state_dict({k.removeprefix("decoder.layers.0.self_attn."): v for k, v in mapped.items()})
    q, k, v = torch.randn(3, 2, 5, 32).unbind(0)
    torch.testing.assert_close(ours(q, k, v), ref(q, k, v, need_weights=False)[0], rtol=0, atol=1e-5)


def official_swin_keys(depths, embed_dim, window):
    """Backbone key names of the official D2SwinTransformer (mask_former/modeling/backbone/swin.py)."""
    keys = {
        "backbone.patch_embed.proj.weight": (embed_dim, 3, 4, 4),
        "backbone.patch_embed.proj.bias": (embed_dim,),
        "backbone.patch_embed.norm.weight": (embed_dim,),
        "backbone.patch_embed.norm.bias": (embed_dim,),
    }
    for i, depth in enumerate(depths):
        c, heads = embed_dim * 2**i, 3 * 2**i
        for j in range(depth):
            b = f"backbone.layers.{i}.blocks.{j}."
            keys |= {
                b + "norm1.weight": (c,),
                b + "norm1.bias": (c,),
                b + "norm2.weight": (c,),
                b + "norm2.bias": (c,),
                b + "attn.relative_position_bias_table": ((2 * window - 1) ** 2, heads),
                b + "attn.relative_position_index": (window**2, window**2),
                b + "attn.qkv.weight": (3 * c, c),
                b + "attn.qkv.bias": (3 * c,),
                b + "attn.proj.weight": (c, c),
                b + "attn.proj.bias": (c,),
                b + "mlp.fc1.weight": (4 * c, c),
                b + "mlp.fc1.bias": (4 * c,),
                b + "mlp.fc2.weight": (c, 4 * c),
                b + "mlp.fc2.bias": (c,),
            }
        if i < len(depths) - 1:
            d = f"backbone.layers.{i}.downsample."
            keys |= {d + "reduction.weight": (2 * c, 4 * c), d + "norm.weight": (4 * c,), d + "norm.bias": (4 * c,)}
        keys |= {f"backbone.norm{i}.weight": (c,), f"backbone.norm{i}.bias": (c,)}
    return keys


def test_swin_backbone_keys_map_onto_the_swin_preset():
    from model.convert.common import assemble
    from model.maskformer import build_model

    head = {k: v for k, v in official_state("maskformer_R50_FPN_ade20k").items() if not k.startswith("backbone.")}
    head["sem_seg_head.adapter_1.weight"] = np.zeros((256, 96, 1, 1), np.float32)
    head["sem_seg_head.adapter_2.weight"] = np.zeros((256, 192, 1, 1), np.float32)
    head["sem_seg_head.adapter_3.weight"] = np.zeros((256, 384, 1, 1), np.float32)
    head["sem_seg_head.layer_4.weight"] = np.zeros((256, 768, 3, 3), np.float32)
    head["sem_seg_head.predictor.input_proj.weight"] = np.zeros((256, 768, 1, 1), np.float32)
    state = {k: torch.from_numpy(v) for k, v in head.items()}
    state |= {k: torch.randn(s) for k, s in official_swin_keys([2, 2, 6, 2], 96, 7).items()}
    model = assemble(build_model(get_preset("swin-t-ade20k").config), map_detectron2_keys(state, "swin"), "swin")
    ours = model.state_dict()
    torch.testing.assert_close(
        ours["backbone.features.5.5.mlp.3.weight"], state["backbone.layers.2.blocks.5.mlp.fc2.weight"]
    )
    torch.testing.assert_close(ours["backbone.norms.3.weight"], state["backbone.norm3.weight"])
    torch.testing.assert_close(
        ours["backbone.features.6.reduction.weight"], state["backbone.layers.2.downsample.reduction.weight"]
    )
