"""Semantic, panoptic and instance results from the same (pred_logits, pred_masks) outputs.

Pure torch, on whatever device the outputs are on. Panoptic and instance mask logits are resized as the
official code does: bilinearly to the padded input size, cropped to the image's region, then bilinearly to
its original size. Semantic follows the official semantic path, where the class scores take the second
resize (model/semantic_map.py).
Panoptic and instance pick their queries from the class scores alone, so only those queries' masks are
resized; that gives the same result as resizing all of them first. Panoptic resizes them to an upload's
size only where the owner can depend on it (model/panoptic_owner.py). They are resized QUERY_CHUNK at a time:
on a CPU a fresh [100, 512, 512] float buffer is paid for in page faults, while a chunk's buffers come
back from the allocator's cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from model.boxes import Box, boxes_from_map, boxes_from_masks
from model.instance_masks import mask_sums
from model.mask_resize import region_logits
from model.panoptic_owner import ownership
from model.semantic_map import semantic_map

TASKS = ("semantic", "panoptic", "instance")
QUERY_CHUNK = 16  # queries whose masks are resized at once

MaskFn = Callable[[Tensor], Tensor]  # query indices -> their mask logits at the image's region of the input


@dataclass
class Segment:
    id: int  # value in SegmentationResult.segment_map, or 1 + index into SegmentationResult.masks
    label_id: int
    score: float
    area: int
    bbox: Box  # COCO [x, y, w, h] of the mask's pixels
    isthing: bool


@dataclass
class SegmentationResult:
    task: str
    segments: list[Segment]
    segment_map: Tensor | None = None  # [H, W] int32, 0 = no segment (semantic, panoptic)
    masks: Tensor | None = None  # [N, H, W] bool, may overlap (instance)

    def label_map(self) -> Tensor:
        """[H, W] class ids of a semantic or panoptic result, -1 where no segment is."""
        assert self.segment_map is not None, "instance results have no label map"
        lut = torch.tensor([-1] + [s.label_id for s in self.segments], device=self.segment_map.device)
        return lut[self.segment_map.long()]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SegmentationResult:
        """The same result with its map or masks on `device`."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return SegmentationResult(self.task, self.segments, move(self.segment_map), move(self.masks))

    def mask(self, segment: Segment) -> Tensor:
        if self.masks is not None:
            return self.masks[segment.id - 1]
        assert self.segment_map is not None
        return self.segment_map == segment.id


def _chunks(n: int) -> list[slice]:
    return [slice(start, min(start + QUERY_CHUNK, n)) for start in range(0, n, QUERY_CHUNK)]


def map_result(
    task: str,
    segment_map: Tensor,
    labels: list[int],
    scores: list[float],
    isthing: Sequence[bool],
    areas_boxes: tuple[list[int], list[Box]] | None = None,
) -> SegmentationResult:
    """A result whose map holds segment ids 1..len(labels), with their areas and boxes (from the map unless
    given)."""
    areas, boxes = areas_boxes or boxes_from_map(segment_map, len(labels))
    segments = [Segment(i + 1, c, scores[i], areas[i], boxes[i], bool(isthing[c])) for i, c in enumerate(labels)]
    return SegmentationResult(task, segments, segment_map=segment_map)


def semantic_inference(
    logits: Tensor,
    masks: Tensor,
    isthing: Sequence[bool],
    sizes: tuple[tuple[int, int], tuple[int, int], tuple[int, int]],
    max_segments: int | None = None,
) -> SegmentationResult:
    """The paper's semantic inference: argmax over classes of sum_q p_q(c) * sigmoid(m_q).

    `masks` are [Q, h, w] stride-4 logits; `sizes` are the (input, image, original) sizes.
    One segment per class present; its score is the mean normalised class probability over its pixels.
    """
    classes_map = semantic_map(logits, masks, *sizes)
    k = logits.shape[-1] - 1
    present, score_sums = classes_map.class_totals(k)
    mean_score = score_sums / present.clamp_min(1)
    classes = present.nonzero().flatten()
    if max_segments is not None and len(classes) > max_segments:
        # Keep the largest classes; the others' pixels are left unlabelled (0).
        classes = classes[present[classes].argsort(descending=True)[:max_segments]].sort().values
    lut = torch.zeros(k, dtype=torch.int32, device=logits.device)
    lut[classes] = torch.arange(1, len(classes) + 1, dtype=torch.int32, device=logits.device)
    segment_map, areas, boxes = classes_map.segments(lut, len(classes))
    scores = mean_score[classes].tolist()
    return map_result("semantic", segment_map, classes.tolist(), scores, isthing, (areas, boxes))


def panoptic_inference(
    logits: Tensor,
    region_fn: MaskFn,
    region_size: tuple[int, int],
    out_size: tuple[int, int],
    isthing: Sequence[bool],
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
    max_segments: int | None = None,
) -> SegmentationResult:
    """The official MaskFormer panoptic inference.

    Drop "no object" and queries scoring <= object_mask_threshold, weight each mask by its score, give
    every pixel to the best query, drop segments keeping < overlap_threshold of their own mask, and merge
    each stuff class into one segment. Segment ids are 1..S in query order, so they are always unique.
    `region_fn(query_indices)` returns those queries' mask logits at the image's region of the input
    (`region_size`); model/panoptic_owner.py resizes them to `out_size` where that matters.
    """
    num_classes = logits.shape[-1] - 1
    scores, labels = logits.softmax(-1).max(-1)
    keep = (labels != num_classes) & (scores > object_mask_threshold)
    kept = keep.nonzero().flatten()
    if len(kept) == 0:
        empty = torch.zeros(out_size, dtype=torch.int32, device=logits.device)
        return SegmentationResult("panoptic", [], segment_map=empty)
    cur_scores, cur_classes = scores[kept], labels[kept]
    owners = ownership(lambda part: region_fn(kept[part]), _chunks(len(kept)), cur_scores, region_size, out_size)

    lut = [0] * len(kept)  # kept-query index -> segment id (0 = dropped)
    seg_labels: list[int] = []
    seg_scores: list[float] = []
    stuff_segment: dict[int, int] = {}
    for i, (label, score) in enumerate(zip(cur_classes.tolist(), cur_scores.tolist())):
        owned, own_area = owners.owned[i], owners.own_area[i]
        if owned == 0 or own_area == 0 or owned / own_area < overlap_threshold:
            continue
        if not isthing[label] and label in stuff_segment:
            sid = stuff_segment[label]
            seg_scores[sid - 1] = max(seg_scores[sid - 1], score)
        else:
            if max_segments is not None and len(seg_labels) >= max_segments:
                continue
            seg_labels.append(label)
            seg_scores.append(score)
            sid = len(seg_labels)
            if not isthing[label]:
                stuff_segment[label] = sid
        lut[i] = sid
    table = torch.tensor(lut, dtype=torch.int32, device=logits.device)
    segment_map, areas, boxes = owners.segments(table, len(seg_labels))
    return map_result("panoptic", segment_map, seg_labels, seg_scores, isthing, (areas, boxes))


def instance_inference(
    logits: Tensor,
    region_fn: MaskFn,
    region_size: tuple[int, int],
    out_size: tuple[int, int],
    isthing: Sequence[bool],
    threshold: float = 0.0,
    topk: int | None = None,
    max_segments: int | None = None,
) -> SegmentationResult:
    """Top-k over query x class scores, each score multiplied by the mean mask probability inside its mask.

    Only thing classes compete when the model has any. Results are sorted by score, highest first;
    segments scoring <= threshold and empty masks are dropped. `region_fn` is as for panoptic_inference;
    model/instance_masks.py resizes the masks.
    """
    q, k1 = logits.shape
    probs = logits.softmax(-1)[:, :-1]
    things = torch.tensor(list(isthing), dtype=torch.bool, device=logits.device)
    if things.any():
        probs = probs.masked_fill(~things, 0.0)
    flat = probs.flatten()
    topk = min(topk or q, flat.numel())
    cls_scores, idx = flat.topk(topk)
    queries, labels = idx // (k1 - 1), idx % (k1 - 1)
    # A mask score is at most 1, so a class score at or below the threshold can never pass it: drop those
    # before resizing their masks (exact, and most of the work when the threshold is high).
    valid = cls_scores > max(threshold, 0.0)
    cls_scores, queries, labels = cls_scores[valid], queries[valid], labels[valid]
    n = len(queries)
    binary, areas, prob_sums = mask_sums(
        lambda part: region_fn(queries[part]), _chunks(n), n, region_size, out_size, logits.device
    )
    mask_scores = (prob_sums / (areas + 1e-6)).float()  # the mean mask probability inside the mask
    scores = cls_scores * mask_scores
    keep = ((scores > threshold) & (areas > 0)).nonzero().flatten()
    keep = keep[scores[keep].argsort(descending=True)]
    if max_segments is not None:
        keep = keep[:max_segments]
    masks = binary[keep]
    kept_scores, kept_labels = scores[keep].tolist(), labels[keep].tolist()
    areas_list = areas[keep].tolist()
    boxes = boxes_from_masks(masks)
    segments = [
        Segment(i + 1, c, kept_scores[i], areas_list[i], boxes[i], bool(isthing[c])) for i, c in enumerate(kept_labels)
    ]
    return SegmentationResult("instance", segments, masks=masks)


def postprocess(
    outputs: dict[str, Tensor],
    task: str,
    isthing: Sequence[bool],
    image_sizes: Sequence[tuple[int, int]] | None = None,
    orig_sizes: Sequence[tuple[int, int]] | None = None,
    threshold: float | None = None,
    overlap_threshold: float = 0.8,
    max_segments: int | None = None,
) -> list[SegmentationResult]:
    """Batched post-processing of a forward pass.

    image_sizes: (h, w) of each image inside the padded model input (default: all of it).
    orig_sizes: (H, W) to return results at (default: image_sizes).
    threshold: panoptic object-mask threshold (default 0.8) or instance score threshold (default 0.0).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    logits, masks = outputs["pred_logits"], outputs["pred_masks"]
    b, _, h, w = masks.shape
    input_size = (4 * h, 4 * w)
    image_sizes = list(image_sizes or [input_size] * b)
    orig_sizes = list(orig_sizes or image_sizes)
    if len(image_sizes) != b or len(orig_sizes) != b:
        raise ValueError(f"{b} images but {len(image_sizes)} image_sizes and {len(orig_sizes)} orig_sizes")
    if len(isthing) != logits.shape[-1] - 1:
        raise ValueError(f"{len(isthing)} thing flags for {logits.shape[-1] - 1} classes")
    results = []
    for i in range(b):
        size = (int(image_sizes[i][0]), int(image_sizes[i][1]))
        orig = (int(orig_sizes[i][0]), int(orig_sizes[i][1]))

        def region_fn(sel: Tensor, i: int = i, size: tuple[int, int] = size) -> Tensor:
            return region_logits(masks[i, sel], input_size, size)

        if task == "semantic":
            results.append(semantic_inference(logits[i], masks[i], isthing, (input_size, size, orig), max_segments))
        elif task == "panoptic":
            t = 0.8 if threshold is None else threshold
            results.append(
                panoptic_inference(logits[i], region_fn, size, orig, isthing, t, overlap_threshold, max_segments)
            )
        else:
            t = 0.0 if threshold is None else threshold
            results.append(instance_inference(logits[i], region_fn, size, orig, isthing, t, None, max_segments))
    return results
