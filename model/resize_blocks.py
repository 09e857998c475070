"""The 2x2 blocks a bilinear resize reads (align_corners=False, as the official code resizes).

Each output pixel of such a resize is a convex combination of one 2x2 block of its source, clamped at the
bottom and right edges (padding the source with one replicated row and column reproduces that). So a
bound or a winner that holds at a block's four corners holds at all of its output pixels. The blockwise
paths of model/panoptic_owner.py and model/semantic_map.py decide what they can per block and resize only
the other blocks' pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from model.boxes import Box, boxes_from_bounds, pixels_per_line

# Output pixels per source pixel from which the blockwise paths are used: below it, resizing the few maps
# involved to a size near the source's costs less than the per-block work.
BLOCKWISE_FROM = 3.0
PIXEL_CHUNK = 1 << 16  # output pixels resized at a time on the exact path
# A resized value can exceed its block's corners by float32 rounding (the weights sum to 1 only to within a
# few ulps): a margin relative to the map's largest magnitude, with room to spare.
RESIZE_SLACK = 1e-5


def use_blocks(source_size: tuple[int, int], out_size: tuple[int, int], device: torch.device) -> bool:
    """Whether to resize by blocks: on a CPU, from BLOCKWISE_FROM times the source's pixels. A GPU runs the
    full-size resize as a few kernels where the blocks take dozens of small ones, and no GPU has measured
    them, so it keeps the direct path."""
    return device.type == "cpu" and out_size[0] * out_size[1] >= BLOCKWISE_FROM * source_size[0] * source_size[1]


def rounding_margin(x: Tensor) -> Tensor:
    """[..., h, w] maps -> [..., 1, 1]: how far rounding can take a resized value past its block's corners."""
    return x.abs().amax((-2, -1), keepdim=True).add_(1).mul_(RESIZE_SLACK)


def resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """[C, h, w] -> [C, *size], bilinearly as the official code resizes (x itself at its own size).

    torch's CPU kernel resizes exactly 3 channels on 1 thread with its channels-last kernel, which rounds
    differently from the one it takes for any other count (and that BlockGrid.resize_at reproduces): such
    maps are resized in two calls, so results do not depend on the thread count."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if len(x) == 3 and x.device.type == "cpu" and torch.get_num_threads() == 1:
        return torch.cat([resize(x[:2], size), resize(x[2:], size)])
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]


def pixel_chunks(n: int) -> list[slice]:
    """Slices of n exact pixels, PIXEL_CHUNK at a time."""
    return [slice(start, min(start + PIXEL_CHUNK, n)) for start in range(0, n, PIXEL_CHUNK)]


def pad_edges(x: Tensor) -> Tensor:
    """[C, h, w] -> [C, h+1, w+1], the last row and column repeated: block (i, j) is rows i..i+1, columns
    j..j+1 of the result."""
    return F.pad(x[None], (0, 1, 0, 1), mode="replicate")[0]


def pool2x2(x: Tensor, op) -> Tensor:
    """op over each 2x2 window of the last two dims, stride 1 (max_pool2d is many times slower on a CPU)."""
    rows = op(x[..., :-1, :], x[..., 1:, :])
    return op(rows[..., :-1], rows[..., 1:])


def _source_index(size_in: int, size_out: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per output index, the first source index it reads and the weight of the one after, as torch's CPU
    kernel computes them: scale * (i + 0.5) - 0.5 in float32 with one rounding (a fused multiply-add; the
    float64 product of two float32 numbers is exact)."""
    scale = float(torch.tensor(size_in / size_out, dtype=torch.float32))
    index = torch.arange(size_out, device=device, dtype=torch.float64)
    src = ((index + 0.5) * scale - 0.5).float().clamp_min_(0)
    first = src.long().clamp_max_(size_in - 1)
    return first, (src - first).clamp_(0, 1)


@dataclass
class BlockGrid:
    """Which block of an [h, w] source each pixel of an [H, W] output reads, and with what weights."""

    rows: Tensor  # [H] each output row's block row
    cols: Tensor  # [W] each output column's block column
    row_weight: Tensor  # [H] the weight of the block's second row
    col_weight: Tensor  # [W] the weight of the block's second column
    row_count: Tensor  # [h] output rows per block row (0 where the resize shrinks)
    col_count: Tensor  # [w]

    @classmethod
    def of(cls, source_size: tuple[int, int], out_size: tuple[int, int], device: torch.device) -> BlockGrid:
        rows, row_weight = _source_index(source_size[0], out_size[0], device)
        cols, col_weight = _source_index(source_size[1], out_size[1], device)
        row_count = torch.bincount(rows, minlength=source_size[0])
        col_count = torch.bincount(cols, minlength=source_size[1])
        return cls(rows, cols, row_weight, col_weight, row_count, col_count)

    @property
    def row_start(self) -> Tensor:
        """[h] the first output row reading each block row (where it has any)."""
        return self.row_count.cumsum(0) - self.row_count

    @property
    def col_start(self) -> Tensor:
        return self.col_count.cumsum(0) - self.col_count

    def pixels(self) -> Tensor:
        """[h, w] output pixels of each block."""
        return torch.outer(self.row_count, self.col_count)

    def expand(self, per_block: Tensor) -> Tensor:
        """[h, w] -> [H, W]: each output pixel gets its block's value."""
        # columns first, on the small map: the row gather that follows copies whole rows
        return per_block.index_select(1, self.cols).index_select(0, self.rows)

    def pixels_of(self, blocks: Tensor) -> Tensor:
        """Flat output indices of the pixels of the chosen [h, w] blocks, without a pass over the output.

        A block's pixels are a rectangle: the output rows reading its row, by the output columns reading its
        column (both runs, since the source index grows with the output index)."""
        row_start, col_start = self.row_start, self.col_start
        by, bx = blocks.nonzero().unbind(1)
        height, width = self.row_count[by], self.col_count[bx]
        sizes = height * width
        block = torch.repeat_interleave(torch.arange(len(by), device=blocks.device), sizes)
        offset = torch.arange(len(block), device=blocks.device) - (sizes.cumsum(0) - sizes)[block]
        y = row_start[by][block] + offset // width[block]
        x = col_start[bx][block] + offset % width[block]
        return y * len(self.cols) + x

    def resize_at(self, padded: Tensor, at: Tensor) -> Tensor:
        """[C, h+1, w+1] padded source -> [C, P] its resized values at the flat output indices `at`.

        Weighed as torch's CPU kernel weighs them: along the row, then across rows, each step a fused
        multiply-add onto the second term's product (addcmul is one on CPUs with FMA). On a CPU they equal
        resize()'s where each axis grows (tests check, on 1 and 2 threads), and elsewhere may differ in the
        last bit, which can only matter where two values tie to rounding."""
        y, x = at // len(self.cols), at % len(self.cols)
        stride = padded.shape[-1]
        # index_select: several times faster than indexing with a tensor on a CPU
        corner = self.rows.index_select(0, y) * stride + self.cols.index_select(0, x)  # blocks' top-left
        wy, wx = self.row_weight.index_select(0, y), self.col_weight.index_select(0, x)
        flat = padded.reshape(len(padded), -1)

        def at_offset(offset: int) -> Tensor:
            return flat.index_select(1, corner + offset)

        top = torch.addcmul(at_offset(1) * wx, at_offset(0), 1 - wx)
        bottom = torch.addcmul(at_offset(stride + 1) * wx, at_offset(stride), 1 - wx)
        return torch.addcmul(bottom * wy, top, 1 - wy)

    def resize_window(self, padded: Tensor, rows: slice, cols: slice) -> Tensor:
        """[C, h+1, w+1] padded source -> [C, Y, X], the resize's output in that window of output rows and
        columns, weighed as resize_at weighs: along the row for the source rows the window reads, then
        across them."""
        r, wy = self.rows[rows], self.row_weight[rows, None]
        c, wx = self.cols[cols], self.col_weight[cols]
        first = int(r[0])
        src = padded[:, first : int(r[-1]) + 2]
        along = torch.addcmul(src.index_select(2, c + 1) * wx, src.index_select(2, c), 1 - wx)
        r = r - first
        return torch.addcmul(along.index_select(1, r + 1) * wy, along.index_select(1, r), 1 - wy)

    def row_bounds(self, touched: Tensor) -> tuple[Tensor, Tensor]:
        """Per row of [N, h] booleans (block rows touched): the first and last output row reading them."""
        return _line_bounds(touched, self.row_start, self.row_count)

    def col_bounds(self, touched: Tensor) -> tuple[Tensor, Tensor]:
        return _line_bounds(touched, self.col_start, self.col_count)

    def label_map(
        self, block_ids: Tensor, settled: Tensor, exact_at: Tensor, exact_ids: Tensor, count: int
    ) -> tuple[Tensor, list[int], list[Box]]:
        """The [H, W] int32 map of ids 0..count (0: none): each settled block's id over its pixels and
        `exact_ids` at `exact_at`, which cover the other blocks' pixels; with the areas and COCO boxes of
        ids 1..count, taken from the blocks and those pixels rather than from a pass over the map."""
        block_ids, exact_ids = block_ids.to(torch.int32), exact_ids.long()
        out = self.expand(block_ids)
        out.view(-1)[exact_at] = exact_ids.to(torch.int32)
        n = count + 1
        pixels = self.pixels()
        settled = settled & (pixels > 0)  # a block the resize skips (it shrinks there) has no extent
        ids = torch.where(settled, block_ids, 0)
        areas = torch.bincount(exact_ids, minlength=n)
        areas.index_add_(0, ids.flatten().long(), torch.where(settled, pixels, 0).flatten())
        ys = _with_none(*self.row_bounds(pixels_per_line(ids, n, 0) > 0), len(self.rows))
        xs = _with_none(*self.col_bounds(pixels_per_line(ids, n, 1) > 0), len(self.cols))
        for (low, high), at in zip((ys, xs), (exact_at // len(self.cols), exact_at % len(self.cols))):
            low.scatter_reduce_(0, exact_ids, at, "amin")
            high.scatter_reduce_(0, exact_ids, at, "amax")
        (y0, y1), (x0, x1) = ys, xs
        return out, areas[1:].tolist(), boxes_from_bounds(x0[1:], y0[1:], x1[1:], y1[1:], y1[1:] >= 0)


def _with_none(low: Tensor, high: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """The bounds with id 0's (none: (size, -1)) in front, for scattering by id."""
    return torch.cat([low.new_full((1,), size), low]), torch.cat([high.new_full((1,), -1), high])


def _line_bounds(touched: Tensor, start: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of [N, b] booleans saying which block lines something touches: the first and last output
    line those block lines are read by; (output lines, -1) where it touches none or they are read by none."""
    size = int(count.sum())
    touched = touched.view(torch.uint8)
    first = start[touched.argmax(1)]
    last_block = touched.shape[1] - 1 - touched.flip(1).argmax(1)
    last = start[last_block] + count[last_block] - 1
    hit = (touched.amax(1) > 0) & (last >= first)
    return torch.where(hit, first, size), torch.where(hit, last, -1)
