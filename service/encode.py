"""SegmentationResult -> the JSON segments: COCO compressed RLE masks with their labels, areas and boxes.

Semantic and panoptic results are one label map, so all their RLEs come from one column-major pass over
it: find where the value changes, then give each run to its segment. pycocotools compresses the counts.
`area` and `bbox` are post-processing's own, from the same pixels; tests check they equal pycocotools'
`mask.area` and `mask.toBbox`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from model.postprocess import SegmentationResult


def rle_counts_from_map(segment_map: np.ndarray, ids: list[int]) -> list[list[int]]:
    """Uncompressed COCO RLE counts (column-major, starting with a 0-run) of `segment_map == id` per id."""
    if not ids:
        return []
    flat = np.asarray(segment_map).ravel(order="F")
    n = flat.size
    starts = np.concatenate(([0], np.flatnonzero(flat[1:] != flat[:-1]) + 1))
    ends = np.append(starts[1:], n)
    values = flat[starts]
    order = np.argsort(values, kind="stable")  # runs grouped by value, in pixel order within a value
    sorted_values = values[order]
    out = []
    for seg_id in ids:
        lo, hi = np.searchsorted(sorted_values, seg_id, "left"), np.searchsorted(sorted_values, seg_id, "right")
        runs = order[lo:hi]
        s, e = starts[runs], ends[runs]
        # Alternating lengths: zeros before the first run, the run, zeros up to the next run, ...
        counts = np.empty(2 * len(runs) + 1, dtype=np.int64)
        counts[0::2] = np.concatenate((s, [n])) - np.concatenate(([0], e))
        counts[1::2] = e - s
        if counts[-1] == 0:
            counts = counts[:-1]
        out.append(counts.tolist())
    return out


def _compress(counts: list[list[int]], h: int, w: int) -> list[dict[str, Any]]:
    if not counts:
        return []
    return mask_utils.frPyObjects([{"size": [h, w], "counts": c} for c in counts], h, w)


def encode_result(result: SegmentationResult, class_names: list[str]) -> list[dict[str, Any]]:
    if result.segment_map is not None:
        seg_map = result.segment_map.cpu().numpy()
        h, w = seg_map.shape
        rles = _compress(rle_counts_from_map(seg_map, [s.id for s in result.segments]), h, w)
    else:
        assert result.masks is not None
        masks = result.masks.cpu().numpy()
        h, w = masks.shape[1:]
        # pycocotools wants [H, W, N] uint8 in Fortran order, which is [N, W, H] in C order: one transposing
        # copy, and the bools reinterpreted as bytes rather than converted
        column_major = np.ascontiguousarray(masks.transpose(0, 2, 1)).view(np.uint8).transpose(2, 1, 0)
        rles = mask_utils.encode(column_major) if len(masks) else []
    # Area and box come from post-processing, computed from the same pixels (equal to pycocotools'; tested).
    return [
        {
            "id": seg.id,
            "label_id": seg.label_id,
            "label": class_names[seg.label_id],
            "isthing": seg.isthing,
            "score": round(float(seg.score), 6),
            "area": int(seg.area),
            "bbox": list(seg.bbox),
            "rle": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
        }
        for seg, rle in zip(result.segments, rles)
    ]
