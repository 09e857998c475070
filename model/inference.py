"""A trained model made ready for inference in a given precision: the same function, cheaper to run.

- FrozenBatchNorm is folded into the convolution before it, as ONNX Runtime and TensorRT fold the exported
  graph; in torch eager it otherwise costs a multiply and an add over every feature map.
- In fp16/bf16, convolution and linear weights are cast once, instead of by autocast on every call.
- On a CPU, activations are channels_last, the layout oneDNN's convolutions run fastest in: in fp32 too,
  and in bf16 for the AMX and AVX512-BF16 kernels.
  bf16 on a CPU needs one of those instruction sets; without them it is slower than fp32, so it is refused.
  On CUDA they are channels_last in fp16/bf16, the layout tensor-core convolutions read natively
  (unmeasured here: no GPU has been lent to this work).
- On CUDA, fp32 means fp32: cuDNN's TF32 convolutions (on by default in PyTorch) are turned off, as TF32
  matmuls are by default, so the fp32 rows of a benchmark are the precision they name.
- On a CPU, the mask embeddings are folded into the pixel decoder's last conv where that saves work
  (`MaskFormer.fold_mask_conv`; for the ADE20K R50 preset 13 % of the forward pass's FLOPs). Not on CUDA,
  where it has not been measured.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from model.config import MaskFormerConfig
from model.maskformer import MaskFormer, mask_conv_folds_cheaper

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_precision(device: torch.device, precision: str) -> None:
    """Raise ValueError for a precision this device cannot run well."""
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {precision!r}")
    if device.type == "cpu" and precision == "fp16":
        raise ValueError("fp16 needs a CUDA device; on the CPU use fp32, or bf16 where the CPU has AMX/AVX512-BF16")
    if device.type == "cpu" and precision == "bf16" and not cpu_has_bf16():
        raise ValueError("bf16 on the CPU needs AMX or AVX512-BF16, which this CPU lacks; use fp32")


def cpu_has_bf16() -> bool:
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def fold_frozen_batchnorm(module: nn.Module) -> int:
    """Fold each FrozenBatchNorm2d of torchvision's ResNet layout into its conv, in place; returns how many."""
    folded = 0
    for parent in list(module.modules()):
        pairs = [(f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
        for conv_name, bn_name in pairs:
            conv, bn = getattr(parent, conv_name, None), getattr(parent, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, FrozenBatchNorm2d):
                _fold(conv, bn)
                setattr(parent, bn_name, nn.Identity())
                folded += 1
        down = getattr(parent, "downsample", None)
        if isinstance(down, nn.Sequential) and len(down) == 2 and isinstance(down[1], FrozenBatchNorm2d):
            assert isinstance(down[0], nn.Conv2d)
            _fold(down[0], down[1])
            down[1] = nn.Identity()
            folded += 1
    return folded


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> None:
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    shift = bn.bias - bn.running_mean * scale
    conv.weight.mul_(scale[:, None, None, None])
    bias = shift if conv.bias is None else conv.bias * scale + shift
    conv.bias = nn.Parameter(bias, requires_grad=False)


def folds_mask_conv(cfg: MaskFormerConfig, device: torch.device, enabled: bool = True) -> bool:
    """Whether inference on `device` runs the folded mask head: on a CPU, where it saves work (unmeasured on
    CUDA, and TensorRT cannot parse its exported form)."""
    return enabled and device.type == "cpu" and mask_conv_folds_cheaper(cfg)


def prepare_for_inference(
    model: MaskFormer, device: torch.device, precision: str, fold_mask_conv: bool = True
) -> MaskFormer:
    """A copy of the model on `device`, in eval mode, rewritten for `precision` (see the module docstring)."""
    check_precision(device, precision)
    model = copy.deepcopy(model).to(device).eval()
    fold_frozen_batchnorm(model)
    if precision != "fp32":
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.to(DTYPES[precision])
    if device.type == "cpu":
        model.fold_mask_conv = folds_mask_conv(model.cfg, device, fold_mask_conv)
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False  # process-wide, as cuDNN's setting is
        torch.backends.cuda.matmul.allow_tf32 = False
    if channels_last(device, precision):
        # torch 2.11's type stubs lack Module.to's memory_format overload, which every version runs
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload,unused-ignore]
    return model


def channels_last(device: torch.device, precision: str) -> bool:
    """Whether the model runs channels_last activations here (see the module docstring)."""
    return device.type == "cpu" or (device.type == "cuda" and precision != "fp32")


def run(model: Callable[[Tensor], Any], images: Tensor, device: torch.device, precision: str) -> tuple[Tensor, Tensor]:
    """(pred_logits, pred_masks) in fp32 for [B, 3, H, W] images (uint8 or float) already on `device`."""
    x = images.float()
    if channels_last(device, precision):
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, DTYPES[precision], enabled=precision != "fp32"):
        out = model(x)
    return out["pred_logits"].float(), out["pred_masks"].float()
