"""Decoding requests and encoding results, without HTTP."""

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from pycocotools import mask as mask_utils

from model.postprocess import Segment, SegmentationResult, map_result
from service.decode import FORMATS, decode, prepare
from service.encode import encode_result, rle_counts_from_map
from service.errors import ApiError
from tests.images import awkward, encode, exif_rotated_jpeg, mpo_jpeg, rgb


@pytest.mark.parametrize("name", sorted(awkward()))
def test_awkward_images_decode_upright_rgb(name):
    data, _, (h, w) = awkward()[name]
    out = decode(data, max_pixels=10_000_000)
    assert out.shape == (h, w, 3) and out.dtype == np.uint8


def test_exif_orientation_is_applied():
    upright = decode(exif_rotated_jpeg(), 10**7)
    raw = np.asarray(Image.open(io.BytesIO(exif_rotated_jpeg())).convert("RGB"))
    # Orientation 6: the stored image turned 90 degrees clockwise; JPEG noise allows small differences.
    assert np.abs(upright.astype(int) - np.rot90(raw, k=-1).astype(int)).mean() < 1.0


def test_mpo_decodes_as_its_first_frame():
    assert Image.open(io.BytesIO(mpo_jpeg())).format == "MPO"
    assert np.array_equal(decode(mpo_jpeg(), 10**7), decode(encode(rgb(), "JPEG"), 10**7))


def test_sixteen_bit_is_scaled_not_clipped():
    img = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    assert decode(encode(img, "PNG"), 10**6).min() == 255


@pytest.mark.parametrize(
    "data, status, code",
    [
        (b"", 400, "empty_body"),
        (b"this is not an image", 400, "invalid_image"),
        (encode(rgb(), "PNG")[:300], 400, "invalid_image"),
        (encode(rgb(), "GIF"), 415, "unsupported_media_type"),
        (encode(rgb(100, 200), "PNG"), 413, "image_too_large"),
    ],
    ids=["empty", "not-an-image", "truncated", "gif", "too-many-pixels"],
)
def test_bad_images_raise_api_errors(data, status, code):
    with pytest.raises(ApiError) as err:
        decode(data, max_pixels=19_999)
    assert (err.value.status, err.value.code) == (status, code)


def test_refused_formats_are_never_parsed(monkeypatch):
    gif = encode(rgb(), "GIF")
    Image.init()
    for fmt, (_, accept) in list(Image.OPEN.items()):
        if fmt not in FORMATS:
            monkeypatch.setitem(Image.OPEN, fmt, (lambda *_: pytest.fail("a refused format's plugin ran"), accept))
    for data, status in ((gif, 415), (b"neither image nor magic", 400)):
        with pytest.raises(ApiError) as err:
            decode(data, 10**7)
        assert err.value.status == status


def test_pixel_limit_is_checked_before_decoding(monkeypatch):
    big = encode(Image.new("RGB", (4000, 3000)), "PNG")
    # PNG images load through ImageFile.load, so that is where decoding would start.
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded an image over the limit"))
    with pytest.raises(ApiError) as err:
        decode(big, max_pixels=10_000_000)
    assert err.value.status == 413


def test_prepare_letterboxes_to_the_input_size():
    d = prepare(np.zeros((50, 200, 3), np.uint8), (128, 128), (10.0, 20.0, 30.0))
    assert d.input.shape == (3, 128, 128) and d.input.dtype == torch.uint8
    assert d.image_size == (32, 128) and d.orig_size == (50, 200)
    assert d.input[:, 40:, :].flatten(1).unique(dim=1).tolist() == [[10], [20], [30]]


def test_rle_from_label_map_equals_pycocotools_per_mask():
    rng = np.random.default_rng(0)
    seg_map = rng.integers(0, 5, (37, 53)).astype(np.int32)
    seg_map[:10] = 2  # long runs as well as short ones
    counts = rle_counts_from_map(seg_map, [1, 2, 3, 4, 7])
    for seg_id, c in zip([1, 2, 3, 4, 7], counts):
        rle = mask_utils.frPyObjects({"size": [37, 53], "counts": c}, 37, 53)
        assert np.array_equal(mask_utils.decode(rle), (seg_map == seg_id).astype(np.uint8))


def test_encoded_segments_round_trip_with_area_and_bbox():
    seg_map = torch.zeros(40, 60, dtype=torch.int32)
    seg_map[5:20, 10:30] = 1
    seg_map[25:, :] = 2
    seg_map[0, 59] = 3
    result = map_result("panoptic", seg_map, [0, 2, 4], [0.9, 0.8, 0.7], [False, False, True, True, True])
    segments = encode_result(result, ["a", "b", "c", "d", "e"])
    assert [s["label"] for s in segments] == ["a", "c", "e"]
    for s in segments:
        rle = {"size": s["rle"]["size"], "counts": s["rle"]["counts"].encode()}
        m = mask_utils.decode(rle)
        assert np.array_equal(m, (seg_map == s["id"]).numpy().astype(np.uint8))
        assert s["area"] == m.sum() == int(mask_utils.area(rle))
        assert s["bbox"] == mask_utils.toBbox(rle).tolist()
        assert s["bbox"] == list(result.segments[s["id"] - 1].bbox)  # our own boxes agree too


def test_overlapping_instance_masks_encode_separately():
    masks = torch.zeros(2, 30, 30, dtype=torch.bool)
    masks[0, 5:20, 5:20] = True
    masks[1, 10:25, 10:25] = True
    segs = [Segment(1, 2, 0.9, 225, (5, 5, 15, 15), True), Segment(2, 3, 0.8, 225, (10, 10, 15, 15), True)]
    out = encode_result(SegmentationResult("instance", segs, masks=masks), ["a", "b", "c", "d"])
    for s, m in zip(out, masks):
        assert np.array_equal(mask_utils.decode({"size": [30, 30], "counts": s["rle"]["counts"]}), m.numpy())
    assert encode_result(SegmentationResult("instance", [], masks=masks[:0]), ["a"]) == []
