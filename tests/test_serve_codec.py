"""Decoding requests and encoding results, without HTTP."""

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from pycocotools import mask as mask_utils

import service.decode
from model import load_model
from model.config import IMAGENET_MEAN
from model.data.shapes import VAL_SEED, generate
from model.inference import prepare_for_inference, run
from model.postprocess import Segment, SegmentationResult, map_result, postprocess
from model.preprocess import letterbox
from service.decode import FORMATS, decode, decode_input, prepare
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


@pytest.mark.parametrize("shape", [(300, 200), (64, 90), (128, 128), (1, 500), (700, 1100)])
def test_prepare_resizes_in_uint8_within_1_of_the_float_letterbox(shape):
    rng = np.random.default_rng(sum(shape))
    smooth = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(shape[::-1], Image.BILINEAR)
    rgb = np.array(smooth)
    rgb[::7] = rng.integers(0, 256, rgb[::7].shape, dtype=np.uint8)  # sharp lines too
    fill = (123.675, 116.28, 103.53)
    got = prepare(rgb, (128, 128), fill)
    want, inner = letterbox(torch.from_numpy(rgb).permute(2, 0, 1).float(), (128, 128), fill)
    want = want.round().clamp(0, 255).to(torch.uint8)
    assert got.input.dtype == torch.uint8 and got.image_size == inner and got.orig_size == shape
    assert (got.input.int() - want.int()).abs().max() <= 1
    h, w = inner
    assert torch.equal(got.input[:, h:], want[:, h:]) and torch.equal(got.input[:, :, w:], want[:, :, w:])


def photo_jpeg(h: int, w: int, orientation: int = 1, seed: int = 0) -> bytes:
    """A shapes validation image scaled up to a photo's size (stored w x h), with an EXIF orientation."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    img = Image.fromarray(generate(VAL_SEED + seed).image).resize((w, h), Image.BICUBIC)
    return encode(img, "JPEG", quality=90, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_large_jpeg_decodes_at_reduced_scale_close_to_the_full_decode(orientation, monkeypatch):
    data = photo_jpeg(1100, 1700, orientation)
    decoded_sizes = []
    real_pixels = service.decode.pixels
    monkeypatch.setattr(service.decode, "pixels", lambda img: decoded_sizes.append(img.size) or real_pixels(img))
    fast = decode_input(data, 10**8, (256, 256), IMAGENET_MEAN)
    full = prepare(decode(data, 10**8), (256, 256), IMAGENET_MEAN)
    assert decoded_sizes == [(425, 275), (1700, 1100)]  # 1/4 of each side (rounded up), then the whole image
    upright = (1700, 1100) if orientation >= 5 else (1100, 1700)  # 5 to 8 swap width and height
    assert fast.orig_size == full.orig_size == upright
    assert fast.image_size == full.image_size
    diff = (fast.input.int() - full.input.int()).abs()
    assert diff.float().mean() < 1.0 and (diff > 8).float().mean() < 0.001, (diff.float().mean(), diff.max())


@pytest.mark.parametrize(
    "data",
    [photo_jpeg(300, 500), encode(Image.fromarray(generate(VAL_SEED).image).resize((1700, 1100)), "PNG")],
    ids=["jpeg-under-twice-the-input", "large-png"],
)
def test_other_images_take_the_full_decode(data):
    fast = decode_input(data, 10**8, (256, 256), IMAGENET_MEAN)
    full = prepare(decode(data, 10**8), (256, 256), IMAGENET_MEAN)
    assert torch.equal(fast.input, full.input) and fast.orig_size == full.orig_size


def test_reduced_scale_decoding_keeps_the_shipped_models_semantic_maps():
    model = prepare_for_inference(load_model(), torch.device("cpu"), "fp32")
    agreement = []
    for seed in range(3):
        data = photo_jpeg(1024, 1536, seed=seed)
        maps = []
        for d in (
            decode_input(data, 10**8, model.cfg.input_size, model.cfg.pixel_mean),
            prepare(decode(data, 10**8), model.cfg.input_size, model.cfg.pixel_mean),
        ):
            logits, masks = run(model, d.input[None], torch.device("cpu"), "fp32")
            out = {"pred_logits": logits, "pred_masks": masks}
            maps.append(postprocess(out, "semantic", model.info.isthing, [d.image_size], [d.orig_size])[0].label_map())
        agreement.append((maps[0] == maps[1]).float().mean().item())
    assert min(agreement) >= 0.995, agreement


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
