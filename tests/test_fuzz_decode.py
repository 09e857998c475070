"""Property tests of the upload decoder: whatever the bytes, decode() (and the server's decode_input()) returns
an RGB image within the pixel limit or raises our ApiError (400/413/415), quickly. Anything else would be a 500
on the live server.
"""

from __future__ import annotations

import faulthandler
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.decode import decode, decode_input
from service.errors import ApiError
from tests.image_strategies import (
    huge_declared,
    jpeg_declaring,
    mutated,
    png_declaring,
    valid_images,
    webp_declaring,
)

MAX_PIXELS = 4_000_000
# Each example: hypothesis fails one slower than `deadline`; a decode stuck in C code for HARD_LIMIT_S kills
# the run with every thread's traceback (faulthandler), so a hang cannot stall CI.
FUZZ = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
HARD_LIMIT_S = 20
INTERNALS = re.compile(r"Traceback|\.py\b|site-packages|\b0x[0-9a-f]{6,}")  # never in a client's error
FOUND = Path(__file__).parent / "fixtures" / "fuzz"  # crashing inputs the fuzzers found, kept as regressions


@contextmanager
def hard_time_limit(seconds: float) -> Iterator[None]:
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def check_decodes_or_refuses(data: bytes) -> None:
    with hard_time_limit(HARD_LIMIT_S):
        try:
            out = decode(data, MAX_PIXELS)
            # the server's path, with reduced-scale decoding for any JPEG over twice this small input size
            served = decode_input(data, MAX_PIXELS, (32, 32), (0.0, 0.0, 0.0))
        except ApiError as err:
            assert err.status in (400, 413, 415), (err.status, err.code)
            assert err.message and not INTERNALS.search(err.message), err.message
            return
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert 0 < out.shape[0] * out.shape[1] <= MAX_PIXELS
    assert served.orig_size == out.shape[:2] and served.input.shape == (3, 32, 32)


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data):
    check_decodes_or_refuses(data)


@FUZZ
@given(mutated(valid_images()))
def test_mutated_headers(data):
    check_decodes_or_refuses(data)


@FUZZ
@given(huge_declared())
def test_huge_declared_dimensions(data):
    check_decodes_or_refuses(data)


@settings(max_examples=40, deadline=2000)
@given(valid_images())
def test_valid_images_decode(data):
    out = decode(data, MAX_PIXELS)
    assert out.dtype == np.uint8 and out.shape[2] == 3


@pytest.mark.parametrize("build", [png_declaring, jpeg_declaring])
def test_declared_size_over_the_limit_is_413_from_the_header(build):
    with pytest.raises(ApiError) as err:
        decode(build(4000, 3000), MAX_PIXELS)
    assert (err.value.status, err.value.code) == (413, "image_too_large")


def test_webp_canvas_larger_than_its_image_is_refused():
    # libwebp checks the VP8X canvas against the bitstream when the file is opened, before our pixel limit.
    with pytest.raises(ApiError) as err:
        decode(webp_declaring(4000, 3000), MAX_PIXELS)
    assert err.value.status == 400


@pytest.mark.parametrize("path", sorted(FOUND.glob("*")), ids=lambda p: p.name)
def test_inputs_the_fuzzers_found_are_refused_with_400(path):
    with pytest.raises(ApiError) as err:
        decode(path.read_bytes(), MAX_PIXELS)
    assert err.value.status == 400
