"""Pictures of a result: masks alpha-blended in a per-class palette, thing outlines, labels and a legend.

The palette and the blend are integer-exact and mirrored by the demo page (service/static/index.html),
so the browser's canvas and these PNGs agree pixel for pixel (tested).
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import distance_transform_edt

ALPHA = 140  # mask opacity in 1/256 steps (about 0.55)
GOLDEN = 0.618033988749895  # consecutive class ids get far-apart hues


class Drawable(Protocol):
    label_id: int
    label: str
    score: float
    isthing: bool
    mask: np.ndarray  # [H, W] bool or 0/1


def color(label_id: int) -> tuple[int, int, int]:
    """The class's colour: the same for a class id in every image, every run and on the demo page."""
    hue = (label_id * GOLDEN + 0.12) % 1.0
    saturation = 0.85 if label_id % 2 else 0.65
    value = 0.95 if label_id % 3 else 0.8
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
    return int(r * 255 + 0.5), int(g * 255 + 0.5), int(b * 255 + 0.5)


def blend(pixels: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    """`pixels` [..., 3] uint8 with ALPHA/256 of the colour mixed in, rounded (the page does the same)."""
    mixed = pixels.astype(np.uint16) * (256 - ALPHA) + np.array(rgb, np.uint16) * ALPHA + 128
    return (mixed >> 8).astype(np.uint8)


def outline(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask; the image border does not count as outside."""
    p = np.pad(mask, 1, mode="edge")
    interior = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~interior


def as_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an [H, W, 3] uint8 RGB array, got {arr.dtype} {arr.shape}")
    return arr


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled font: nothing to install


def _anchor(mask: np.ndarray) -> tuple[int, int]:
    """The mask's most interior pixel (x, y), found on a subsampled mask so large images stay quick.

    A thin mask can miss every subsampled pixel; it is then searched at full resolution within its bounding
    box (a thin mask's box is small in one direction, so this stays quick too)."""
    step = max(1, max(mask.shape) // 256)
    small = np.pad(mask[::step, ::step], 1)
    if small.any():
        y, x = np.unravel_index(np.argmax(distance_transform_edt(small)), small.shape)
        return int(x - 1) * step, int(y - 1) * step
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("an empty mask has no anchor")
    top, left = int(ys.min()), int(xs.min())
    depth = distance_transform_edt(np.pad(mask[top : int(ys.max()) + 1, left : int(xs.max()) + 1], 1))
    deepest = np.argwhere(depth == depth.max())  # a line is equally deep all along: take its middle
    y, x = deepest[len(deepest) // 2]
    return left + int(x) - 1, top + int(y) - 1


def overlay(
    image: Image.Image | np.ndarray, segments: Sequence[Drawable], outlines: bool = True, labels: bool = True
) -> Image.Image:
    """The image with every segment's mask blended in its class colour.

    Segments are drawn last to first, so with overlapping instance masks the first (highest-scoring) one
    ends on top. `outlines` traces thing segments (panoptic and instance results); `labels` writes
    "label score" at each segment's most interior point.
    """
    out = as_rgb(image).copy()
    for seg in reversed(segments):
        mask = seg.mask.astype(bool)
        if mask.shape != out.shape[:2]:
            raise ValueError(f"a {mask.shape} mask does not fit a {out.shape[:2]} image")
        out[mask] = blend(out[mask], color(seg.label_id))
        if outlines and seg.isthing:
            out[outline(mask)] = color(seg.label_id)
    picture = Image.fromarray(out)
    if labels:
        _write_labels(picture, segments)
    return picture


def _write_labels(picture: Image.Image, segments: Sequence[Drawable]) -> None:
    draw = ImageDraw.Draw(picture)
    font = _font(max(10, min(picture.size) // 28))
    for seg in segments:
        mask = seg.mask.astype(bool)
        if not mask.any():
            continue
        x, y = _anchor(mask)
        text = f"{seg.label} {seg.score:.2f}"
        left, top, right, bottom = draw.textbbox((x, y), text, font=font, anchor="mm")
        # Keep the label inside the picture, on a dark box so it reads on any colour.
        dx = max(0, -left + 1) - max(0, right - picture.width + 1)
        dy = max(0, -top + 1) - max(0, bottom - picture.height + 1)
        draw.rectangle((left + dx - 2, top + dy - 1, right + dx + 2, bottom + dy + 1), fill=(0, 0, 0))
        draw.text((x + dx, y + dy), text, fill=(255, 255, 255), font=font, anchor="mm")


def legend(classes: Sequence[tuple[int, str]], row_height: int = 18) -> Image.Image:
    """A white panel with one colour swatch and name per (label_id, label), in the given order."""
    font = _font(row_height - 5)
    width = 12 + row_height + max((int(font.getlength(name)) for _, name in classes), default=0)
    panel = Image.new("RGB", (width + 8, 8 + row_height * len(classes)), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    for i, (label_id, name) in enumerate(classes):
        top = 4 + i * row_height
        draw.rectangle((6, top + 2, 4 + row_height - 2, top + row_height - 2), fill=color(label_id), outline=(0, 0, 0))
        draw.text((10 + row_height, top + row_height // 2), name, fill=(0, 0, 0), font=font, anchor="lm")
    return panel


def render(
    image: Image.Image | np.ndarray, segments: Sequence[Drawable], outlines: bool = True, labels: bool = True
) -> Image.Image:
    """The overlay with a legend of the classes present to its right (the picture `maskformer predict` writes)."""
    picture = overlay(image, segments, outlines, labels)
    classes = sorted({(s.label_id, s.label) for s in segments})
    if not classes:
        return picture
    panel = legend(classes)
    canvas = Image.new("RGB", (picture.width + panel.width, max(picture.height, panel.height)), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    canvas.paste(panel, (picture.width, 0))
    return canvas
