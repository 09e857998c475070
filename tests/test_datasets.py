"""ADE20K loader, local backbone weights, and the data/train/eval commands end to end."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision.models import resnet18, swin_t

from model import MaskFormerConfig, build_model, get_preset
from model.backbone_weights import load_backbone_weights
from model.config import resnet
from model.data.ade20k import ADE20K
from model.data.shapes import write_split
from model.data.transforms import make_sample, short_sides, train_transforms
from service.cli import main as cli
from tests.test_detectron2_keys import official_swin_keys


def fake_ade(root, n=2):
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            ann = np.zeros((40, 60), np.uint8)
            ann[:20] = 3  # sky... class index 2
            ann[20:, :30] = 150  # flag, the last class
            Image.fromarray(np.full((40, 60, 3), 100, np.uint8)).save(root / "images" / split / f"ADE_{i}.jpg")
            Image.fromarray(ann).save(root / "annotations" / split / f"ADE_{i}.png")
    return root


def test_ade20k_gives_one_mask_per_class_and_ignores_zero(tmp_path):
    ds = ADE20K(fake_ade(tmp_path), "validation")
    assert len(ds) == 2 and len(ds.class_names) == 150
    x, target = ds[0]
    assert x.shape == (3, 40, 60)
    assert target["labels"].tolist() == [2, 149]
    assert target["masks"].sum().item() == 20 * 60 + 20 * 30  # value 0 belongs to no mask
    with pytest.raises(FileNotFoundError, match="ADEChallengeData2016"):
        ADE20K(tmp_path / "nope")


def test_each_format_has_its_own_split_names_and_a_missing_split_lists_those_there(tmp_path, capsys):
    ade = fake_ade(tmp_path / "ADEChallengeData2016")
    run = ["--workers", "0", "--crop", "64", "--steps", "1", "--batch-size", "2"]
    tiny_ade = ["train", "--preset", "r10-tiny-ade20k", "--format", "ade20k", "--data", str(ade), *run]
    assert cli([*tiny_ade, "--out", str(tmp_path / "run")]) == 0  # no --train-split: training
    weights = ["--weights", str(tmp_path / "run" / "model.safetensors")]
    assert cli(["eval", *weights, "--data", str(ade), "--format", "ade20k"]) == 0  # no --split: validation
    capsys.readouterr()
    assert cli([*tiny_ade, "--out", str(tmp_path / "run2"), "--train-split", "train"]) == 2
    err = capsys.readouterr().err
    assert "has no split 'train': the folders in annotations/ are training, validation" in err, err
    shapes = tmp_path / "shapes"
    assert cli(["data", "shapes", "--out", str(shapes), "--train", "1", "--val", "1"]) == 0
    capsys.readouterr()
    assert cli(["eval", *weights, "--data", str(shapes), "--split", "val2017"]) == 2
    assert "has no split 'val2017' (no panoptic_val2017.json); the splits there: train, val" in capsys.readouterr().err
    (shapes / "panoptic_val.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    assert cli(["eval", *weights, "--data", str(shapes)]) == 2
    assert f"the split 'val' of {shapes} has no images" in capsys.readouterr().err
    assert cli(["data", "shapes", "--out", str(tmp_path / "none"), "--train", "0", "--val", "0"]) == 2
    assert "there is nothing to write" in capsys.readouterr().err


def centroid(weights: torch.Tensor) -> torch.Tensor:
    yy, xx = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in weights.shape), indexing="ij")
    w = weights.double()
    return torch.stack([(w * yy).sum(), (w * xx).sum()]) / w.sum()


@pytest.mark.parametrize("short", [179, 333])  # 0.7 and 1.3 x a 256 crop
def test_resized_masks_stay_on_the_image(short):
    # Even factors such as 256 -> 128 have no pixel centre to sample: any nearest rule is 1/4 pixel off there.
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    disk = (yy - 100.3) ** 2 + (xx - 140.7) ** 2 < 60**2
    image = np.repeat(disk.numpy()[..., None] * np.uint8(255), 3, axis=2)
    x, target = make_sample(
        image, disk.numpy().astype(np.int64), [1], [0], train_transforms((short, short), 1, 1, False)
    )
    offset = centroid(target["masks"][0]) - centroid(x[0])
    assert offset.abs().max() < 0.1, offset  # v2's legacy NEAREST: about 0.5 pixel down-right


def test_the_scale_choice_holds_the_smallest_and_largest_scale():
    assert short_sides(512, 0.5, 2.0) == [int(x * 0.1 * 512) for x in range(5, 21)]  # the official list
    assert short_sides(256, 1.0, 1.1) == [256, 281]  # steps of 32 pixels gave [256]
    assert short_sides(256, 1.0, 1.25) == [256, 281, 307, 320]
    assert short_sides(256, 1.0, 1.0) == [256]
    with pytest.raises(ValueError, match="min scale <= max scale, got 2.0 and 1.0"):
        train_transforms((256, 256), 2.0, 1.0)


def test_a_missing_image_is_a_one_line_error_naming_it(tmp_path, capsys):
    data = tmp_path / "shapes"
    write_split(data, "train", 2, 0)
    (data / "images" / "train" / "00000001.png").unlink()
    run = ["--data", str(data), "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2", "--crop", "64"]
    assert cli(["train", "--preset", "r10-tiny-shapes", *run, "--workers", "1"]) == 2  # read in a worker
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # below the progress bar's line
    assert line.startswith("error: FileNotFoundError") and line.endswith("images/train/00000001.png'"), err
    assert "Traceback" not in err


def test_torchvision_resnet_weights_load_into_the_backbone(tmp_path):
    ref = resnet18()
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    model = build_model(MaskFormerConfig(num_classes=3, backbone=resnet(18)))
    load_backbone_weights(model, tmp_path / "r18.pth")
    torch.testing.assert_close(model.backbone.body.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    torch.testing.assert_close(model.backbone.body.bn1.running_var, ref.bn1.running_var)
    wrong = build_model(MaskFormerConfig(num_classes=3, backbone=resnet(50)))
    with pytest.raises(ValueError, match="does not fit"):
        load_backbone_weights(wrong, tmp_path / "r18.pth")


def test_unreadable_backbone_weights_are_an_error_naming_the_file(tmp_path):
    model = build_model(MaskFormerConfig(num_classes=3, backbone=resnet(18)))
    save_file(resnet18().state_dict(), str(tmp_path / "r18.safetensors"))
    torch.save([1, 2], tmp_path / "list.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file at all")
    data = (tmp_path / "r18.safetensors").read_bytes()
    (tmp_path / "r18.safetensors").write_bytes(data[: len(data) // 2])  # a download cut short
    for name, message in (
        ("r18.safetensors", "not a readable safetensors file"),
        ("junk.pth", "not a readable torch file"),
        ("list.pth", "not a state dict"),
    ):
        with pytest.raises(ValueError, match=f"{tmp_path / name}: {message}"):
            load_backbone_weights(model, tmp_path / name)


def test_torchvision_and_timm_style_swin_weights_load(tmp_path):
    model = build_model(get_preset("swin-t-ade20k").config)
    ref = swin_t()
    torch.save({"model": ref.state_dict()}, tmp_path / "swin_tv.pth")
    load_backbone_weights(model, tmp_path / "swin_tv.pth")
    torch.testing.assert_close(model.backbone.features[5][3].attn.qkv.weight, ref.features[5][3].attn.qkv.weight)
    timm = {k.removeprefix("backbone."): torch.randn(s) for k, s in official_swin_keys([2, 2, 6, 2], 96, 7).items()}
    timm = {k: v for k, v in timm.items() if not k.startswith("norm")} | {"head.weight": torch.zeros(1)}
    torch.save(timm, tmp_path / "swin_timm.pth")
    load_backbone_weights(model, tmp_path / "swin_timm.pth")
    merge = timm["layers.2.downsample.reduction.weight"]
    torch.testing.assert_close(model.backbone.features[6].reduction.weight, merge)
    torch.testing.assert_close(model.backbone.features[3][1].mlp[0].weight, timm["layers.1.blocks.1.mlp.fc1.weight"])


def test_data_train_eval_commands(tmp_path, capsys):
    data, out = tmp_path / "shapes", tmp_path / "run"
    assert cli(["data", "shapes", "--out", str(data), "--train", "4", "--val", "2"]) == 0
    assert (
        cli(
            [
                "train",
                "--preset",
                "r10-tiny-shapes",
                "--data",
                str(data),
                "--out",
                str(out),
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--workers",
                "0",
                "--crop",
                "64",
                "--val-split",
                "val",
                "--eval-images",
                "2",
            ]
        )
        == 0
    )
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["step"] == 2 and "PQ" in last and "mIoU" in last
    # continue from the checkpoint; without --preset or --init there is nothing to train
    more = ["--data", str(data), "--steps", "1", "--batch-size", "2", "--workers", "0", "--crop", "64"]
    init = ["--init", str(out / "model.safetensors"), "--out", str(tmp_path / "more")]
    assert cli(["train", *init, *more]) == 0
    assert (tmp_path / "more" / "model.safetensors").is_file()
    capsys.readouterr()
    assert cli(["train", *init, *more]) == 2  # a fresh run into a run's folder
    assert "holds another run (metrics.jsonl, last.pt)" in capsys.readouterr().err
    assert cli(["train", *init, *more, "--overwrite"]) == 0
    assert cli(["train", "--out", str(tmp_path / "none"), *more]) == 2
    capsys.readouterr()
    report = tmp_path / "report.json"
    assert cli(["eval", "--weights", str(out / "model.safetensors"), "--data", str(data), "--out", str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["summary"]["images"] == 2 and set(r["per_class_iou"]) == {"sky", "ground", "circle", "square", "triangle"}
    assert "PQ" in capsys.readouterr().out
    # the class lists must agree
    ade = fake_ade(tmp_path / "ade")
    assert (
        cli(
            [
                "eval",
                "--weights",
                str(out / "model.safetensors"),
                "--data",
                str(ade),
                "--format",
                "ade20k",
            ]
        )
        == 2
    )
    assert "the data's classes" in capsys.readouterr().err
