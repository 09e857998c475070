"""Training augmentations of the official configs, on torchvision.transforms.v2 so masks follow the image:
random short-side resize, crop (padded where the image is smaller), horizontal flip, colour jitter."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from model.config import IMAGENET_MEAN


class RandomShortSide(v2.RandomShortestSize):
    """v2.RandomShortestSize, with masks resized by nearest-exact (PIL's NEAREST, as detectron2 resizes
    segmentations): sampled at each output pixel's centre, so they stay on the image. v2's masks use the
    legacy NEAREST, which samples up-left of the centre and shifts masks down-right by up to half a pixel."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            return F.resize(inpt, size=params["size"], interpolation=v2.InterpolationMode.NEAREST_EXACT)
        return super().transform(inpt, params)


def short_sides(short: int, min_scale: float, max_scale: float) -> list[int]:
    """The short sides to choose from: short x min_scale, then steps of short x 0.1 up to short x max_scale,
    which is in the list too (the official configs: [int(x * 0.1 * 512) for x in range(5, 21)])."""
    if not 0 < min_scale <= max_scale:
        raise ValueError(f"the scale range needs 0 < min scale <= max scale, got {min_scale} and {max_scale}")
    steps = math.floor(round((max_scale - min_scale) * 10, 6))
    scales = [min_scale + k / 10 for k in range(steps + 1)] + [max_scale]
    return sorted({max(1, int(round(short * scale, 6))) for scale in scales})


def train_transforms(
    crop: tuple[int, int], min_scale: float = 0.5, max_scale: float = 2.0, colour: bool = True
) -> v2.Compose:
    """Resize the short side to one of short_sides(min(crop), ...) chosen uniformly (detectron2's
    ResizeShortestEdge "choice"), crop to `crop`, flip, jitter colours.

    Padding uses the mean colour for the image (0 after normalisation, like the official padding) and
    "no segment" for masks.
    """
    steps = [
        RandomShortSide(min_size=short_sides(min(crop), min_scale, max_scale), antialias=True),
        v2.RandomCrop(
            crop,
            pad_if_needed=True,
            fill={tv_tensors.Image: tuple(int(round(m)) for m in IMAGENET_MEAN), tv_tensors.Mask: 0},
        ),
        v2.RandomHorizontalFlip(),
    ]
    if colour:
        steps.append(v2.ColorJitter(brightness=0.125, contrast=0.5, saturation=0.5, hue=0.05))
    return v2.Compose(steps)


def make_sample(
    image: np.ndarray, ids: np.ndarray, segment_ids: list[int], labels: list[int], transforms: v2.Transform | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(RGB uint8 image, segment-id map) -> (image [3, H, W] float 0..255, {labels [N], masks [N, H, W]}),
    augmented, without the segments augmentation cropped away."""
    masks = np.stack([ids == i for i in segment_ids]) if segment_ids else np.zeros((0, *ids.shape), bool)
    img = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1).contiguous())
    mask_tv = tv_tensors.Mask(torch.from_numpy(masks))
    if transforms is not None:
        img, mask_tv = transforms(img, mask_tv)
    masks_t = mask_tv.as_subclass(torch.Tensor).bool()
    keep = masks_t.flatten(1).any(1)
    target = {"labels": torch.tensor(labels, dtype=torch.int64)[keep], "masks": masks_t[keep]}
    return img.as_subclass(torch.Tensor).float(), target
