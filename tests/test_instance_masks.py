"""Instance masks resized only inside each mask's window (model/instance_masks.py) against resizing them whole."""

import pytest
import torch
import torch.nn.functional as F

from model.resize_blocks import BlockGrid, pad_edges
from tests.test_postprocess import ISTHING, check_area_bbox
from tests.test_resize_blocks import default_model_both_ways, postprocess_both_ways


@pytest.mark.parametrize("source, out", [((20, 24), (90, 70)), ((64, 48), (1080, 1920)), ((33, 17), (20, 100))])
def test_a_window_resizes_as_the_pixels_do(source, out):
    torch.manual_seed(0)
    x = torch.randn(2, *source) * 10
    grid = BlockGrid.of(source, out, x.device)
    ys, xs = slice(out[0] // 3, out[0] - 1), slice(1, out[1] // 2)
    window = grid.resize_window(pad_edges(x), ys, xs)
    yy, xx = torch.meshgrid(torch.arange(out[0])[ys], torch.arange(out[1])[xs], indexing="ij")
    at = (yy * out[1] + xx).flatten()
    assert torch.equal(window.flatten(1), grid.resize_at(pad_edges(x), at))
    whole = F.interpolate(x[None], size=out, mode="bilinear", align_corners=False)[0][:, ys, xs]
    assert torch.allclose(window, whole, rtol=0, atol=1e-6 * float(x.abs().max()))


def assert_same(windowed, whole):
    assert [(s.label_id, s.area, s.bbox) for s in windowed.segments] == [
        (s.label_id, s.area, s.bbox) for s in whole.segments
    ]
    # the same pixels' probabilities, summed over the window's rows rather than whole rows
    assert [s.score for s in windowed.segments] == pytest.approx([s.score for s in whole.segments], rel=1e-6)
    assert torch.equal(windowed.masks, whole.masks)
    check_area_bbox(windowed)


@pytest.mark.parametrize("orig", [(512, 512), (1080, 1920), (300, 1000), (90, 2000)])
def test_windowed_masks_equal_whole_ones_on_the_default_model(monkeypatch, orig):
    """Threshold 0: every query's mask, empty ones included."""
    for windowed, whole in default_model_both_ways(monkeypatch, "instance", orig, threshold=0.0):
        assert len(windowed.segments) >= 2
        assert_same(windowed, whole)


@pytest.mark.parametrize("chunk", [1, 5])
def test_windowed_masks_of_random_logits_in_parts(monkeypatch, chunk):
    monkeypatch.setattr("model.postprocess.QUERY_CHUNK", chunk)
    torch.manual_seed(1)
    logits, masks = torch.randn(24, 5) * 3, torch.randn(24, 64, 80) * 4 - 6  # mostly below 0: small windows
    out = {"pred_logits": logits[None], "pred_masks": masks[None]}
    kwargs = {"image_sizes": [(256, 300)], "orig_sizes": [(700, 610)]}
    windowed, whole = postprocess_both_ways(monkeypatch, out, "instance", ISTHING, **kwargs)
    assert len(windowed.segments) >= 10
    assert_same(windowed, whole)
