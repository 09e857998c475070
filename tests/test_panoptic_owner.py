"""The blockwise panoptic owners (model/panoptic_owner.py) against resizing every mask to the output size."""

import pytest
import torch

import model.panoptic_owner as po
from model import resize_blocks
from tests.test_postprocess import ISTHING, check_area_bbox, scene_outputs
from tests.test_resize_blocks import default_model_both_ways, postprocess_both_ways


def assert_same(blockwise, direct):
    assert blockwise.segments == direct.segments
    assert torch.equal(blockwise.segment_map, direct.segment_map)
    check_area_bbox(blockwise)


# (image region inside the 256x320 input, original size): up both ways, one way only, and down one way
SCENE_SIZES = [((256, 320), (700, 900)), ((256, 300), (517, 333)), ((200, 320), (90, 1000)), ((256, 320), (256, 320))]


@pytest.mark.parametrize("image, orig", SCENE_SIZES)
def test_blockwise_owners_equal_the_resized_masks_on_a_scene(monkeypatch, image, orig):
    blockwise, direct = postprocess_both_ways(
        monkeypatch, scene_outputs(), "panoptic", ISTHING, threshold=0.5, image_sizes=[image], orig_sizes=[orig]
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
    blockwise, direct = postprocess_both_ways(monkeypatch, out, "panoptic", ISTHING, **kwargs)
    assert len(blockwise.segments) >= 5
    assert_same(blockwise, direct)


@pytest.mark.parametrize("orig", [(512, 512), (1080, 1920), (300, 1000)])
def test_blockwise_owners_on_the_default_model(monkeypatch, orig):
    computed = []
    blockwise_fn = po._blockwise

    def counting(*args):
        owners = blockwise_fn(*args)
        computed.append(len(owners.exact_at) / (orig[0] * orig[1]))
        return owners

    monkeypatch.setattr(po, "_blockwise", counting)
    for blockwise, direct in default_model_both_ways(monkeypatch, "panoptic", orig):
        assert len(blockwise.segments) >= 2
        assert_same(blockwise, direct)
    # the point of the blocks: few output pixels need their resized logits
    assert 0 < max(computed) < 0.1
