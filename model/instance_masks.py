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
import torch.nn.functional as F
from torch import Tensor

from model.boxes import count_pixels
from model.resize_blocks import LOGIT_SLACK, BlockGrid, pad_edges, pool2x2, use_blocks

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
    binary = torch.zeros((n, *out_size), dtype=torch.bool, device=device)
    areas = torch.zeros(n, dtype=torch.int32, device=device)
    prob_sums = torch.zeros(n, dtype=torch.float64, device=device)
    if use_blocks(region_size, out_size, device):
        grid = BlockGrid.of(region_size, out_size, device)
        row_start, col_start = grid.row_count.cumsum(0) - grid.row_count, grid.col_count.cumsum(0) - grid.col_count
        for part in parts:
            padded = pad_edges(region_fn(part))
            slack = padded.abs().amax((1, 2), keepdim=True).add_(1).mul_(LOGIT_SLACK)
            # [n, h, w]: blocks whose output pixels can have a logit above 0
            reach = pool2x2(padded, torch.maximum).add_(slack) >= 0
            rows, cols = reach.any(2), reach.any(1)  # block rows and columns where the mask can be
            for i, (in_rows, in_cols) in enumerate(zip(rows, cols)):
                ys = _span(in_rows, row_start, grid.row_count)
                xs = _span(in_cols, col_start, grid.col_count)
                if ys is None or xs is None:
                    continue  # no output pixel can be in the mask
                logits = grid.resize_window(padded[i : i + 1], ys, xs)[0]
                inside = logits > 0
                binary[part.start + i, ys, xs] = inside
                areas[part.start + i] = count_pixels(inside[None])[0]
                prob_sums[part.start + i] = _sum_above_half(logits[None])[0]
    else:
        for part in parts:
            logits = region_fn(part)
            if tuple(logits.shape[-2:]) != tuple(out_size):
                logits = F.interpolate(logits[None], size=out_size, mode="bilinear", align_corners=False)[0]
            inside = torch.gt(logits, 0, out=binary[part])
            areas[part] = count_pixels(inside)
            prob_sums[part] = _sum_above_half(logits)
    return binary, areas, prob_sums + 0.5 * areas


def _sum_above_half(logits: Tensor) -> Tensor:
    """Per [n, H, W] mask, the sum of sigmoid - 0.5 over its pixels with logit > 0, in place.

    sigmoid(max(x, 0)) - 0.5 is sigmoid(x) - 0.5 inside (exactly: both lie within a factor 2 of 0.5) and
    exactly 0 outside, so no mask-sized select is needed; the 0.5 per pixel inside is added by the caller.
    Summed along rows first: a float32 sum over whole masks rounds differently depending on how many masks
    are reduced at once, which would make the scores depend on the parts."""
    return logits.clamp_min_(0).sigmoid_().sub_(0.5).sum(2).sum(1, dtype=torch.float64)


def _span(touched: Tensor, start: Tensor, count: Tensor) -> slice | None:
    """The output lines read from the first through the last touched block line, or None if none."""
    lines = touched.nonzero().flatten()
    if len(lines) == 0:
        return None
    first, last = int(lines[0]), int(lines[-1])
    begin, end = int(start[first]), int(start[last] + count[last])
    return slice(begin, end) if end > begin else None
