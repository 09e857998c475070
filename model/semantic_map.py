"""The semantic map in the official order, computing the full-resolution sums only where they can matter.

The official order (MaskFormer's semantic_inference, SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE off) resizes
all Q mask logits 4x to the padded input size, applies the sigmoid, sums p_q(c) * sigmoid(m_q) over queries
for every class, crops the image's region and resizes those class scores to the original size:
Q x H x W sigmoids and K x Q x H x W multiply-adds. transformers sums at stride 4 and resizes the class
scores instead (the "cheap" order); that disagrees with the official order near boundaries because the
sigmoid does not commute with resizing.

Here the cheap order does most of the work and the official order runs only where the cheap one could be
wrong:
1. Candidates: the classes in the top CANDIDATE_RANK (3) of some stride-4 pixel. The rest are dropped. This
   step is a heuristic, not a proof: resizing before the sigmoid can lift a class past others where mask
   logits jump between stride-4 points. (Step 2's bound, applied to every class, could not drop a class
   where all classes nearly tie, as on an untrained model, and would leave the official order's cost.)
   Against the all-class official order it is equal on every pixel of the shipped model and of the
   random-init R50 (tests, benchmarks/postprocess_vs_transformers.py). On the 150 random inputs of
   tests/test_postprocess.py, with logit jumps of up to 40 (far sharper than a trained model's), it kept
   99.92 % of pixels on average and 97.7 % at worst (`pytest -s -k exact_wherever` prints them). Steps 2-5
   are exact for the candidates: every pixel whose official winner is one gets it (tested).
2. Proof per 4x4 output cell (the pixels between four stride-4 logits): the 4x resize writes each pixel as a
   convex combination of the cell's corners, and the sigmoid of a convex combination is within
   sup|sigmoid''| / 8 * range^2 (Jensen) and within the sigmoid's range of the corners' combination. That
   bounds, per pair of classes, how far the official difference of class scores can be from the cheap one.
   Where the cell's cheap winner beats every candidate by more than the bound at all four corners, the
   official winner is the same on all its 16 pixels.
3. Unproven cells (under 20 % of the shipped model's, tested) get their exact official sums.
4. The second resize, to the original size, mixes 2x2 neighbouring pixels. Where a pixel's neighbourhood
   has one winner the mix keeps it; where winners differ, the official order's tie-break depends on exact
   values, so those pixels' cells are computed exactly first.
5. Where the original size is many times the region's, the second resize goes by 2x2 blocks of the region
   (model/resize_blocks.py): a block whose corners share a winner keeps it on all of its pixels, so only the
   winner's sums and the totals are resized there, for the scores.
Where a cell is proven, its scores (for the reported confidence) are the cheap order's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from model.boxes import Box, boxes_from_map
from model.resize_blocks import BlockGrid, pad_edges, pixel_chunks, pool2x2, resize, rounding_margin, use_blocks

JENSEN = 1 / (48 * math.sqrt(3))  # sup|sigmoid''| / 8
CANDIDATE_RANK = 3  # step 1's heuristic (measured in the docstring)
CELL_CHUNK = 2048  # cells computed exactly at a time: Q x 16 floats each
# Bilinear weights of a 4x4 cell's pixels on its corners (top-left, top-right, bottom-left, bottom-right):
# pixel phase p along an axis sits at 1/8 + p/4 between the two corners (align_corners=False, scale 4).
_FRACTION = torch.tensor([0.125, 0.375, 0.625, 0.875])
_AXIS = torch.stack([1 - _FRACTION, _FRACTION])  # [corner 0/1, phase]
PHASE_WEIGHTS = torch.einsum("ay,bx->abyx", _AXIS, _AXIS).reshape(4, 16)


@dataclass
class SemanticMap:
    """Each output pixel's class and score (its class's sum over the sum for all classes)."""

    labels: Tensor  # [H, W] class ids
    scores: Tensor  # [H, W]

    def label_map(self) -> Tensor:
        return self.labels

    def class_totals(self, num_classes: int) -> tuple[Tensor, Tensor]:
        """Per class: its pixels and the sum of their scores (in float64: millions of float32 terms)."""
        flat = self.labels.flatten()
        pixels = torch.bincount(flat, minlength=num_classes)
        sums = torch.zeros(num_classes, dtype=torch.float64, device=flat.device)
        return pixels, sums.scatter_add_(0, flat, self.scores.flatten().double())

    def segments(self, lut: Tensor, count: int) -> tuple[Tensor, list[int], list[Box]]:
        """The [H, W] int32 map of segment ids lut[class] (0: none), and the areas and boxes of 1..count."""
        segment_map = lut[self.labels]
        return (segment_map, *boxes_from_map(segment_map, count))


@dataclass
class BlockSemanticMap(SemanticMap):
    """Blockwise: `labels` is per [h, w] block of the region, valid where `settled`; the other blocks' pixels
    have `exact_labels` at `exact_at`. Totals, areas and boxes come from the blocks and those pixels."""

    grid: BlockGrid
    settled: Tensor
    exact_at: Tensor
    exact_labels: Tensor

    def label_map(self) -> Tensor:
        out = self.grid.expand(self.labels)
        out.view(-1)[self.exact_at] = self.exact_labels
        return out

    def class_totals(self, num_classes: int) -> tuple[Tensor, Tensor]:
        keep = self.settled.flatten()
        labels = self.labels.flatten()[keep]
        pixels = torch.bincount(self.exact_labels, minlength=num_classes)
        pixels.index_add_(0, labels, self.grid.pixels().flatten()[keep])
        # each block's score sum: the output rows summed into their block rows, then the columns
        rows = self.scores.new_zeros(len(self.grid.row_count), self.scores.shape[1])
        block_sums = rows.index_add_(0, self.grid.rows, self.scores)
        block_sums = block_sums.new_zeros(self.labels.shape).index_add_(1, self.grid.cols, block_sums)
        sums = torch.zeros(num_classes, dtype=torch.float64, device=labels.device)
        sums.index_add_(0, labels, block_sums.flatten()[keep].double())
        sums.index_add_(0, self.exact_labels, self.scores.view(-1)[self.exact_at].double())
        return pixels, sums

    def segments(self, lut: Tensor, count: int) -> tuple[Tensor, list[int], list[Box]]:
        return self.grid.label_map(lut[self.labels], self.settled, self.exact_at, lut[self.exact_labels], count)


def semantic_map(
    logits: Tensor,
    masks: Tensor,
    input_size: tuple[int, int],
    image_size: tuple[int, int],
    orig_size: tuple[int, int],
) -> SemanticMap:
    """[Q, K+1] class logits and [Q, h, w] stride-4 mask logits -> each output pixel's class and score.

    A pixel's score is its class's sum over the sum for all classes (its normalised class probability).
    """
    h, w = masks.shape[-2:]
    if tuple(input_size) != (4 * h, 4 * w):
        raise ValueError(f"input size {input_size} is not 4x the mask size {(h, w)}")
    probs = logits.softmax(-1)[:, :-1]  # [Q, K]
    sig = masks.sigmoid()
    cheap = probs.t() @ sig.flatten(1)  # [K, hw]
    candidates = _top_classes(cheap, CANDIDATE_RANK)
    weights = torch.cat([probs[:, candidates], probs.sum(1, keepdim=True)], 1)  # [Q, C + 1], last: all classes
    sums = torch.cat([cheap[candidates], probs.sum(1)[None] @ sig.flatten(1)]).view(-1, h, w)
    # Cell (t, u) spans output rows 4t-2..4t+1 and columns 4u-2..4u+1 of the input-size grid; its corners
    # are logits (t-1..t, u-1..u), clamped at the border as the resize clamps them.
    padded = F.pad(masks[None], (1, 1, 1, 1), mode="replicate")[0]  # [Q, h+2, w+2]
    proven = _proven_cells(padded, weights[:, :-1], F.pad(sums[None, :-1], (1, 1, 1, 1), mode="replicate")[0])
    canvas = sums.new_zeros(len(sums), 4 * (h + 1), 4 * (w + 1))  # cell-aligned: canvas row r = output row r - 2
    canvas[:, 2:-2, 2:-2] = resize(sums, input_size)
    ih, iw = image_size
    inside = torch.zeros_like(proven)
    inside[: (ih + 1) // 4 + 1, : (iw + 1) // 4 + 1] = True  # cells that reach into the image's region
    exact = ~proven & inside
    _write_exact(canvas, padded, weights, exact)
    values = canvas[:, 2 : 2 + ih, 2 : 2 + iw]  # a view: later exact cells show through
    if (ih, iw) != tuple(orig_size):
        winner = values[:-1].max(0).indices  # max(0): several times faster than argmax(0) on a CPU
        mixed = _mixed_neighbourhoods(winner)
        cells = F.max_pool2d(F.pad(mixed[None, None].float(), (2, 4 * (w + 1) - iw - 2, 2, 4 * (h + 1) - ih - 2)), 4)
        more = (cells[0, 0] > 0) & ~exact
        _write_exact(canvas, padded, weights, more)
        if use_blocks(image_size, orig_size, values.device):
            return _resize_blockwise(values, candidates, orig_size)
        values = resize(values, orig_size)
    value, best = values[:-1].max(0)
    return SemanticMap(candidates[best], value / values[-1].clamp_min(1e-12))


def _resize_blockwise(values: Tensor, candidates: Tensor, orig_size: tuple[int, int]) -> BlockSemanticMap:
    """The second resize, to an original size many times the region's, of [C + 1, h, w] class sums (the last
    for all classes) -> the classes and scores that resizing all of them and taking the maxima gives.

    A block of the region whose four corners share a winner, each by more than rounding, keeps it on all
    of its output pixels (model/resize_blocks.py): the winners are the blocks', and the scores need only the
    winner's sums and the totals resized, which equal the winning class's there. The other blocks' pixels
    get all class sums resized."""
    padded = pad_edges(values)
    top, win = padded[:-1].max(0)  # [h+1, w+1]
    if len(padded) > 2:
        runner_up = padded[:-1].clone().scatter_(0, win[None], float("-inf")).amax(0)
        margin = pool2x2(top - runner_up, torch.minimum)
    else:
        margin = torch.full_like(top[:-1, :-1], float("inf"))
    slack = float(rounding_margin(padded).amax())  # for the sums' differences
    settled = (pool2x2(win, torch.minimum) == pool2x2(win, torch.maximum)) & (margin > slack)
    grid = BlockGrid.of((values.shape[1], values.shape[2]), orig_size, values.device)
    pair = resize(torch.stack([top[:-1, :-1], values[-1]]), orig_size)
    scores = pair[0].div_(pair[1].clamp_min_(1e-12))
    exact_at = grid.pixels_of(~settled)
    exact_labels = torch.empty_like(exact_at)
    for chunk in pixel_chunks(len(exact_at)):
        at = exact_at[chunk]
        sums = grid.resize_at(padded, at)  # [C + 1, P]
        value, best = sums[:-1].max(0)
        exact_labels[chunk] = candidates[best]
        scores.view(-1)[at] = value / sums[-1].clamp_min(1e-12)
    return BlockSemanticMap(candidates[win[:-1, :-1]], scores, grid, settled, exact_at, exact_labels)


def _top_classes(cheap: Tensor, k: int) -> Tensor:
    """The classes in some pixel's top k of [K, hw] scores.

    topk over all K classes is the costly part, so first a floor: the k-th best of the 8 classes that peak
    highest is at most the k-th best of all, and a class that never reaches it is in no pixel's top k.
    """
    if len(cheap) <= 8:
        return cheap.topk(min(k, len(cheap)), 0).indices.unique()
    probe = cheap.amax(1).topk(8).indices
    floor = cheap[probe].topk(k, 0).values[-1]  # [hw]
    keep = ((cheap - floor).amax(1) >= 0).nonzero().flatten()
    return keep[cheap[keep].topk(min(k, len(keep)), 0).indices.unique()]


def _proven_cells(padded: Tensor, probs: Tensor, sums: Tensor) -> Tensor:
    """[h+1, w+1] bool: cells whose cheap winner is the official winner on all of their pixels.

    padded: [Q, h+2, w+2] mask logits; probs: [Q, C] candidate class probabilities; sums: [C, h+2, w+2]
    their cheap class scores at the logits.
    """
    top, low = pool2x2(padded, torch.maximum), pool2x2(padded, torch.minimum)  # [Q, h+1, w+1]
    # each query's sigmoid error: Jensen's bound, or the sigmoid's range (tighter where it saturates)
    gap = torch.minimum((top - low).square_().mul_(JENSEN), top.sigmoid_().sub_(low.sigmoid_())).flatten(1)
    c = probs.shape[1]
    corners = sums.unfold(1, 2, 1).unfold(2, 2, 1).flatten(1, 2).flatten(-2)  # [C, cells, 4]
    best = corners.mean(-1).max(0).indices  # [cells] the cheap winner
    lead = corners.gather(0, best[None, :, None].expand(1, -1, 4)) - corners  # [C, cells, 4]
    margin = lead.amin(-1)  # [C, cells] the winner's smallest lead over c at a corner
    bound = torch.empty_like(margin)
    for b in best.unique().tolist():  # |p_b - p_c| weighs each query's sigmoid error
        weigh = (probs[:, b : b + 1] - probs).abs().t()  # [C, Q]
        where = best == b
        if where.sum() * 4 > len(best):  # most cells: gathering their columns costs more than the product
            bound = torch.where(where, weigh @ gap, bound)
        else:
            cols = where.nonzero().flatten()
            bound[:, cols] = weigh @ gap[:, cols]
    # float32 rounding of sums of up to Q terms: demand a little more than the bound
    slack = 1e-5 * (1 + corners.abs().amax((0, 2)))
    ok = (margin > bound + slack) | (torch.arange(c, device=best.device)[:, None] == best)
    return ok.all(0).view(padded.shape[1] - 1, padded.shape[2] - 1)


def _write_exact(canvas: Tensor, padded: Tensor, weights: Tensor, cells: Tensor) -> None:
    """The official sums (resize 4x, sigmoid, weigh) of the chosen cells, written into the canvas."""
    flat = cells.flatten().nonzero().flatten()
    if len(flat) == 0:
        return
    rows, cols = cells.shape
    t, u = flat // cols, flat % cols
    # flat offsets of a cell's corners in padded, and of its 16 pixels in the canvas
    corner_at = torch.tensor([0, 1, cols + 1, cols + 2], device=flat.device)
    pixel_at = (torch.arange(4, device=flat.device)[:, None] * 4 * cols + torch.arange(4, device=flat.device)).flatten()
    phase = PHASE_WEIGHTS.to(padded)
    logits, out = padded.flatten(1), canvas.view(len(canvas), -1)
    for start in range(0, len(flat), CELL_CHUNK):
        tt, uu = t[start : start + CELL_CHUNK], u[start : start + CELL_CHUNK]
        corners = logits[:, ((tt * (cols + 1) + uu)[:, None] + corner_at).flatten()]  # [Q, n * 4]
        pixels = (corners.view(len(logits), -1, 4).transpose(0, 1) @ phase).sigmoid_()  # [n, Q, 16]
        sums = (weights.t() @ pixels).transpose(0, 1).flatten(1)  # [C + 1, n * 16]
        out[:, ((4 * tt * 4 * cols + 4 * uu)[:, None] + pixel_at).flatten()] = sums


def _mixed_neighbourhoods(winner: Tensor) -> Tensor:
    """[H, W] bool: pixels in a 2x2 block whose winners differ (a bilinear resize mixes such blocks)."""
    down, right = winner[1:] != winner[:-1], winner[:, 1:] != winner[:, :-1]
    differ = down[:, 1:] | down[:, :-1] | right[1:] | right[:-1]
    return pool2x2(F.pad(differ, (1, 1, 1, 1)), torch.logical_or)  # block (y, x) covers pixels y..y+1, x..x+1


def semantic_map_reference(
    logits: Tensor,
    masks: Tensor,
    input_size: tuple[int, int],
    image_size: tuple[int, int],
    orig_size: tuple[int, int],
) -> Tensor:
    """The official order for all classes -> [H, W] class ids."""
    full = F.interpolate(masks[None], size=input_size, mode="bilinear", align_corners=False)[0]
    full = full[:, : image_size[0], : image_size[1]]
    scores = torch.einsum("qc,qhw->chw", logits.softmax(-1)[:, :-1], full.sigmoid())
    if tuple(scores.shape[-2:]) != tuple(orig_size):
        scores = F.interpolate(scores[None], size=orig_size, mode="bilinear", align_corners=False)[0]
    return scores.argmax(0)
