"""The forward contract that export, the service and the tests rely on."""

import pytest
import torch

from model import MaskFormerConfig, build_model, get_preset
from model.config import resnet, swin
from tests.conftest import tiny_config

TINY = tiny_config()


def test_forward_contract_eval():
    model = build_model(TINY).eval()
    x = torch.rand(3, 3, 128, 160) * 255
    with torch.no_grad():
        out = model(x)
    assert set(out) == {"pred_logits", "pred_masks"}
    assert out["pred_logits"].shape == (3, 10, 6) and out["pred_masks"].shape == (3, 10, 32, 40)
    assert out["pred_logits"].dtype == torch.float32


def test_aux_outputs_only_in_training():
    model = build_model(TINY).train()
    out = model(torch.rand(2, 3, 64, 64) * 255)
    assert len(out["aux_outputs"]) == TINY.dec_layers - 1
    assert out["aux_outputs"][0]["pred_masks"].shape == out["pred_masks"].shape
    out["pred_masks"].sum().backward()  # differentiable end to end


def test_normalisation_happens_inside_with_stored_mean_and_std():
    model = build_model(TINY).eval()
    x = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        a = model(x)["pred_masks"]
        model.pixel_mean.zero_()
        model.pixel_std.fill_(1.0)
        b = model((x - torch.tensor(TINY.pixel_mean).view(1, 3, 1, 1)) / torch.tensor(TINY.pixel_std).view(1, 3, 1, 1))
    torch.testing.assert_close(a, b["pred_masks"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("backbone", [resnet(18), swin("t")])
def test_images_in_a_batch_do_not_affect_each_other(backbone):
    cfg = MaskFormerConfig(num_classes=3, backbone=backbone, num_queries=5, dec_layers=1, input_size=(96, 96))
    model = build_model(cfg).eval()
    x = torch.rand(3, 3, 96, 96) * 255
    with torch.no_grad():
        batched = model(x)["pred_masks"]
        single = model(x[1:2])["pred_masks"]
    torch.testing.assert_close(batched[1:2], single, rtol=0, atol=1e-4)


def test_exports_with_a_dynamic_batch_and_no_data_dependent_control_flow():
    model = build_model(get_preset("r10-tiny-shapes").config).eval()
    x = torch.rand(2, 3, 256, 256) * 255
    batch = torch.export.Dim("batch", min=1, max=16)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},), strict=False)
    with torch.no_grad():
        for n in (1, 3):
            xi = torch.rand(n, 3, 256, 256) * 255
            torch.testing.assert_close(program.module()(xi)["pred_masks"], model(xi)["pred_masks"], rtol=0, atol=1e-4)


def test_config_validation():
    with pytest.raises(ValueError, match="multiples of 32"):
        MaskFormerConfig(num_classes=3, input_size=(500, 512))
    with pytest.raises(ValueError, match="enc_layers"):
        MaskFormerConfig(num_classes=3, pixel_decoder="transformer_encoder")
    with pytest.raises(ValueError, match="backbone kind"):
        MaskFormerConfig(num_classes=3, backbone={"kind": "vgg"})
    with pytest.raises(KeyError, match="known presets"):
        get_preset("r50-cityscapes")
    assert MaskFormerConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ValueError, match="transformer_in_feature"):
        MaskFormerConfig(num_classes=3, transformer_in_feature="transformer_encoder")
    assert MaskFormerConfig(num_classes=3).transformer_in_feature == "res5"
    old = TINY.to_dict()
    del old["transformer_in_feature"]  # checkpoints written before the field existed
    assert MaskFormerConfig.from_dict(old).transformer_in_feature == "res5"


@pytest.mark.parametrize("pixel_decoder, enc_layers", [("fpn", 0), ("transformer_encoder", 1)])
def test_decoder_can_attend_to_the_pixel_embedding(pixel_decoder, enc_layers):
    """The official TRANSFORMER_IN_FEATURE "pixel_embedding": the decoder reads the stride-4 mask features."""
    import dataclasses

    cfg = dataclasses.replace(
        TINY, pixel_decoder=pixel_decoder, enc_layers=enc_layers, transformer_in_feature="pixel_embedding"
    )
    model = build_model(cfg).eval()
    seen = {}
    model.input_proj.register_forward_hook(lambda m, args, out: seen.update(shape=args[0].shape))
    with torch.no_grad():
        out = model(torch.rand(2, 3, 128, 96) * 255)
    assert seen["shape"] == (2, cfg.mask_dim, 32, 24)
    assert out["pred_masks"].shape == (2, 10, 32, 24)


@pytest.mark.parametrize("pixel_decoder, enc_layers", [("fpn", 0), ("transformer_encoder", 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_folded_mask_head_gives_the_same_masks(pixel_decoder, enc_layers, channels_last, monkeypatch):
    """Eager (one grouped conv) and exported (per-tap matmul + fold) forms against the product after the conv,
    in a batch of 3 with a rectangular image; the class logits do not change at all."""
    import dataclasses

    import torch.nn.functional as F

    from model.heads import folded_mask_logits

    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, pixel_decoder=pixel_decoder, enc_layers=enc_layers, transformer_in_feature="")
    model = build_model(cfg).eval()
    with torch.no_grad():
        conv = model.pixel_decoder.mask_features
        conv.bias.normal_()  # the bias folds into a per-query constant: make it count
        x = torch.rand(3, 3, 128, 96) * 255
        if channels_last:  # as model/inference.py runs it on a CPU
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        want = model(x)
        model.fold_mask_conv = True
        got = model(x)
        assert torch.equal(got["pred_logits"], want["pred_logits"])
        torch.testing.assert_close(got["pred_masks"], want["pred_masks"], rtol=1e-5, atol=1e-4)
        # the exported form, run eagerly
        embed, y = torch.randn(3, 10, TINY.mask_dim), torch.randn(3, TINY.conv_dim, 32, 24)
        product = embed @ F.conv2d(y, conv.weight, conv.bias, padding=1).flatten(2)
        eager = folded_mask_logits(embed, y, conv)
        monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)  # as under torch.export
        exported = folded_mask_logits(embed, y, conv)
    for form in (eager, exported):
        torch.testing.assert_close(form.flatten(2), product, rtol=1e-5, atol=1e-4)


def test_the_mask_head_folds_only_where_it_can_and_saves_work():
    import dataclasses

    from model.maskformer import mask_conv_folds_cheaper

    assert mask_conv_folds_cheaper(TINY) and mask_conv_folds_cheaper(get_preset("r50-ade20k").config)
    assert not mask_conv_folds_cheaper(dataclasses.replace(TINY, num_queries=200))  # more queries than channels
    attends = dataclasses.replace(TINY, transformer_in_feature="pixel_embedding")
    assert not mask_conv_folds_cheaper(attends) and not mask_conv_folds_cheaper(get_preset("r10-tiny-shapes").config)
    model = build_model(attends).eval()
    model.fold_mask_conv = True
    with pytest.raises(ValueError, match="attends the pixel embedding"), torch.no_grad():
        model(torch.rand(1, 3, 64, 64) * 255)
    model.train()  # training never folds: deep supervision needs every layer's masks
    assert len(model(torch.rand(1, 3, 64, 64) * 255)["aux_outputs"]) == TINY.dec_layers - 1
