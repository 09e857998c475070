"""Training augmentations of the official configs, on torchvision.transforms.v2 so masks follow the image:
random short-side resize, crop (padded where the image is smaller), horizontal flip, colour jitter."""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from model.config import IMAGENET_MEAN


def train_transforms(
    crop: tuple[int, int], min_scale: float = 0.5, max_scale: float = 2.0, colour: bool = True
) -> v2.Compose:
    """Resize the short side to crop*U[min_scale, max_scale], crop to `crop`, flip, jitter colours.

    Padding uses the mean colour for the image (0 after normalisation, like the official padding) and
    "no segment" for masks.
    """
    short = min(crop)
    steps = [
        v2.RandomShortestSize(
            min_size=list(range(int(short * min_scale), int(short * max_scale) + 1, 32)) or [short],
            antialias=True,
        ),
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


def drop_empty(target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove segments that augmentation cropped away entirely."""
    keep = target["masks"].flatten(1).any(1)
    return {"labels": target["labels"][keep], "masks": target["masks"][keep]}
