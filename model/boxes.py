"""Areas and COCO boxes of masks and of label maps, computed without pycocotools (tests check they agree)."""

from __future__ import annotations

import torch
from torch import Tensor

Box = tuple[float, float, float, float]


def count_pixels(masks: Tensor) -> Tensor:
    """Pixels set in each of [N, H, W] boolean masks.

    The bytes are summed along rows into int16 where a row fits in one (several times faster on a CPU than
    any wider sum; a bool sum converts to int64 first), then the rows into int32."""
    narrow = torch.int16 if masks.shape[2] < 2**15 else torch.int32
    return masks.view(torch.uint8).sum(2, dtype=narrow).sum(1, dtype=torch.int32)


def boxes_from_bounds(x0: Tensor, y0: Tensor, x1: Tensor, y1: Tensor, nonempty: Tensor) -> list[Box]:
    """COCO [x, y, w, h] boxes from inclusive pixel bounds; zeros where `nonempty` is False."""
    boxes = [(a, b, c - a + 1, d - b + 1) for a, b, c, d in torch.stack([x0, y0, x1, y1], 1).float().tolist()]
    return [box if full else (0.0, 0.0, 0.0, 0.0) for box, full in zip(boxes, nonempty.tolist())]


def boxes_from_map(segment_map: Tensor, num_segments: int) -> tuple[list[int], list[Box]]:
    """Areas and COCO boxes of segments 1..num_segments of a label map (zeros for an absent segment).

    Two histograms, of (row, id) and (column, id) pairs, hold every segment's row and column extents; on a
    CPU they cost several times less than min/max scatters over the pixels.
    """
    n = num_segments + 1
    ids = segment_map.to(torch.int32)
    per_row, per_col = pixels_per_line(ids, n, 0), pixels_per_line(ids, n, 1)  # [S, H], [S, W]
    return per_row.sum(1).tolist(), boxes_from_extents(per_row > 0, per_col > 0)


def pixels_per_line(ids: Tensor, n: int, dim: int) -> Tensor:
    """[n - 1, L] pixels of segments 1..n-1 in each row (dim 0) or column (dim 1) of an [H, W] int32 map.

    The line's offset is added in the map's own layout, so columns need no transposed copy."""
    length = ids.shape[dim]
    lines = torch.arange(length, dtype=torch.int32, device=ids.device) * n
    offsets = lines[:, None] if dim == 0 else lines[None, :]
    counts = torch.bincount((ids + offsets).flatten(), minlength=length * n)
    return counts.view(length, n)[:, 1:].t()


def boxes_from_extents(in_rows: Tensor, in_cols: Tensor) -> list[Box]:
    """COCO boxes from [N, H] and [N, W] booleans saying which rows and columns each mask touches."""
    rows, cols = in_rows.view(torch.uint8), in_cols.view(torch.uint8)
    h, w = rows.shape[1], cols.shape[1]
    y0 = rows.argmax(1)
    y1 = h - 1 - rows.flip(1).argmax(1)
    x0 = cols.argmax(1)
    x1 = w - 1 - cols.flip(1).argmax(1)
    return boxes_from_bounds(x0, y0, x1, y1, rows.amax(1) > 0)


def boxes_from_masks(masks: Tensor) -> list[Box]:
    """COCO boxes of [N, H, W] boolean masks (zeros for an empty mask)."""
    if masks.shape[0] == 0:
        return []
    # amax over uint8: several times faster on a CPU than any() over bool
    as_bytes = masks.view(torch.uint8)
    return boxes_from_extents(as_bytes.amax(2).view(torch.bool), as_bytes.amax(1).view(torch.bool))
