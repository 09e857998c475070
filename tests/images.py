"""Encoded test images in the awkward modes and formats clients send."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def rgb(h: int = 96, w: int = 128, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def exif_rotated_jpeg(h: int = 60, w: int = 90) -> bytes:
    """A w x h JPEG whose EXIF orientation 6 says: show it rotated 90 degrees clockwise (h x w upright)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(rgb(h, w), "JPEG", exif=exif.tobytes())


def mpo_jpeg() -> bytes:
    """A phone camera's JPEG: an MPF header (Pillow says format MPO) and a second, smaller frame after the first."""
    return encode(rgb(), "MPO", save_all=True, append_images=[rgb(48, 64, seed=1)])


def awkward() -> dict[str, tuple[bytes, str, tuple[int, int]]]:
    """name -> (bytes, media type, upright (height, width))."""
    base = rgb()
    sixteen = Image.fromarray(np.arange(64 * 80, dtype=np.uint16).reshape(64, 80) * 12)
    return {
        "grayscale": (encode(base.convert("L"), "PNG"), "image/png", (96, 128)),
        "palette": (encode(base.convert("P"), "PNG"), "image/png", (96, 128)),
        "palette-transparent": (encode(base.convert("P"), "PNG", transparency=0), "image/png", (96, 128)),
        "rgba": (encode(base.convert("RGBA"), "PNG"), "image/png", (96, 128)),
        "la": (encode(base.convert("LA"), "PNG"), "image/png", (96, 128)),
        "16-bit": (encode(sixteen, "PNG"), "image/png", (64, 80)),
        "cmyk-jpeg": (encode(base.convert("CMYK"), "JPEG"), "image/jpeg", (96, 128)),
        "exif-rotated": (exif_rotated_jpeg(), "image/jpeg", (90, 60)),
        "mpo": (mpo_jpeg(), "image/jpeg", (96, 128)),
        "1x1": (encode(rgb(1, 1), "PNG"), "image/png", (1, 1)),
        "tall": (encode(rgb(1500, 2), "PNG"), "image/png", (1500, 2)),
        "wide": (encode(rgb(1, 2000), "PNG"), "image/png", (1, 2000)),
        "webp": (encode(base, "WEBP"), "image/webp", (96, 128)),
        "bmp": (encode(base, "BMP"), "image/bmp", (96, 128)),
        "tiff": (encode(base, "TIFF"), "image/tiff", (96, 128)),
    }
