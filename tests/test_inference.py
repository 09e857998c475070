"""model/inference.py: batch-norm folding, precision checks, and bf16 on a CPU that has AMX/AVX512-BF16."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops.misc import FrozenBatchNorm2d

import model.inference as inference
from model import ModelInfo, build_model
from model.inference import channels_last, check_precision, fold_frozen_batchnorm, prepare_for_inference, run
from tests.conftest import tiny_config

CPU = torch.device("cpu")


def random_model(block: str = "basic"):
    torch.manual_seed(0)
    cfg = tiny_config(128)
    cfg.backbone.block = block
    model = build_model(cfg, ModelInfo("t", list("abcde"), [False, False, True, True, True])).eval()
    for m in model.modules():  # non-trivial statistics, so that folding has something to get wrong
        if isinstance(m, FrozenBatchNorm2d):
            for name in ("weight", "bias", "running_mean"):
                getattr(m, name).normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_folding_keeps_the_function_and_leaves_no_batch_norm(block):
    model = random_model(block)
    x = torch.rand(2, 3, 128, 128) * 255
    with torch.no_grad():
        want = model(x)
        norms = sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
        assert norms > 0 and fold_frozen_batchnorm(model) == norms
        assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
        got = model(x)
    for key in ("pred_logits", "pred_masks"):
        assert torch.allclose(got[key], want[key], atol=1e-3, rtol=1e-4), (got[key] - want[key]).abs().max()


def test_prepare_leaves_the_callers_model_alone():
    model = random_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = prepare_for_inference(model, CPU, "fp32")
    assert prepared is not model
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_fp32_on_the_cpu_runs_channels_last_and_keeps_the_outputs(block):
    model = random_model(block)
    prepared = prepare_for_inference(model, CPU, "fp32")
    conv = next(m for m in prepared.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert prepared.fold_mask_conv and not model.fold_mask_conv  # the mask head folds (tests/test_model.py)
    x = torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8)
    with torch.no_grad():
        want = model(x.float())
        got = run(prepared, x, CPU, "fp32")
    for key, value in zip(("pred_logits", "pred_masks"), got):
        assert value.dtype == torch.float32
        assert torch.allclose(value, want[key], atol=1e-3, rtol=1e-4), (value - want[key]).abs().max()


def test_channels_last_where_its_kernels_are_fastest():
    """The CPU always (oneDNN), CUDA in fp16/bf16 (tensor cores); fp32 on CUDA stays NCHW."""
    assert channels_last(CPU, "fp32") and channels_last(CPU, "bf16")
    cuda = torch.device("cuda")
    assert channels_last(cuda, "fp16") and channels_last(cuda, "bf16") and not channels_last(cuda, "fp32")


def test_precisions_a_cpu_cannot_run_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        check_precision(CPU, "fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        check_precision(CPU, "int8")
    monkeypatch.setattr(inference, "cpu_has_bf16", lambda: False)
    with pytest.raises(ValueError, match="AMX or AVX512-BF16"):
        check_precision(CPU, "bf16")
    check_precision(CPU, "fp32")


@pytest.mark.skipif(not inference.cpu_has_bf16(), reason="this CPU has neither AMX nor AVX512-BF16")
def test_bf16_on_the_cpu_keeps_the_shipped_models_semantic_maps():
    """bf16 convolutions and matmuls, fp32 norms and post-processing: >= 99 % of pixels keep their class."""
    from model import load_model
    from model.data.shapes import VAL_SEED, generate
    from model.postprocess import postprocess

    model = load_model()
    images = torch.stack([torch.from_numpy(generate(VAL_SEED + i).image).permute(2, 0, 1) for i in range(4)])
    x = F.interpolate(images.float(), size=model.cfg.input_size, mode="bilinear").round().to(torch.uint8)
    with torch.no_grad():
        fp32 = prepare_for_inference(model, CPU, "fp32")
        bf16 = prepare_for_inference(model, CPU, "bf16")
        assert next(p for n, p in bf16.named_parameters() if "conv" in n).dtype == torch.bfloat16
        want, got = run(fp32, x, CPU, "fp32"), run(bf16, x, CPU, "bf16")
    assert got[0].dtype == got[1].dtype == torch.float32
    isthing = model.info.isthing
    maps = [
        [r.label_map() for r in postprocess({"pred_logits": o[0], "pred_masks": o[1]}, "semantic", isthing)]
        for o in (want, got)
    ]
    for a, b in zip(*maps):
        assert (a == b).float().mean() >= 0.99


@pytest.mark.skipif(not inference.cpu_has_bf16(), reason="this CPU has neither AMX nor AVX512-BF16")
def test_bf16_masks_are_no_worse_with_the_folded_mask_head():
    """The folded head in bf16 rounds the per-image folded weights once more: its masks stay as close to
    fp32's as the unfolded head's are."""
    model = random_model("bottleneck")
    x = torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8)
    with torch.no_grad():
        want = run(prepare_for_inference(model, CPU, "fp32"), x, CPU, "fp32")[1]
        bf16 = prepare_for_inference(model, CPU, "bf16")
        assert bf16.fold_mask_conv
        folded = run(bf16, x, CPU, "bf16")[1]
        bf16.fold_mask_conv = False
        unfolded = run(bf16, x, CPU, "bf16")[1]
    err_folded, err_unfolded = (folded - want).abs().mean(), (unfolded - want).abs().mean()
    assert err_folded <= 1.5 * err_unfolded, (err_folded, err_unfolded)
