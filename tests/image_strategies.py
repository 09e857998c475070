"""Hypothesis strategies for hostile uploads: valid small images, the same with mangled headers or cut short,
images whose header declares enormous dimensions, and plain random bytes.

Used by the decoder's property tests and, through tests/schemathesis_hooks.py, as schemathesis' image bodies.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
from hypothesis import strategies as st
from PIL import Image

from tests.images import encode

FORMATS = ["PNG", "JPEG", "WEBP", "BMP", "TIFF"]
MODES = {"PNG": ["RGB", "L", "RGBA", "P", "I;16"], "JPEG": ["RGB", "L", "CMYK"], "WEBP": ["RGB", "RGBA"]}


@st.composite
def valid_images(draw: st.DrawFn, formats: list[str] = FORMATS) -> bytes:
    fmt = draw(st.sampled_from(formats))
    mode = draw(st.sampled_from(MODES.get(fmt, ["RGB"])))
    h, w = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    seed = draw(st.integers(0, 2**16))
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    img = img.convert("L").convert("I;16") if mode == "I;16" else img.convert(mode)
    return encode(img, fmt)


@st.composite
def mutated(draw: st.DrawFn, images: st.SearchStrategy[bytes]) -> bytes:
    """Overwritten header bytes (where the magic, sizes and chunk lengths live), then maybe cut short."""
    data = bytearray(draw(images))
    for _ in range(draw(st.integers(1, 6))):
        data[draw(st.integers(0, min(len(data), 64) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.one_of(st.none(), st.integers(0, len(data))))
    return bytes(data[:cut])


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_declaring(w: int, h: int) -> bytes:
    """A PNG whose IHDR (with a correct CRC) declares w x h, followed by a tiny IDAT."""
    ihdr = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b"")


def jpeg_declaring(w: int, h: int) -> bytes:
    """A small JPEG with its SOF0 frame header rewritten to say w x h (each at most 65535)."""
    data = bytearray(encode(Image.new("RGB", (8, 8)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def webp_declaring(w: int, h: int) -> bytes:
    """An extended (VP8X) WebP whose canvas says w x h (each at most 2**24) around a small lossless image."""
    inner = encode(Image.new("RGB", (8, 8)), "WEBP", lossless=True)[12:]  # the VP8L chunk
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\0\0\0\0" + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    body = b"WEBP" + vp8x + inner
    return b"RIFF" + struct.pack("<I", len(body)) + body


@st.composite
def huge_declared(draw: st.DrawFn) -> bytes:
    fmt = draw(st.sampled_from(["PNG", "JPEG", "WEBP"]))
    top = {"PNG": 2**31 - 1, "JPEG": 65535, "WEBP": 2**24}[fmt]
    w, h = draw(st.integers(1, top)), draw(st.integers(1, top))
    return {"PNG": png_declaring, "JPEG": jpeg_declaring, "WEBP": webp_declaring}[fmt](w, h)


def hostile_images() -> st.SearchStrategy[bytes]:
    return st.one_of(valid_images(), mutated(valid_images()), huge_declared(), st.binary(max_size=2048), st.just(b""))
