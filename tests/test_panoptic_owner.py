"""The blockwise panoptic owners (model/panoptic_owner.py) against resizing every mask to the output size."""

import pytest
import torch

import model.panoptic_owner as po
from model import resize_blocks
from model.postprocess import postprocess
from tests.test_postprocess import ISTHING, check_area_bbox, default_model_outputs, scene_outputs


def both_ways(monkeypatch, out, isthing, **kwargs):
    """(blockwise, direct) results of the same panoptic post-processing."""
    monkeypatch.setattr(resize_blocks, "BLOCKWISE_FROM", 0.0)
    (blockwise,) = postprocess(out, "panoptic", isthing, **kwargs)
    monkeypatch.setattr(resize_blocks, "BLOCKWISE_FROM", float("inf"))
    (direct,) = postprocess(out, "panoptic", isthing, **kwargs)
    return blockwise, direct


def assert_same(blockwise, direct):
    assert blockwise.segments == direct.segments
    assert torch.equal(blockwise.segment_map, direct.segment_map)
    check_area_bbox(blockwise)


# (image region inside the 256x320 input, original size): up both ways, one way only, and down one way
SCENE_SIZES = [((256, 320), (700, 900)), ((256, 300), (517, 333)), ((200, 320), (90, 1000)), ((256, 320), (256, 320))]


@pytest.mark.parametrize("image, orig", SCENE_SIZES)
def test_blockwise_owners_equal_the_resized_masks_on_a_scene(monkeypatch, image, orig):
    blockwise, direct = both_ways(
        monkeypatch, scene_outputs(), ISTHING, threshold=0.5, image_sizes=[image], orig_sizes=[orig]
    )
    assert len(blockwise.segments) >= 4
    assert_same(blockwise, direct)


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_blockwise_owners_of_wild_masks_in_parts(monkeypatch, chunk):
    """Random logits: masks cross zero everywhere, so most blocks are computed exactly, in small pixel chunks,
    and queries come in parts of `chunk`."""
    monkeypatch.setattr("model.postprocess.QUERY_CHUNK", chunk)
    monkeypatch.setattr(resize_blocks, "PIXEL_CHUNK", 999)
    torch.manual_seed(0)
    out = {"pred_logits": torch.randn(1, 40, 5) * 3, "pred_masks": torch.randn(1, 40, 64, 80) * 4}
    kwargs = {"threshold": 0.3, "overlap_threshold": 0.0, "image_sizes": [(256, 300)], "orig_sizes": [(400, 610)]}
    blockwise, direct = both_ways(monkeypatch, out, ISTHING, **kwargs)
    assert len(blockwise.segments) >= 5
    assert_same(blockwise, direct)


@pytest.mark.parametrize("orig", [(512, 512), (1080, 1920), (300, 1000)])
def test_blockwise_owners_on_the_default_model(monkeypatch, orig):
    model, out = default_model_outputs()
    computed = []
    blockwise_fn = po._blockwise

    def counting(*args):
        owners = blockwise_fn(*args)
        computed.append(len(owners.exact_at) / (orig[0] * orig[1]))
        return owners

    monkeypatch.setattr(po, "_blockwise", counting)
    for i in range(3):
        one = {k: v[i : i + 1] for k, v in out.items()}
        blockwise, direct = both_ways(monkeypatch, one, model.info.isthing, orig_sizes=[orig])
        assert len(blockwise.segments) >= 2
        assert_same(blockwise, direct)
    # the point of the blocks: few output pixels need their resized logits
    assert 0 < max(computed) < 0.1
