"""`maskformer convert --from hf` beyond the numbers: file variants, class metadata, refusals."""

import json
import re

import pytest
import torch

from model import load_model
from model.classes import load_classes
from model.convert.common import ConversionError
from model.convert.hf import backbone_from_hf
from service.cli import main as cli

transformers = pytest.importorskip("transformers")


def small_hf(**kwargs):
    backbone = transformers.ResNetConfig(
        layer_type="basic",
        depths=[1, 1, 1, 1],
        hidden_sizes=[64, 128, 256, 512],
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    cfg = transformers.MaskFormerConfig(backbone_config=backbone, **kwargs)
    cfg.decoder_config.decoder_layers = 2
    return transformers.MaskFormerForInstanceSegmentation(cfg).eval()


def test_pytorch_model_bin_and_preprocessor_config(tmp_path):
    hf = small_hf(num_labels=4)
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    (src / "model.safetensors").unlink()
    torch.save(hf.state_dict(), src / "pytorch_model.bin")  # the older transformers file layout
    transformers.MaskFormerImageProcessor(size={"shortest_edge": 640, "longest_edge": 1333}).save_pretrained(src)
    out = tmp_path / "m.safetensors"
    assert cli(["convert", "--from", "hf", str(src), "--out", str(out), "--name", "mine"]) == 0
    model = load_model(out)
    assert model.info.name == "mine" and model.cfg.dec_layers == 2 and model.cfg.input_size == (640, 640)
    torch.testing.assert_close(model.pixel_mean.flatten(), torch.tensor([123.675, 116.28, 103.53]))
    x = torch.rand(1, 3, 128, 128) * 255
    with torch.no_grad():
        ref = hf(pixel_values=(x - model.pixel_mean) / model.pixel_std).class_queries_logits
        torch.testing.assert_close(model(x)["pred_logits"], ref, rtol=0, atol=1e-4)


def test_thing_flags_come_from_a_matching_shipped_class_list(tmp_path):
    ade = load_classes("ade20k-150")
    hf = small_hf(id2label=dict(enumerate(ade.names)), label2id={n: i for i, n in enumerate(ade.names)})
    hf.save_pretrained(tmp_path / "hf")
    out = tmp_path / "m.safetensors"
    assert cli(["convert", "--from", "hf", str(tmp_path / "hf"), "--out", str(out)]) == 0
    info = load_model(out).info
    assert info.class_names == list(ade.names) and info.isthing == list(ade.isthing)


def test_refusals_are_clear(tmp_path, capsys):
    assert cli(["convert", "--from", "hf", str(tmp_path), "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "config.json" in capsys.readouterr().err
    small_hf(num_labels=3).save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["backbone_config"]["hidden_sizes"] = [32, 64, 128, 256]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    assert cli(["convert", "--from", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "torchvision" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def convert(src, out, *flags):
    return cli(["convert", "--from", "hf", str(src), "--out", str(out), *flags])


def edit_config(src, **changes):
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))


def test_default_labels_left_out_of_config_json_come_from_the_class_head(tmp_path):
    small_hf().save_pretrained(tmp_path / "hf")  # transformers' default: 2 labels, and no id2label written
    assert "id2label" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    assert convert(tmp_path / "hf", tmp_path / "m.safetensors") == 0
    model = load_model(tmp_path / "m.safetensors")
    assert model.cfg.num_classes == 2 and model.info.class_names == ["LABEL_0", "LABEL_1"]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"id2label": {"0": "a", "1": "b", "5": "c"}}, r"id2label's ids \[0, 1, 5\] are not 0..2"),
        ({"id2label": {"0": "a", "1": "b"}}, "gives 2 classes, but class_predictor.weight has 4 rows"),
        ({"id2label": None, "num_labels": 5}, "gives 5 classes, but class_predictor.weight has 4 rows"),
        ({"id2label": ["a", "b", "c"]}, "id2label is a list, not an object of id -> name"),
    ],
)
def test_class_counts_that_do_not_fit_the_class_head_are_refused(tmp_path, capsys, changes, message):
    small_hf(num_labels=3).save_pretrained(tmp_path / "hf")
    edit_config(tmp_path / "hf", **changes)
    assert convert(tmp_path / "hf", tmp_path / "m.safetensors") == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize(
    "size, expected",
    [
        (640, (640, 640)),  # legacy: an int is the shortest edge (with "max_size" beside it)
        ({"shortest_edge": 800, "longest_edge": 1333}, (800, 800)),
        ({"height": 384, "width": 520}, (384, 512)),
    ],
)
def test_processor_sizes_in_every_spelling(tmp_path, size, expected):
    small_hf(num_labels=3).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps({"size": size, "max_size": 2560}))
    assert convert(tmp_path / "hf", tmp_path / "m.safetensors") == 0
    assert load_model(tmp_path / "m.safetensors").cfg.input_size == expected


@pytest.mark.parametrize("size", [{"longest_edge": 1333}, "640", 16, {"height": 384}])
def test_processor_sizes_that_say_nothing_usable_are_refused(tmp_path, capsys, size):
    small_hf(num_labels=3).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps({"size": size}))
    assert convert(tmp_path / "hf", tmp_path / "m.safetensors") == 2
    assert "preprocessor_config.json: size " in capsys.readouterr().err


def test_class_names_match_a_shipped_list_whatever_their_spacing_and_case(tmp_path):
    ade = load_classes("ade20k-150")
    names = [n.upper() if i % 2 else n for i, n in enumerate(ade.names)]
    names[7] = "bed "  # as huggingface/label-files' ade20k-id2label.json spells it
    small_hf(id2label=dict(enumerate(names))).save_pretrained(tmp_path / "hf")
    assert convert(tmp_path / "hf", tmp_path / "m.safetensors") == 0
    info = load_model(tmp_path / "m.safetensors").info
    assert info.class_names == names and info.isthing == list(ade.isthing)


def test_the_classes_flag_chooses_the_thing_flags(tmp_path, capsys):
    shapes = load_classes("shapes")
    small_hf(id2label={i: f"c{i}" for i in range(len(shapes))}).save_pretrained(tmp_path / "hf")
    assert convert(tmp_path / "hf", tmp_path / "m.safetensors", "--classes", "shapes") == 0
    info = load_model(tmp_path / "m.safetensors").info
    assert info.class_names == [f"c{i}" for i in range(5)] and info.isthing == list(shapes.isthing)
    assert convert(tmp_path / "hf", tmp_path / "n.safetensors", "--classes", "ade20k_150") == 2
    assert "--classes ade20k_150 has 150 classes, the model 5" in capsys.readouterr().err
    assert convert(tmp_path / "hf", tmp_path / "n.safetensors", "--classes", "coco") == 2
    assert "no class list 'coco'; shipped: ade20k-150" in capsys.readouterr().err
    assert not (tmp_path / "n.safetensors").exists()


def test_unreadable_files_are_one_line_naming_them(tmp_path, capsys):
    hf = small_hf(num_labels=3)
    hf.save_pretrained(tmp_path / "hf")
    capsys.readouterr()  # transformers' progress bar
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # a download cut short
    assert convert(tmp_path / "hf", tmp_path / "m.safetensors") == 2
    assert capsys.readouterr().err.startswith(f"error: {weights}: not a readable safetensors file (")
    weights.unlink()
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"junk" * 100)  # torch.load: KeyError 1785425525
    assert convert(tmp_path / "hf", tmp_path / "m.safetensors") == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'hf' / 'pytorch_model.bin'}: not a readable torch")
    (tmp_path / "hf" / "config.json").write_text("{")
    assert convert(tmp_path / "hf", tmp_path / "m.safetensors") == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'hf' / 'config.json'}: not a readable JSON file")


def test_out_may_not_replace_a_file_the_conversion_reads(tmp_path, capsys):
    small_hf(num_labels=3).save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    before = weights.read_bytes()
    for out in (weights, tmp_path / "hf" / ".." / "hf" / "model.safetensors"):
        assert convert(tmp_path / "hf", out) == 2
        assert "which the conversion reads" in capsys.readouterr().err
    assert weights.read_bytes() == before
    assert convert(tmp_path / "hf", tmp_path / "m.safetensors") == 0
    # re-saving one of ours in place reads it whole first, so it stays allowed
    args = ["convert", "--from", "maskformer", str(tmp_path / "m.safetensors"), "--fp16", "--name", "half"]
    assert cli([*args, "--out", str(tmp_path / "m.safetensors")]) == 0
    assert load_model(tmp_path / "m.safetensors").info.name == "half"


@pytest.mark.parametrize(
    "backbone, change, message",
    [
        ("resnet", {"hidden_act": "gelu"}, "ResNet backbone with hidden_act='gelu' is not supported"),
        ("swin", {"hidden_act": "relu"}, "Swin backbone with hidden_act='relu' is not supported"),
        ("swin", {"layer_norm_eps": 1e-6}, "Swin backbone with layer_norm_eps=1e-06 is not supported"),
    ],
)
def test_backbone_settings_the_converter_would_ignore_are_refused(backbone, change, message):
    config = (transformers.ResNetConfig() if backbone == "resnet" else transformers.SwinConfig()).to_dict()
    assert backbone_from_hf(config).kind == backbone  # transformers' defaults are ours
    with pytest.raises(ConversionError, match=message):
        backbone_from_hf(config | change)
