"""service/decode_gpu.py, run here on the CPU (the same steps, torchvision's CPU JPEG decoder standing in for
nvjpeg): the host path's sizes for every image, the input of the host's full decode for JPEGs, and the host
path's answer for whatever the device does not take. tests/test_cuda.py runs it on a GPU."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from model.data.shapes import VAL_SEED, generate
from model.preprocess import resize_in_float
from service import errors
from service.decode import decode, decode_input, prepare
from service.decode_gpu import GpuDecoder, orient, uses_gpu_decoder
from tests.images import awkward, encode, rgb

CPU = torch.device("cpu")
FILL = (123.675, 116.28, 103.53)
SIZE = (256, 256)


def gpu_path(data: bytes, size=SIZE):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 deprecates its decoders for TorchCodec's
        return GpuDecoder(CPU)(data, 40_000_000, size, FILL)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_turns_as_pillows_exif_transpose(orientation):
    img = rgb(5, 7, seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.info["exif"] = exif.tobytes()
    want = np.asarray(ImageOps.exif_transpose(img))
    got = orient(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), orientation)
    assert torch.equal(got.permute(1, 2, 0), torch.from_numpy(want.copy()))


def test_the_uint8_resize_through_float_is_within_a_level_of_the_cpus_uint8_kernel():
    image = torch.from_numpy(np.asarray(generate(VAL_SEED).image).copy()).permute(2, 0, 1)
    for size in [(100, 100), (97, 61), (300, 410)]:
        want = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", antialias=True)[0]
        got = resize_in_float(image, size)
        assert got.dtype == torch.uint8 and (got.int() - want.int()).abs().max() <= 1


@pytest.mark.parametrize(
    "name, img, kwargs",
    [
        ("photo-sized", Image.fromarray(np.asarray(generate(VAL_SEED).image)).resize((640, 480)), {}),
        ("small", Image.fromarray(np.asarray(generate(VAL_SEED + 1).image)).resize((120, 90)), {}),
        ("large", Image.fromarray(np.asarray(generate(VAL_SEED + 2).image)).resize((2000, 1500)), {}),
        ("grayscale", Image.fromarray(np.asarray(generate(VAL_SEED + 3).image)).convert("L"), {}),
        ("progressive", Image.fromarray(np.asarray(generate(VAL_SEED + 4).image)), {"progressive": True}),
    ],
)
def test_a_jpeg_reaches_the_same_input_as_on_the_host(name, img, kwargs):
    data = encode(img, "JPEG", quality=92, **kwargs)
    host = decode_input(data, 40_000_000, SIZE, FILL)
    got = gpu_path(data)
    assert (got.image_size, got.orig_size) == (host.image_size, host.orig_size)
    assert got.input.shape == host.input.shape and got.input.dtype == torch.uint8
    # the host path decodes a JPEG it shrinks twofold or more at a reduced DCT scale; this path decodes it
    # whole, as the host's full decode does (libjpeg-turbo both: equal here; other builds may round apart)
    full = prepare(decode(data, 40_000_000), SIZE, FILL)
    diff = (got.input.int() - full.input.int()).abs()
    assert diff.max() <= 2 and diff.float().mean() < 0.05, (diff.max(), diff.float().mean())
    assert (got.input.int() - host.input.int()).abs().float().mean() < 1.0


@pytest.mark.parametrize("name", ["exif-rotated", "mpo", "cmyk-jpeg", "grayscale", "rgba", "webp"])
def test_every_format_and_orientation_keeps_the_host_paths_sizes(name):
    data, _, upright = awkward()[name]
    host = decode_input(data, 40_000_000, SIZE, FILL)
    got = gpu_path(data)
    assert got.orig_size == host.orig_size == upright and got.image_size == host.image_size
    assert (got.input.int() - host.input.int()).abs().float().mean() < 1.0


def test_what_nvjpeg_does_not_decode_gets_the_host_paths_answer():
    """Corrupt data past a good header: the host path decodes what it can or refuses it with its own 400."""
    data = encode(rgb(64, 64), "JPEG")
    broken = data[:200] + bytes(len(data) - 200)
    try:
        want = decode_input(broken, 40_000_000, SIZE, FILL)
    except errors.ApiError as err:
        with pytest.raises(errors.ApiError) as got:
            gpu_path(broken)
        assert (got.value.status, got.value.code) == (err.status, err.code)
    else:
        assert torch.equal(gpu_path(broken).input, want.input)
    with pytest.raises(errors.ApiError) as got:
        GpuDecoder(CPU)(data, 100, SIZE, FILL)  # too many pixels: refused from the header, as on the host
    assert got.value.status == 413


def test_only_backends_fed_on_the_gpu_decode_there():
    cuda = torch.device("cuda")
    assert uses_gpu_decoder(cuda, "torch", True) and uses_gpu_decoder(cuda, "tensorrt", True)
    assert not uses_gpu_decoder(cuda, "onnxruntime", True) and not uses_gpu_decoder(cuda, "torch", False)
    assert not uses_gpu_decoder(CPU, "torch", True)


def test_the_warm_up_decodes_one_jpeg_on_the_device_and_says_whether_it_could(monkeypatch):
    decoder = GpuDecoder(CPU)
    calls = []
    monkeypatch.setattr(decoder, "decode_jpeg", lambda *a, **k: calls.append(k["device"]) or torch.zeros(3, 4, 6))
    assert decoder.warmup(SIZE, FILL) and calls == [CPU]

    def no_nvjpeg(*args, **kwargs):
        raise RuntimeError("torchvision not compiled with nvJPEG support")

    monkeypatch.setattr(decoder, "decode_jpeg", no_nvjpeg)
    assert not decoder.warmup(SIZE, FILL)  # the pipeline then keeps the host path


def test_a_resize_the_device_cannot_do_falls_back_to_the_host(monkeypatch):
    """e.g. CUDA's antialiased kernel refuses downscales of ~100x along an axis, or memory runs out."""
    data = encode(Image.fromarray(np.asarray(generate(VAL_SEED).image)), "JPEG")

    def too_much_shared_memory(*args, **kwargs):
        raise RuntimeError("Too much shared memory required")

    monkeypatch.setattr("service.decode_gpu.letterbox", too_much_shared_memory)
    got, want = gpu_path(data), decode_input(data, 40_000_000, SIZE, FILL)
    assert torch.equal(got.input, want.input) and (got.image_size, got.orig_size) == (want.image_size, want.orig_size)


def test_a_jpeg_cut_short_is_the_host_paths_to_refuse(monkeypatch):
    """nvjpeg may decode a truncated JPEG to grey; without its end-of-image marker it never reaches it."""
    data = encode(rgb(64, 64), "JPEG")
    decoder = GpuDecoder(CPU)
    monkeypatch.setattr(decoder, "decode_jpeg", lambda *a, **k: pytest.fail("decoded on the device"))
    with pytest.raises(errors.ApiError) as err:
        decoder(data[: len(data) // 2], 40_000_000, SIZE, FILL)
    assert err.value.status == 400
