"""Matcher against brute force, and the loss against values worked out by hand."""

import itertools
import math

import torch
import torch.nn.functional as F

from model.criterion import SetCriterion
from model.matcher import HungarianMatcher


def direct_cost(logits, masks, labels, tgt_masks):
    """The matching cost written out pair by pair (targets already at mask resolution)."""
    prob = logits.softmax(-1)
    q, t = logits.shape[0], len(labels)
    cost = torch.zeros(q, t)
    for i in range(q):
        x = masks[i].flatten()
        for j in range(t):
            y = tgt_masks[j].flatten().float()
            p = x.sigmoid()
            ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
            p_t = p * y + (1 - p) * (1 - y)
            focal = ((0.25 * y + 0.75 * (1 - y)) * (1 - p_t) ** 2 * ce).mean()
            dice = 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
            cost[i, j] = -prob[i, labels[j]] + 20 * focal + dice
    return cost


def test_matcher_finds_the_brute_force_optimum():
    matcher = HungarianMatcher()
    for trial in range(20):
        g = torch.Generator().manual_seed(trial)
        q, t = 5, int(torch.randint(1, 5, (), generator=g))
        logits = torch.randn(1, q, 4, generator=g) * 2
        masks = torch.randn(1, q, 6, 6, generator=g) * 3
        target = {"labels": torch.randint(0, 3, (t,), generator=g), "masks": torch.rand(t, 6, 6, generator=g) > 0.5}
        cost = direct_cost(logits[0], masks[0], target["labels"], target["masks"])
        torch.testing.assert_close(
            matcher.cost_matrix(logits[0], masks[0], target["labels"], target["masks"]), cost, rtol=1e-5, atol=1e-5
        )
        ((rows, cols),) = matcher({"pred_logits": logits, "pred_masks": masks}, [target])
        best = min(sum(cost[p[j], j] for j in range(t)) for p in itertools.permutations(range(q), t))
        assert len(set(rows.tolist())) == t
        assert math.isclose(float(cost[rows, cols].sum()), float(best), rel_tol=1e-6)


def test_matcher_resizes_targets_to_mask_resolution():
    matcher = HungarianMatcher()
    big = torch.zeros(1, 8, 8, dtype=torch.bool)
    big[0, :4] = True
    logits = torch.zeros(2, 3)
    masks = torch.full((2, 2, 2), -5.0)
    masks[1, 0] = 5.0  # query 1 predicts the top half
    cost = matcher.cost_matrix(logits, masks, torch.tensor([0]), big)
    assert cost[1, 0] < cost[0, 0]


def test_loss_matches_hand_computed_values():
    # one target (class 0, the top-left pixel of a 2x2 image); query 0 predicts it, query 1 "no object"
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 2.0]]])
    masks = torch.tensor([[[[3.0, -3.0], [-3.0, -3.0]], [[0.0, 0.0], [0.0, 0.0]]]])
    target = {"labels": torch.tensor([0]), "masks": torch.tensor([[[True, False], [False, False]]])}
    losses = SetCriterion(num_classes=2)({"pred_logits": logits, "pred_masks": masks}, [target])

    e2 = math.exp(2)
    p = e2 / (e2 + 2)  # softmax probability of the right class for both queries
    ce = (1.0 * -math.log(p) + 0.1 * -math.log(p)) / (1.0 + 0.1)  # no-object weight 0.1
    s3 = 1 / (1 + math.exp(-3))
    focal = (0.25 + 3 * 0.75) * (1 - s3) ** 2 * -math.log(s3) / 4  # 4 pixels, 1 mask
    dice = 1 - (2 * s3 + 1) / (s3 + 3 * (1 - s3) + 1 + 1)
    assert math.isclose(losses["loss_ce"].item(), ce, rel_tol=1e-5)
    assert math.isclose(losses["loss_focal"].item(), focal, rel_tol=1e-5)
    assert math.isclose(losses["loss_dice"].item(), dice, rel_tol=1e-5)
    assert math.isclose(losses["loss"].item(), ce + 20 * focal + dice, rel_tol=1e-5)


def test_deep_supervision_adds_every_layer_and_empty_targets_work():
    g = torch.Generator().manual_seed(0)
    out = {"pred_logits": torch.randn(2, 4, 3, generator=g), "pred_masks": torch.randn(2, 4, 4, 4, generator=g)}
    out["aux_outputs"] = [{k: v.clone() for k, v in out.items()} for _ in range(2)]
    targets = [
        {"labels": torch.tensor([1]), "masks": torch.ones(1, 8, 8, dtype=torch.bool)},
        {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 8, 8, dtype=torch.bool)},
    ]
    losses = SetCriterion(num_classes=2)(out, targets)
    assert {"loss_ce_0", "loss_focal_1", "loss_dice_1"} <= set(losses)
    final = losses["loss_ce"] + 20 * losses["loss_focal"] + losses["loss_dice"]
    torch.testing.assert_close(losses["loss"], 3 * final)  # identical layers, identical losses
