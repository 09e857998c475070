"""Instance masks at the original size, with the areas and probability sums their scores need.

The official instance score is the class probability times the mean sigmoid over the mask's pixels (its
resized logits > 0). Resizing every mask to an upload's full size costs most where a mask is not: on a
CPU, from the size model/resize_blocks.py names, each mask is resized only inside the window of output
rows and columns whose 2x2 region blocks reach 0 or above (a block's output pixels lie between its corners'
logits). Outside that window the mask is empty and adds nothing to the sums; inside it the values are the
resize's own (model/resize_blocks.py). Tests compare both paths.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from model.boxes import count_pixels
from model.resize_blocks import BlockGrid, pad_edges, pool2x2, resize, rounding_margin, use_blocks

RegionFn = Callable[[slice], Tensor]  # a slice of the masks -> their [n, h, w] region logits


def mask_sums(
    region_fn: RegionFn,
    parts: list[slice],
    n: int,
    region_size: tuple[int, int],
    out_size: tuple[int, int],
    device: torch.device,
) -> tuple[Tensor, Tensor, Tensor]:
    """[n, H, W] boolean masks, [n] int32 areas and [n] float64 sums of each mask's sigmoid inside it, for
    the n masks that `parts` cover, resized a part at a time."""
    areas = torch.zeros(n, dtype=torch.int32, device=device)
    prob_sums = torch.zeros(n, dtype=torch.float64, device=device)
    if not use_blocks(region_size, out_size, device):
        binary = torch.empty((n, *out_size), dtype=torch.bool, device=device)
        for part in parts:
            logits = resize(region_fn(part), out_size)
            inside = torch.gt(logits, 0, out=binary[part])
            areas[part] = count_pixels(inside)
            prob_sums[part] = _sum_above_half(logits)
        return binary, areas, prob_sums + 0.5 * areas
    grid = BlockGrid.of(region_size, out_size, device)
    binary = torch.zeros((n, *out_size), dtype=torch.bool, device=device)  # empty outside the windows
    for part in parts:
        padded = pad_edges(region_fn(part))
        # [n, h, w]: blocks whose output pixels can have a logit above 0
        reach = pool2x2(padded, torch.maximum).add_(rounding_margin(padded)) >= 0
        (y0, y1), (x0, x1) = grid.row_bounds(reach.any(2)), grid.col_bounds(reach.any(1))
        for i, window in enumerate(zip(y0.tolist(), y1.tolist(), x0.tolist(), x1.tolist())):
            top, bottom, left, right = window
            if bottom < 0 or right < 0:
                continue  # no output pixel can be in the mask
            ys, xs = slice(top, bottom + 1), slice(left, right + 1)
            logits = grid.resize_window(padded[i : i + 1], ys, xs)[0]
            inside = logits > 0
            binary[part.start + i, ys, xs] = inside
            areas[part.start + i] = count_pixels(inside[None])[0]
            prob_sums[part.start + i] = _sum_above_half(logits[None])[0]
    return binary, areas, prob_sums + 0.5 * areas


def _sum_above_half(logits: Tensor) -> Tensor:
    """Per [n, H, W] mask, the sum of sigmoid - 0.5 over its pixels with logit > 0, in place.

    sigmoid(max(x, 0)) - 0.5 is sigmoid(x) - 0.5 inside (exactly: both lie within a factor 2 of 0.5) and
    exactly 0 outside, so no mask-sized select is needed; the 0.5 per pixel inside is added by the caller.
    Summed along rows first: a float32 sum over whole masks rounds differently depending on how many masks
    are reduced at once, which would make the scores depend on the parts."""
    return logits.clamp_min_(0).sigmoid_().sub_(0.5).sum(2).sum(1, dtype=torch.float64)
