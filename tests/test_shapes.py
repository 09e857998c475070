"""The shapes dataset follows spec v1: classes, VOID rule, determinism, and the COCO panoptic encoding."""

import colorsys
import json

import numpy as np
import pytest

from model.data.coco_panoptic import CocoPanoptic, rgb_to_id
from model.data.shapes import MIN_THING_PIXELS, SIZE, generate, id_to_rgb, write_split


@pytest.mark.parametrize("seed", [0, 1, 7, 1_000_000])
def test_spec_properties(seed):
    s = generate(seed)
    assert s.image.shape == (SIZE, SIZE, 3) and s.image.dtype == np.uint8
    ids = [seg["id"] for seg in s.segments]
    assert len(ids) == len(set(ids)) and set(np.unique(s.segment_map)) <= set(ids) | {0}
    for seg in s.segments:
        mask = s.segment_map == seg["id"]
        assert 1 <= seg["category_id"] <= 5 and seg["iscrowd"] == 0
        assert seg["area"] == mask.sum() > 0
        if seg["category_id"] <= 2:
            assert seg["id"] == seg["category_id"]  # stuff ids are fixed
        else:
            assert seg["area"] >= MIN_THING_PIXELS
        rows, cols = np.nonzero(mask)
        assert seg["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]
    things = [seg["id"] for seg in s.segments if seg["category_id"] > 2]
    assert things == list(range(3, 3 + len(things))) and len(things) <= 6


def test_stuff_colours_follow_the_spec():
    for seed in range(10):
        s = generate(seed)
        for seg in s.segments:
            if seg["category_id"] > 2:
                continue
            # the median colour of the region removes the noise (sigma 6) and keeps the drawn colour
            r, g, b = np.median(s.image[s.segment_map == seg["id"]], axis=0) / 255
            h, sat, v = colorsys.rgb_to_hsv(r, g, b)
            lo, hi = (190, 230) if seg["category_id"] == 1 else (20, 140)
            assert lo - 3 <= h * 360 <= hi + 3 and 0.25 <= sat <= 0.85 and 0.25 <= v <= 1.0


def test_small_things_are_void(monkeypatch):
    """VOID pixels are exactly the visible pixels of things with fewer than 64 of them."""
    import model.data.shapes as shapes

    for seed in (85, 128, 215, 309):  # seeds whose images have a VOID thing
        s = generate(seed)
        monkeypatch.setattr(shapes, "MIN_THING_PIXELS", 0)  # the same image with every thing annotated
        everything = generate(seed)
        monkeypatch.setattr(shapes, "MIN_THING_PIXELS", MIN_THING_PIXELS)
        assert np.array_equal(everything.image, s.image)
        small = [seg["id"] for seg in everything.segments if seg["category_id"] > 2 and seg["area"] < MIN_THING_PIXELS]
        assert small and (s.segment_map == 0).any(), seed
        assert np.array_equal(s.segment_map == 0, np.isin(everything.segment_map, small))


def test_deterministic_per_seed_and_different_across_seeds():
    a, b, c = generate(42), generate(42), generate(43)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.segment_map, b.segment_map)
    assert a.segments == b.segments
    assert not np.array_equal(a.image, c.image)


def test_written_split_round_trips_through_the_loader(tmp_path):
    path = write_split(tmp_path, "val", 3, 1_000_000)
    doc = json.loads(path.read_text())
    assert [c["name"] for c in doc["categories"]] == ["sky", "ground", "circle", "square", "triangle"]
    assert [im["id"] for im in doc["images"]] == [1_000_000, 1_000_001, 1_000_002]
    ds = CocoPanoptic(tmp_path / "images" / "val", path, tmp_path / "panoptic_val")
    image, ids, segments = ds.load(1)
    s = generate(1_000_001)
    assert np.array_equal(image, s.image) and np.array_equal(ids, s.segment_map)
    x, target = ds[1]
    assert x.shape == (3, 256, 256) and target["masks"].shape[0] == len(s.segments)
    assert target["labels"].tolist() == [seg["category_id"] - 1 for seg in s.segments]
    assert np.array_equal(rgb_to_id(id_to_rgb(np.array([[0, 5, 70000]]))), [[0, 5, 70000]])
