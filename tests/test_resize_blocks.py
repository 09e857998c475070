"""The blocks a bilinear resize reads (model/resize_blocks.py) and the blockwise semantic resize built on them."""

import pytest
import torch
import torch.nn.functional as F

from model import resize_blocks
from model.postprocess import postprocess
from model.resize_blocks import BlockGrid, pad_edges, resize
from model.semantic_map import semantic_map
from tests.test_postprocess import ISTHING, check_area_bbox, default_model_outputs, scene_outputs

# (source, output, bit-equal to F.interpolate on a CPU): equal where each axis grows or halves; where one
# shrinks by another factor torch's kernel rounds differently somewhere, in the last bit
SIZES = [
    ((20, 24), (90, 70), True),
    ((64, 48), (1080, 1920), True),
    ((256, 256), (90, 2000), True),
    ((20, 24), (10, 200), True),
    ((33, 17), (20, 100), False),
    ((1, 5), (7, 3), False),
    ((8, 8), (8, 8), True),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("source, out, bit_equal", SIZES)
def test_a_blocks_pixels_resized_at_equal_the_resize(source, out, bit_equal, threads):
    # 3 maps: on 1 thread torch resizes exactly 3 with another kernel, which resize() steps around
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(3, *source) * 10
    grid = BlockGrid.of(source, out, x.device)
    assert grid.pixels().sum() == out[0] * out[1]
    everything = torch.arange(out[0] * out[1])
    want = resize(x, out)
    if threads > 1:  # torch's own resize then takes the kernel resize() keeps to
        assert torch.equal(want, F.interpolate(x[None], size=out, mode="bilinear", align_corners=False)[0])
    got = grid.resize_at(pad_edges(x), everything).view(3, *out)
    if bit_equal:
        assert torch.equal(got, want)
    else:  # within float32 rounding of the largest input
        assert torch.allclose(got, want, rtol=0, atol=1e-6 * float(x.abs().max()))
    # every block's pixels, once: the rectangles tile the output
    chosen = torch.rand(source) < 0.5
    at = grid.pixels_of(chosen)
    assert len(at) == len(at.unique())
    assert torch.equal(at.sort().values, grid.expand(chosen).flatten().nonzero().flatten())


def both_ways(monkeypatch, run):
    """(blockwise, direct): what `run()` returns with the blocks forced on, then off."""
    monkeypatch.setattr(resize_blocks, "BLOCKWISE_FROM", 0.0)
    blockwise = run()
    monkeypatch.setattr(resize_blocks, "BLOCKWISE_FROM", float("inf"))
    return blockwise, run()


def postprocess_both_ways(monkeypatch, out, task, isthing, **kwargs):
    """(blockwise, direct) results of the same one-image post-processing."""
    return both_ways(monkeypatch, lambda: postprocess(out, task, isthing, **kwargs)[0])


def default_model_both_ways(monkeypatch, task, orig, **kwargs):
    """(blockwise, direct) results for the shipped model's outputs on three validation images."""
    model, out = default_model_outputs()
    images = [{k: v[i : i + 1] for k, v in out.items()} for i in range(3)]
    isthing = model.info.isthing
    return [postprocess_both_ways(monkeypatch, one, task, isthing, orig_sizes=[orig], **kwargs) for one in images]


def assert_same_semantic(blockwise, direct):
    assert torch.equal(blockwise.segment_map, direct.segment_map)
    assert [(s.id, s.label_id, s.area, s.bbox) for s in blockwise.segments] == [
        (s.id, s.label_id, s.area, s.bbox) for s in direct.segments
    ]
    # mean scores: the same pixels' scores, summed per block rather than pixel by pixel
    for a, b in zip(blockwise.segments, direct.segments):
        assert a.score == pytest.approx(b.score, rel=1e-5)
    check_area_bbox(blockwise)


@pytest.mark.parametrize("orig", [(512, 512), (1080, 1920), (300, 1000), (90, 2000)])
def test_blockwise_semantic_equals_resizing_every_class_sum_on_the_default_model(monkeypatch, orig):
    for blockwise, direct in default_model_both_ways(monkeypatch, "semantic", orig):
        assert len(blockwise.segments) >= 2
        assert_same_semantic(blockwise, direct)


def test_blockwise_semantic_of_random_logits_and_a_scene(monkeypatch):
    """Random logits: class sums nearly tie, so few blocks settle and the exact pixels (in small chunks) do
    most of the work; the scene crops padding and shrinks one axis."""
    monkeypatch.setattr(resize_blocks, "PIXEL_CHUNK", 777)
    torch.manual_seed(3)
    logits, masks = torch.randn(20, 31) * 0.1, torch.randn(20, 16, 16) * 12
    blockwise, direct = both_ways(monkeypatch, lambda: semantic_map(logits, masks, (64, 64), (64, 48), (300, 200)))
    assert torch.equal(blockwise.label_map(), direct.label_map())
    assert torch.equal(blockwise.scores, direct.scores)
    kwargs = {"image_sizes": [(200, 320)], "orig_sizes": [(150, 1100)], "max_segments": 3}
    blockwise, direct = postprocess_both_ways(monkeypatch, scene_outputs(), "semantic", ISTHING, **kwargs)
    assert len(blockwise.segments) == 3 and int((blockwise.segment_map == 0).sum()) > 0
    assert_same_semantic(blockwise, direct)


def test_blockwise_semantic_settles_most_blocks_of_a_trained_model():
    model, out = default_model_outputs(1)
    size = model.cfg.input_size
    result = semantic_map(out["pred_logits"][0], out["pred_masks"][0], size, size, (1080, 1920))
    assert 0 < len(result.exact_at) < 0.1 * 1080 * 1920
