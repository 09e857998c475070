"""Bytes -> an upright RGB image -> the model's uint8 input. Runs in a worker thread, off the event loop."""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from model.preprocess import letterbox
from service import errors

# Pillow format name -> the media type clients send it as. Only these formats' plugins ever open a request.
# JPEG's also opens a JPEG with an MPF header (phone cameras add a depth or preview frame) as format MPO; it
# decodes as its first frame, like any JPEG.
FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "BMP": "image/bmp", "TIFF": "image/tiff"}
MEDIA_TYPES = sorted(set(FORMATS.values()) | {"image/jpg"})

TRANSPOSED = (5, 6, 7, 8)  # orientations whose upright image swaps width and height

# Our own pixel limit is checked from the header; Pillow's bomb check would fire first with its own error.
Image.MAX_IMAGE_PIXELS = None


@dataclass
class Decoded:
    input: torch.Tensor  # [3, H, W] uint8, letterboxed to the model's input size
    image_size: tuple[int, int]  # (h, w) of the picture inside the input
    orig_size: tuple[int, int]  # (h, w) of the upright original


def check_media_type(content_type: str | None) -> None:
    """Raw bodies must say which image type they are."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media not in MEDIA_TYPES:
        raise errors.unsupported_format(media or "a body without Content-Type", MEDIA_TYPES)


def to_rgb(img: Image.Image) -> np.ndarray:
    """[H, W, 3] uint8 of any mode: 16-bit and float images are scaled to 8 bits, alpha is dropped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0  # 0..65535 -> 0..255
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # a palette with transparency converts cleanly only through RGBA
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.array(img)  # a writable copy, as torch wants


def other_format(head: bytes) -> str | None:
    """The format outside the allow-list whose magic bytes `head` starts with, by Pillow's prefix checks alone:
    no plugin of a format we refuse ever parses a request."""
    Image.init()
    for fmt, (_, accept) in Image.OPEN.items():
        if fmt in FORMATS or accept is None:
            continue
        try:
            if accept(head):
                return fmt
        except Exception:  # a prefix too short for that format's check
            continue
    return None


def decode(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode an allowed format, refusing oversized images from their header, and apply EXIF orientation."""
    return pixels(open_image(data, max_pixels))


def decode_input(
    data: bytes, max_pixels: int, input_size: tuple[int, int], fill: tuple[float, float, float]
) -> Decoded:
    """decode() then prepare(), the server's path. A JPEG that the letterbox shrinks at least twofold decodes
    at libjpeg's reduced DCT scale, 1/2, 1/4 or 1/8 of each side and never below what the letterbox needs:
    a 12-megapixel photo then costs a fraction of its full decode, copies and resize, for pixels that differ
    from the full path's by about 0.2 levels on average (benchmarks/preprocess_vs_transformers.py). Results
    still come back at the original's size."""
    return decode_opened(open_image(data, max_pixels), input_size, fill)


def decode_opened(img: Image.Image, input_size: tuple[int, int], fill: tuple[float, float, float]) -> Decoded:
    """decode_input() for an image open_image() has opened (its header read, its size checked)."""
    if not isinstance(img, JpegImagePlugin.JpegImageFile):
        return prepare(pixels(img), input_size, fill)
    w, h = img.size
    turned = exif_orientation(img) in TRANSPOSED
    scale = min(input_size[0] / (w if turned else h), input_size[1] / (h if turned else w))
    if scale > 0.5:
        return prepare(pixels(img), input_size, fill)
    img.draft(None, (math.ceil(w * scale), math.ceil(h * scale)))  # the scale is the same in either orientation
    dw, dh = img.size
    rgb = pixels(img)
    if dw != dh:  # whether exif_transpose turned it, from the pixels themselves
        turned = rgb.shape[:2] == (dw, dh)
    return prepare(rgb, input_size, fill, orig_size=(w, h) if turned else (h, w))


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open an allowed format from its header alone, refusing an oversized image before decoding it."""
    if not data:
        raise errors.empty_body()
    try:
        img = Image.open(io.BytesIO(data), formats=list(FORMATS))  # reads the header only
    except UnidentifiedImageError:
        if found := other_format(data[:16]):
            raise errors.unsupported_format(found, sorted(FORMATS)) from None
        raise errors.bad_image("unknown format or corrupt header") from None
    except Exception as err:
        raise errors.bad_image(str(err)) from None
    w, h = img.size
    if w * h > max_pixels:
        raise errors.too_many_pixels(w, h, max_pixels)
    if w < 1 or h < 1:
        raise errors.bad_image(f"size {w}x{h}")
    return img


def exif_orientation(img: Image.Image) -> int:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return int(img.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # corrupt EXIF: exif_transpose will not turn the image either
        return 1


def pixels(img: Image.Image) -> np.ndarray:
    """Decode an opened image, upright (EXIF orientation applied), as [H, W, 3] uint8."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. corrupt EXIF; the pixels still decode
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # in place: no copy for the usual upright image
            return to_rgb(img)
    except Exception as err:  # corrupt data: Pillow's parsers raise OSError, but also TypeError, struct.error...
        raise errors.bad_image(str(err) or type(err).__name__) from None


def prepare(
    rgb: np.ndarray,
    input_size: tuple[int, int],
    fill: tuple[float, float, float],
    orig_size: tuple[int, int] | None = None,
) -> Decoded:
    """Letterbox to the model's input size in uint8, the graph's input type; `fill` is the model's mean.

    orig_size: the upright original's (h, w) when `rgb` was decoded smaller; results come back at that size."""
    image = torch.from_numpy(rgb).permute(2, 0, 1)  # a channels-last view, which the uint8 resize is fastest on
    boxed, inner = letterbox(image, input_size, fill)
    return Decoded(boxed, inner, orig_size or (rgb.shape[0], rgb.shape[1]))
