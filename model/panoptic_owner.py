"""Which kept query owns each pixel of a panoptic result, by the official rule, computing full-resolution
values only where the answer can depend on them.

The official rule: each query's mask logits are resized to the input size, cropped to the image's region
(the "region" logits here) and resized bilinearly to the original size; pixel p goes to the query with the
largest score * sigmoid(logit) (the first on ties), and a query's own area counts the pixels where its
sigmoid is >= 0.5.

An upload larger than the model's input makes that second resize the costly part: every kept query's mask
at full resolution, several times over. On a CPU (model/resize_blocks.py says when) it goes by blocks: a
bilinear resize writes each output pixel as a convex
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
from torch import Tensor

from model.boxes import Box, boxes_from_map, count_pixels
from model.resize_blocks import BlockGrid, pad_edges, pixel_chunks, pool2x2, resize, rounding_margin, use_blocks

# A margin for float32 rounding of the sigmoid and the product, relative to the weighted probability (the
# resize's is resize_blocks.rounding_margin).
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
    """`owner` is per [h, w] block of the region, valid where `settled`; the other blocks' pixels were
    resized exactly. Areas and boxes come from the blocks and those pixels, not from a pass over the output."""

    grid: BlockGrid
    settled: Tensor  # [h, w] blocks whose output pixels (at least one) all have the block's owner
    exact_at: Tensor  # flat output indices resized exactly
    exact_owner: Tensor

    def segments(self, table: Tensor, count: int) -> tuple[Tensor, list[int], list[Box]]:
        return self.grid.label_map(table[self.owner], self.settled, self.exact_at, table[self.exact_owner], count)


def ownership(
    region_fn: RegionFn, parts: list[slice], scores: Tensor, region_size: tuple[int, int], out_size: tuple[int, int]
) -> Ownership:
    """The owners of an [H, W] = out_size result from [h, w] = region_size region logits; `parts` cover the
    kept queries (whose scores are `scores`), resized a part at a time."""
    if use_blocks(region_size, out_size, scores.device):
        return _blockwise(region_fn, parts, scores, out_size)
    return _direct(region_fn, parts, scores, out_size)


def _direct(region_fn: RegionFn, parts: list[slice], scores: Tensor, out_size: tuple[int, int]) -> Ownership:
    own_areas, best, owner = [], None, None  # owner: [H, W] index of the best weighted mask
    for part in parts:
        probs = resize(region_fn(part), out_size).sigmoid_()
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
        x = pad_edges(region_fn(part))
        regions.append(x)
        slack = rounding_margin(x)
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

    grid = BlockGrid.of((unsure.shape[0], unsure.shape[1]), out_size, unsure.device)
    pixels = grid.pixels()
    settled = ~unsure & (pixels > 0)
    weight = torch.where(settled, pixels, 0).double()  # output pixels each block settles
    n = len(scores)
    owned = torch.zeros(n, dtype=torch.float64, device=unsure.device)
    owned.index_add_(0, low_owner.flatten(), weight.flatten())
    own_area = torch.cat([(inside * weight).sum((1, 2)) for inside in sure_in])

    exact_at = grid.pixels_of(unsure)
    exact_owner = torch.empty_like(exact_at)
    for chunk in pixel_chunks(len(exact_at)):
        at = exact_at[chunk]
        best = owner = None
        for part, region in zip(parts, regions):
            probs = grid.resize_at(region, at).sigmoid_()
            own_area[part] += (probs >= 0.5).sum(1)
            value, index = probs.mul_(scores[part, None]).max(0)
            best, owner = _later_wins(best, owner, value, index + part.start)
        assert owner is not None
        exact_owner[chunk] = owner
    owned += torch.bincount(exact_owner, minlength=n)
    return BlockOwnership(
        owned.long().tolist(), own_area.long().tolist(), low_owner, grid, settled, exact_at, exact_owner
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
