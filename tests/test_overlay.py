"""Overlay pictures: the palette, blended masks, outlines, labels and legend on a shapes image whose segments
are known exactly (the generator's own segment map)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from model.data.shapes import CATEGORIES, VAL_SEED, generate
from service import overlay


@dataclass
class Seg:
    label_id: int
    label: str
    score: float
    isthing: bool
    mask: np.ndarray


def known_segments(seed: int) -> tuple[np.ndarray, list[Seg]]:
    sample = generate(seed)
    names = {c["id"]: (c["name"], bool(c["isthing"])) for c in CATEGORIES}
    segments = []
    for s in sample.segments:
        name, isthing = names[s["category_id"]]
        segments.append(Seg(s["category_id"] - 1, name, 0.9, isthing, sample.segment_map == s["id"]))
    return sample.image, segments


def test_palette_is_pinned_and_distinct():
    # Pinned: the demo page computes the same colours in JavaScript, and people learn them.
    assert [overlay.color(i) for i in range(3)] == [(204, 167, 71), (125, 36, 242), (85, 242, 106)]
    assert len({overlay.color(i) for i in range(150)}) == 150  # ADE20K's classes all differ


@pytest.mark.parametrize("seed", [VAL_SEED, VAL_SEED + 7])
def test_masks_are_blended_in_their_class_colour(seed):
    image, segments = known_segments(seed)
    picture = np.asarray(overlay.overlay(image, segments, outlines=True, labels=False))
    covered = np.zeros(image.shape[:2], bool)
    for seg in segments:
        edge = overlay.outline(seg.mask) if seg.isthing else np.zeros_like(seg.mask)
        inside = seg.mask & ~edge
        expected = overlay.blend(image[inside], overlay.color(seg.label_id))
        np.testing.assert_array_equal(picture[inside], expected, seg.label)
        assert (picture[edge] == overlay.color(seg.label_id)).all(), f"{seg.label} outline"
        covered |= seg.mask
    np.testing.assert_array_equal(picture[~covered], image[~covered])  # VOID pixels stay as they were


def test_labels_and_legend():
    image, segments = known_segments(VAL_SEED)
    plain = np.asarray(overlay.overlay(image, segments, outlines=False, labels=False))
    labelled = np.asarray(overlay.overlay(image, segments, outlines=False, labels=True))
    for seg in segments:
        changed = (plain[seg.mask] != labelled[seg.mask]).any(-1)
        assert changed.any(), f"{seg.label} has no label"
        assert seg.mask.sum() < 1000 or changed.mean() < 0.5, f"the {seg.label} label hides most of a large segment"
    picture = overlay.render(image, segments)
    assert picture.height == image.shape[0] and picture.width > image.shape[1]
    panel = np.asarray(picture)[:, image.shape[1] :]
    for label_id in sorted({s.label_id for s in segments}):
        assert (panel == overlay.color(label_id)).all(-1).sum() >= 50, f"no legend swatch for class {label_id}"


def test_bad_input_is_refused():
    image, segments = known_segments(VAL_SEED)
    with pytest.raises(ValueError, match="does not fit"):
        overlay.overlay(image[:100], segments)
    with pytest.raises(ValueError, match="uint8 RGB"):
        overlay.overlay(image.astype(np.float32), segments)


@pytest.mark.parametrize("shape", [(1000, 1000), (600, 2000)])
def test_a_thin_mask_on_a_large_image_gets_its_label_on_the_mask(shape):
    # Subsampled every few pixels, a one-pixel line can vanish; its label must still land on it, not at (0, 0).
    h, w = shape
    step = max(shape) // 256
    vertical = np.zeros(shape, bool)
    vertical[100 : h - 100, step * 50 + 1] = True
    horizontal = np.zeros(shape, bool)
    horizontal[step * 40 + 1, 200 : w - 200] = True
    for mask in (vertical, horizontal):
        assert not mask[::step, ::step].any()  # the case: nothing left after subsampling
        x, y = overlay._anchor(mask)
        assert mask[y, x], (x, y)
    image = np.full((h, w, 3), 90, np.uint8)
    seg = Seg(3, "pole", 0.9, True, vertical)
    plain = np.asarray(overlay.overlay(image, [seg], outlines=False, labels=False))
    labelled = np.asarray(overlay.overlay(image, [seg], outlines=False, labels=True))
    ys, xs = np.nonzero((plain != labelled).any(-1))
    # the label box sits on the middle of the line
    assert abs(np.median(xs) - (step * 50 + 1)) < 20 and abs(np.median(ys) - h / 2) < 20, (np.median(xs), np.median(ys))
