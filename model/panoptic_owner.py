"""Which kept query owns each pixel of a panoptic result, by the official rule, computing full-resolution
values only where the answer can depend on them.

The official rule: each query's mask logits are resized to the input size, cropped to the image's region
(the "region" logits here) and resized bilinearly to the original size; pixel p goes to the query with the
largest score * sigmoid(logit) (the first on ties), and a query's own area counts the pixels where its
sigmoid is >= 0.5.

An upload larger than the model's input makes that second resize the costly part: every kept query's mask
at full resolution, several times over. But a bilinear resize writes each output pixel as a convex
combination of one 2x2 block of region logits, so there a query's logit lies between the block's smallest
and largest, and the sigmoid and a positive score keep that order. Where one query's lowest weighted
probability beats every other query's highest, it owns all of the block's output pixels; where a mask's
block lies wholly above or below 0, so does its own area there. Only the other blocks' pixels are resized
exactly (their four region logits, weighted as the resize weighs them). Areas and boxes then come from the
blocks' pixel counts and those pixels, and the output is written once, as the segment map.
Tests compare both paths on the shipped model's outputs, on scenes and on random logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from model.boxes import Box, boxes_from_bounds, boxes_from_map, count_pixels, pixels_per_line
from model.semantic_map import pool2x2

# Output pixels per region pixel from which the blocks are used: below it, resizing the few kept masks to
# a size near the region's costs less than the per-block bounds.
BLOCKWISE_FROM = 3.0
PIXEL_CHUNK = 1 << 16  # exact pixels computed at a time: kept queries x 4 floats each
# Margins for float32 rounding: of the resize (its weights sum to 1 only to within a few ulps), relative to
# the query's largest logit, and of the sigmoid and the product, relative to the weighted probability.
LOGIT_SLACK = 1e-5
PROB_RATIO = 1 + 1e-6

RegionFn = Callable[[slice], Tensor]  # a slice of the kept queries -> their [n, h, w] region logits


@dataclass
class Ownership:
    """Per kept query, the pixels it owns and the pixels of its own mask; and the owner of every pixel."""

    owned: list[int]
    own_area: list[int]
    owner: Tensor  # [H, W] kept-query index

    def segments(self, table: Tensor, count: int) -> tuple[Tensor, list[int], list[Box]]:
        """The [H, W] int32 map of segment ids (table[i]: kept query i's, 0 for none), and the areas and
        boxes of segments 1..count."""
        segment_map = table[self.owner]
        return (segment_map, *boxes_from_map(segment_map, count))


@dataclass
class BlockOwnership(Ownership):
    """`owner` is per [h, w] block of the region, valid where `settled`; the other pixels were computed
    exactly. Areas and boxes come from the blocks and those pixels, not from a pass over the output."""

    settled: Tensor  # [h, w] blocks whose output pixels (at least one) all have the block's owner
    rows: Tensor  # [H] each output row's block row
    cols: Tensor  # [W] each output column's block column
    exact_at: Tensor  # flat output indices computed exactly
    exact_owner: Tensor

    def segments(self, table: Tensor, count: int) -> tuple[Tensor, list[int], list[Box]]:
        block_ids, exact_ids = table[self.owner], table[self.exact_owner].long()
        # columns first, on the small map: the row gather that follows copies whole rows
        segment_map = block_ids.index_select(1, self.cols).index_select(0, self.rows)
        segment_map.view(-1)[self.exact_at] = exact_ids.int()
        n = count + 1  # index 0: no segment
        owned = torch.tensor(self.owned, device=table.device)
        areas = torch.zeros(n, dtype=torch.long, device=table.device).index_add_(0, table.long(), owned)
        # bounds per segment: the settled blocks' output rectangles, then the exact pixels
        ids = torch.where(self.settled, block_ids, 0)
        ys = _bounds(pixels_per_line(ids, n, 0), self.rows)
        xs = _bounds(pixels_per_line(ids, n, 1), self.cols)
        width = len(self.cols)
        for (low, high), at in zip((ys, xs), (self.exact_at // width, self.exact_at % width)):
            low.scatter_reduce_(0, exact_ids, at, "amin")
            high.scatter_reduce_(0, exact_ids, at, "amax")
        (y0, y1), (x0, x1) = ys, xs
        return segment_map, areas[1:].tolist(), boxes_from_bounds(x0[1:], y0[1:], x1[1:], y1[1:], y1[1:] >= 0)


def _bounds(per_block: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Per segment (0 first), the first and last output line of the block lines it has pixels in, from
    [n - 1, b] pixel counts per block line; len(index) and -1 where none. index: each output line's block."""
    count = torch.bincount(index, minlength=per_block.shape[1])
    start = count.cumsum(0) - count
    touched = (per_block > 0).view(torch.uint8)
    first = start[touched.argmax(1)]
    last_block = per_block.shape[1] - 1 - touched.flip(1).argmax(1)
    last = start[last_block] + count[last_block] - 1
    hit = touched.amax(1) > 0
    low = torch.where(hit, first, len(index))
    high = torch.where(hit, last, -1)
    return torch.cat([low.new_full((1,), len(index)), low]), torch.cat([high.new_full((1,), -1), high])


def ownership(
    region_fn: RegionFn, parts: list[slice], scores: Tensor, region_size: tuple[int, int], out_size: tuple[int, int]
) -> Ownership:
    """The owners of an [H, W] = out_size result from [h, w] = region_size region logits; `parts` cover the
    kept queries (whose scores are `scores`), resized a part at a time."""
    if out_size[0] * out_size[1] >= BLOCKWISE_FROM * region_size[0] * region_size[1]:
        return _blockwise(region_fn, parts, scores, out_size)
    return _direct(region_fn, parts, scores, out_size)


def _direct(region_fn: RegionFn, parts: list[slice], scores: Tensor, out_size: tuple[int, int]) -> Ownership:
    own_areas, best, owner = [], None, None  # owner: [H, W] index of the best weighted mask
    for part in parts:
        x = region_fn(part)
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x[None], size=out_size, mode="bilinear", align_corners=False)[0]
        probs = x.sigmoid_()
        own_areas.append(count_pixels(probs >= 0.5))
        # max(0).indices: the same first-maximum rule as argmax(0), several times faster on a CPU
        value, index = probs.mul_(scores[part, None, None]).max(0)
        best, owner = _later_wins(best, owner, value, index + part.start)
    assert owner is not None
    owned = torch.bincount(owner.flatten(), minlength=len(scores))
    return Ownership(owned.tolist(), torch.cat(own_areas).tolist(), owner)


def _blockwise(region_fn: RegionFn, parts: list[slice], scores: Tensor, out_size: tuple[int, int]) -> Ownership:
    regions, sure_in, high_probs = [], [], []
    low_best = low_owner = crossing = None
    for part in parts:
        x = F.pad(region_fn(part)[None], (0, 1, 0, 1), mode="replicate")[0]  # the resize clamps at the edge
        regions.append(x)
        slack = x.abs().amax((1, 2), keepdim=True).add_(1).mul_(LOGIT_SLACK)
        low = pool2x2(x, torch.minimum).sub_(slack)  # [n, h, w] per block
        high = pool2x2(x, torch.maximum).add_(slack)
        sure_in.append(low > 0)
        crosses = (low * high).amin(0) <= 0  # some mask's own area may have an edge in the block
        crossing = crosses if crossing is None else crossing | crosses
        s = scores[part, None, None]
        low = low.sigmoid_().mul_(s)
        peak = low.amax(0)
        # a query reaching the peak (max(0)'s indices cost several times more); where several do, the
        # block cannot be settled below, so which one does not matter
        index = (low == peak).to(low.dtype).mul_(_arange_like(low)).amax(0).long()
        low_best, low_owner = _later_wins(low_best, low_owner, peak, index + part.start)
        high_probs.append(high.sigmoid_().mul_(s))
    assert low_best is not None and low_owner is not None and crossing is not None
    # settled where the owner is the only query whose highest weighted probability reaches its lowest
    reach = low_best / PROB_RATIO
    rivals = sum((high >= reach).view(torch.uint8).sum(0, dtype=torch.int32) for high in high_probs)
    unsure = crossing | (rivals != 1)

    h, w = unsure.shape
    rows, row_weight = _source_index(h, out_size[0], unsure.device)
    cols, col_weight = _source_index(w, out_size[1], unsure.device)
    pixels = torch.outer(torch.bincount(rows, minlength=h), torch.bincount(cols, minlength=w))
    settled = ~unsure & (pixels > 0)
    weight = torch.where(settled, pixels, 0).double()  # output pixels each block settles
    n = len(scores)
    owned = torch.zeros(n, dtype=torch.float64, device=unsure.device)
    owned.index_add_(0, low_owner.flatten(), weight.flatten())
    own_area = torch.cat([(inside * weight).sum((1, 2)) for inside in sure_in])

    exact_at = _pixels_of(unsure, rows, cols, out_size[1])
    exact_owner = torch.empty_like(exact_at)
    for start in range(0, len(exact_at), PIXEL_CHUNK):
        at = exact_at[start : start + PIXEL_CHUNK]
        y, x = at // out_size[1], at % out_size[1]
        corner = rows[y] * (w + 1) + cols[x]  # top-left of each pixel's block in the padded region
        wy, wx = row_weight[y], col_weight[x]
        best = owner = None
        for part, region in zip(parts, regions):
            flat = region.view(len(region), -1)
            # the resize's own order: along the row, then across rows
            top = flat[:, corner] * (1 - wx) + flat[:, corner + 1] * wx
            bottom = flat[:, corner + w + 1] * (1 - wx) + flat[:, corner + w + 2] * wx
            probs = (top * (1 - wy) + bottom * wy).sigmoid_()
            own_area[part] += (probs >= 0.5).sum(1)
            value, index = probs.mul_(scores[part, None]).max(0)
            best, owner = _later_wins(best, owner, value, index + part.start)
        assert owner is not None
        exact_owner[start : start + len(at)] = owner
    owned += torch.bincount(exact_owner, minlength=n)
    return BlockOwnership(
        owned.long().tolist(), own_area.long().tolist(), low_owner, settled, rows, cols, exact_at, exact_owner
    )


def _arange_like(x: Tensor) -> Tensor:
    return torch.arange(len(x), dtype=x.dtype, device=x.device)[:, None, None]


def _later_wins(best: Tensor | None, owner: Tensor | None, value: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Fold a later part's best into the running best: strictly greater wins, so on a tie the earlier query
    keeps the pixel, as argmax over all queries would."""
    if best is None or owner is None:
        return value, index
    later = value > best
    return torch.where(later, value, best), torch.where(later, index, owner)


def _pixels_of(blocks: Tensor, rows: Tensor, cols: Tensor, width: int) -> Tensor:
    """Flat output indices of the pixels of the chosen [h, w] blocks, without a pass over the whole output.

    Each block's pixels are a rectangle: the output rows whose block row is its row, by the columns whose
    block column is its column (both runs, since the source index grows with the output index)."""
    h, w = blocks.shape
    row_count, col_count = torch.bincount(rows, minlength=h), torch.bincount(cols, minlength=w)
    row_start, col_start = row_count.cumsum(0) - row_count, col_count.cumsum(0) - col_count
    by, bx = blocks.nonzero().unbind(1)
    height, width_of = row_count[by], col_count[bx]
    sizes = height * width_of
    block = torch.repeat_interleave(torch.arange(len(by), device=blocks.device), sizes)
    offset = torch.arange(len(block), device=blocks.device) - (sizes.cumsum(0) - sizes)[block]
    y = row_start[by][block] + offset // width_of[block]
    x = col_start[bx][block] + offset % width_of[block]
    return y * width + x


def _source_index(size_in: int, size_out: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per output index of a bilinear resize (align_corners=False), the first source index it reads and the
    weight of the one after, computed in float32 as the resize computes them."""
    scale = torch.tensor(size_in / size_out, dtype=torch.float32, device=device)
    src = ((torch.arange(size_out, device=device, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_min_(0)
    first = src.long().clamp_max_(size_in - 1)
    return first, (src - first).clamp_(0, 1)
