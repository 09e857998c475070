"""How stride-4 mask logits reach the image, as the official code does it.

Bilinearly to the padded input size, cropped to the image's region, then bilinearly to its original size;
this module does the first two steps; model/resize_blocks.py the last (whole, or by blocks where that pays).
"""

from __future__ import annotations

from torch import Tensor

from model.resize_blocks import resize


def region_logits(masks: Tensor, input_size: tuple[int, int], image_size: tuple[int, int]) -> Tensor:
    """[N, h, w] mask logits at stride 4 -> [N, *image_size] logits of the image's region at the input size."""
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *image_size))
    return resize(masks, input_size)[:, : image_size[0], : image_size[1]]
