"""Fitting an image to the model's static input size: resize keeping the aspect ratio, pad right/bottom."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from model.config import IMAGENET_MEAN


def letterbox(
    image: Tensor, size: tuple[int, int], fill: tuple[float, float, float] = IMAGENET_MEAN
) -> tuple[Tensor, tuple[int, int]]:
    """[3, H, W] 0..255 -> ([3, *size] padded input of the same dtype, (h, w) of the image inside it).

    The padding is the mean colour, i.e. 0 after the model's normalisation, as in training (rounded for a
    uint8 image). A uint8 image is resized in uint8: torch's antialiased uint8 kernel is several times
    faster than a round trip through float, and within 1 of its result per pixel.
    """
    _, h, w = image.shape
    scale = min(size[0] / h, size[1] / w)
    rh, rw = max(1, round(h * scale)), max(1, round(w * scale))
    if (rh, rw) != (h, w) and image.dtype == torch.uint8 and not image.is_cpu:
        image = resize_in_float(image, (rh, rw))  # the antialiased uint8 kernel is the CPU's alone
    elif (rh, rw) != (h, w):
        image = F.interpolate(image[None], size=(rh, rw), mode="bilinear", align_corners=False, antialias=True)[0]
    values = [min(max(round(v), 0), 255) if image.dtype == torch.uint8 else v for v in fill]
    out = image.new_empty((3, *size))
    for c, v in enumerate(values):  # filled in place: a host-to-device copy would stall a GPU's stream
        out[c].fill_(v)
    out[:, :rh, :rw] = image
    return out, (rh, rw)


def resize_in_float(image: Tensor, size: tuple[int, int]) -> Tensor:
    """A [3, H, W] uint8 image resized as letterbox resizes, through float32, rounded back to uint8."""
    x = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return x.round_().clamp_(0, 255).to(torch.uint8)
