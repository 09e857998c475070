"""The synthetic shapes dataset, spec v1: deterministic from a seed, written in COCO panoptic format.

Spec v1 (other tools rely on it; change it only with a new version):
  - 256x256 RGB. Pixel (x, y) has integer coordinates, x to the right, y down, both 0..255.
  - Horizon y = h0 + s*(x - 128), h0 ~ U[0.3, 0.7]*256, s ~ U[-0.3, 0.3]. Pixels with y < horizon are
    `sky` (stuff; HSV hue 190-230 deg, saturation 0.3-0.7, value 0.6-1.0), the rest `ground` (stuff;
    hue 20-140, saturation 0.3-0.8, value 0.3-0.7). One colour each.
  - n ~ U{1..6} things drawn in order, later ones occluding earlier ones. Each: kind ~ U{circle, square,
    triangle}, d ~ U[24, 72], centre (cx, cy) ~ U[0, 256)^2, rotation theta, colour hue ~ U[0, 360),
    saturation ~ U[0.6, 1.0], value ~ U[0.5, 1.0].
      circle:   (x-cx)^2 + (y-cy)^2 <= (d/2)^2                              (theta drawn, unused)
      square:   side d, rotated by theta ~ U[0, 90) deg
      triangle: equilateral, circumscribed-circle diameter d, vertices at theta + k*120 deg, theta ~ U[0, 120)
  - Gaussian noise sigma 6 on every channel of every pixel, rounded and clipped to 0..255.
  - A thing left with < 64 visible pixels is annotated VOID (0); it still hides what is beneath it.
  - Categories: 1 sky, 2 ground (stuff); 3 circle, 4 square, 5 triangle (things).
  - Random draws come from numpy.random.default_rng(seed) in exactly this order: h0, s, sky (h, s, v),
    ground (h, s, v), n, then per thing (kind, d, cx, cy, theta, hue, saturation, value), then the noise
    as one normal(0, 6, (256, 256, 3)) array.
  - Segment ids: 1 sky, 2 ground, then 3, 4, ... for the visible things in drawing order.
"""

from __future__ import annotations

import colorsys
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPEC_VERSION = 1
SIZE = 256
MIN_THING_PIXELS = 64
CATEGORIES = [
    {"id": 1, "name": "sky", "isthing": 0, "color": [135, 190, 235]},
    {"id": 2, "name": "ground", "isthing": 0, "color": [120, 100, 60]},
    {"id": 3, "name": "circle", "isthing": 1, "color": [220, 60, 60]},
    {"id": 4, "name": "square", "isthing": 1, "color": [60, 180, 75]},
    {"id": 5, "name": "triangle", "isthing": 1, "color": [70, 90, 220]},
]
KINDS = ("circle", "square", "triangle")

# Seeds: training image i uses TRAIN_SEED + i, validation image i uses VAL_SEED + i; the ranges never meet
# for fewer than 10^6 training images.
TRAIN_SEED = 0
VAL_SEED = 1_000_000


@dataclass
class ShapesSample:
    image: np.ndarray  # [256, 256, 3] uint8 RGB
    segment_map: np.ndarray  # [256, 256] int32 segment ids, 0 = VOID
    segments: list[dict]  # COCO panoptic segments_info: id, category_id, iscrowd, area, bbox


def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h_deg / 360.0, s, v)) * 255.0


def _thing_mask(kind: str, d: float, cx: float, cy: float, theta: float, xs: np.ndarray, ys: np.ndarray):
    dx, dy = xs - cx, ys - cy
    if kind == "circle":
        return dx**2 + dy**2 <= (d / 2) ** 2
    t = np.deg2rad(theta)
    if kind == "square":
        u = dx * np.cos(t) + dy * np.sin(t)
        v = -dx * np.sin(t) + dy * np.cos(t)
        return (np.abs(u) <= d / 2) & (np.abs(v) <= d / 2)
    # triangle: inside all three edges' half-planes (edge normals point away from the centre)
    r = d / 2
    inside = np.ones_like(xs, dtype=bool)
    for k in range(3):
        a = t + np.pi / 3 + k * 2 * np.pi / 3  # direction of the edge's outward normal
        inside &= dx * np.cos(a) + dy * np.sin(a) <= r / 2  # edges lie at the inradius r/2
    return inside


def generate(seed: int) -> ShapesSample:
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    h0 = rng.uniform(0.3, 0.7) * SIZE
    slope = rng.uniform(-0.3, 0.3)
    sky_colour = _hsv(rng.uniform(190, 230), rng.uniform(0.3, 0.7), rng.uniform(0.6, 1.0))
    ground_colour = _hsv(rng.uniform(20, 140), rng.uniform(0.3, 0.8), rng.uniform(0.3, 0.7))
    sky = ys < h0 + slope * (xs - 128)

    image = np.where(sky[..., None], sky_colour, ground_colour)
    owner = np.where(sky, -1, -2)  # -1 sky, -2 ground, k >= 0 thing k
    things = []
    for k in range(int(rng.integers(1, 7))):
        kind = KINDS[int(rng.integers(0, 3))]
        d = rng.uniform(24, 72)
        cx, cy = rng.uniform(0, SIZE), rng.uniform(0, SIZE)
        theta = rng.uniform(0, 90) if kind != "triangle" else rng.uniform(0, 120)
        colour = _hsv(rng.uniform(0, 360), rng.uniform(0.6, 1.0), rng.uniform(0.5, 1.0))
        mask = _thing_mask(kind, d, cx, cy, theta, xs, ys)
        image[mask] = colour
        owner[mask] = k
        things.append(kind)
    noise = rng.normal(0.0, 6.0, (SIZE, SIZE, 3))
    image = np.clip(np.round(image + noise), 0, 255).astype(np.uint8)

    segment_map = np.zeros((SIZE, SIZE), np.int32)
    segments: list[dict] = []

    def add(mask: np.ndarray, category: int, sid: int) -> None:
        segment_map[mask] = sid
        rows, cols = np.nonzero(mask)
        bbox = [int(cols.min()), int(rows.min()), int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1)]
        segments.append({"id": sid, "category_id": category, "iscrowd": 0, "area": int(mask.sum()), "bbox": bbox})

    for owner_id, category in ((-1, 1), (-2, 2)):
        if (owner == owner_id).any():
            add(owner == owner_id, category, sid=category)
    next_id = 3
    for k, kind in enumerate(things):
        visible = owner == k
        if visible.sum() >= MIN_THING_PIXELS:
            add(visible, 3 + KINDS.index(kind), next_id)
            next_id += 1
    return ShapesSample(image, segment_map, segments)


def id_to_rgb(segment_map: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG encoding: id = R + 256*G + 256^2*B."""
    return np.stack([segment_map % 256, segment_map // 256 % 256, segment_map // 65536], -1).astype(np.uint8)


def write_split(out: str | Path, split: str, num_images: int, first_seed: int) -> Path:
    """Write images/<split>/, panoptic_<split>/ PNGs and panoptic_<split>.json; returns the JSON path."""
    from PIL import Image
    from tqdm import tqdm

    out = Path(out)
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    (out / f"panoptic_{split}").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in tqdm(range(num_images), desc=f"shapes {split}", unit="img"):
        seed = first_seed + i
        sample = generate(seed)
        name = f"{seed:08d}"
        Image.fromarray(sample.image).save(out / "images" / split / f"{name}.png")
        Image.fromarray(id_to_rgb(sample.segment_map)).save(out / f"panoptic_{split}" / f"{name}.png")
        images.append({"id": seed, "file_name": f"{name}.png", "width": SIZE, "height": SIZE})
        annotations.append({"image_id": seed, "file_name": f"{name}.png", "segments_info": sample.segments})
    info = {"description": f"synthetic shapes, spec v{SPEC_VERSION}", "first_seed": first_seed}
    doc = {"info": info, "images": images, "annotations": annotations, "categories": CATEGORIES}
    path = out / f"panoptic_{split}.json"
    path.write_text(json.dumps(doc))
    return path
