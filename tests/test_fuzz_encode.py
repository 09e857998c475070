"""Property tests of the RLE encoder: random label maps and instance masks round-trip exactly through
pycocotools, with our area and box equal to pycocotools' own."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pycocotools import mask as mask_utils

from model.postprocess import Segment, SegmentationResult, map_result
from service.encode import encode_result, rle_counts_from_map

CLASSES = [f"c{i}" for i in range(8)]
ISTHING = [i % 2 == 1 for i in range(8)]
EXAMPLES = settings(max_examples=500, deadline=2000)

shapes = st.tuples(st.integers(1, 40), st.integers(1, 40))
label_maps = shapes.flatmap(lambda hw: arrays(np.int32, hw, elements=st.integers(0, 6)))


def decoded(segment: dict) -> np.ndarray:
    return mask_utils.decode({"size": segment["rle"]["size"], "counts": segment["rle"]["counts"].encode()})


@EXAMPLES
@given(label_maps, st.lists(st.integers(-1, 8), max_size=8, unique=True))
def test_counts_round_trip_for_any_ids(seg_map, ids):
    h, w = seg_map.shape
    for seg_id, counts in zip(ids, rle_counts_from_map(seg_map, ids)):
        assert sum(counts) == h * w
        rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
        assert np.array_equal(mask_utils.decode(rle), (seg_map == seg_id).astype(np.uint8))


@EXAMPLES
@given(label_maps)
def test_panoptic_segments_round_trip_with_area_and_bbox(seg_map):
    present = [int(v) for v in np.unique(seg_map) if v > 0]
    relabelled = np.zeros_like(seg_map)  # map_result wants ids 1..S
    for new_id, old_id in enumerate(present, start=1):
        relabelled[seg_map == old_id] = new_id
    labels = [(v * 3) % len(CLASSES) for v in present]
    result = map_result("panoptic", torch.from_numpy(relabelled), labels, [0.5] * len(present), ISTHING)
    for s in encode_result(result, CLASSES):
        m = decoded(s)
        assert np.array_equal(m, (relabelled == s["id"]).astype(np.uint8))
        rle = {"size": s["rle"]["size"], "counts": s["rle"]["counts"].encode()}
        assert s["area"] == int(mask_utils.area(rle)) == m.sum()
        assert s["bbox"] == mask_utils.toBbox(rle).tolist()


@EXAMPLES
@given(shapes.flatmap(lambda hw: st.integers(0, 4).flatmap(lambda n: arrays(np.bool_, (n, *hw)))))
def test_instance_masks_round_trip(masks):
    segs = [Segment(i + 1, 1, 0.9, int(m.sum()), (0, 0, 0, 0), True) for i, m in enumerate(masks)]
    out = encode_result(SegmentationResult("instance", segs, masks=torch.from_numpy(masks)), CLASSES)
    assert len(out) == len(masks)
    for s, m in zip(out, masks):
        assert np.array_equal(decoded(s), m.astype(np.uint8))
