"""PQ and mIoU against examples worked out by hand (panopticapi's definitions)."""

import math

import numpy as np
import pytest

from model.evaluation import ConfusionMatrix, PQStat, semantic_ground_truth

ISTHING = [False, True]  # category 0 stuff, category 1 thing


def seg(i, c, crowd=0):
    return {"id": i, "category": c, "iscrowd": crowd}


def images():
    # 1: stuff TP (IoU 8/9); thing TP (IoU 3/4); thing TP whose prediction half covers VOID (IoU 1)
    gt1 = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [1, 1, 3, 0], [1, 1, 3, 0]])
    pr1 = np.array([[1, 1, 1, 2], [1, 1, 2, 2], [1, 1, 4, 4], [1, 1, 4, 4]])
    yield gt1, [seg(1, 0), seg(2, 1), seg(3, 1)], pr1, [seg(1, 0), seg(2, 1), seg(4, 1)]
    # 2: stuff TP (IoU 12/16); a thing prediction with no ground truth: FP
    gt2 = np.ones((4, 4), int)
    pr2 = np.array([[1] * 4, [1] * 4, [1] * 4, [2] * 4])
    yield gt2, [seg(1, 0)], pr2, [seg(1, 0), seg(2, 1)]
    # 3: a missed thing: FN; stuff TP (IoU 12/16)
    gt3 = np.full((4, 4), 2)
    gt3[:2, :2] = 1
    yield gt3, [seg(1, 1), seg(2, 0)], np.ones((4, 4), int), [seg(1, 0)]
    # 4: a thing prediction on a crowd region of its class is ignored; stuff TP (IoU 1)
    gt4 = np.array([[1, 1, 2, 2]] * 4)
    pr4 = np.array([[5, 5, 6, 6]] * 4)
    yield gt4, [seg(1, 1, crowd=1), seg(2, 0)], pr4, [seg(5, 1), seg(6, 0)]


def test_pq_hand_worked_example():
    stat = PQStat.zeros(2)
    for gt, gts, pr, prs in images():
        stat.add_image(gt, gts, pr, prs)
    assert stat.tp.tolist() == [4, 2] and stat.fp.tolist() == [0, 1] and stat.fn.tolist() == [0, 1]
    stuff_sq = (8 / 9 + 12 / 16 + 12 / 16 + 1) / 4
    thing_sq, thing_rq = (3 / 4 + 1) / 2, 2 / (2 + 0.5 + 0.5)
    s = stat.summary(ISTHING)
    assert math.isclose(s["PQ_st"], 100 * stuff_sq, rel_tol=1e-9)
    assert math.isclose(s["SQ_th"], 100 * thing_sq, rel_tol=1e-9) and math.isclose(s["RQ_th"], 100 * thing_rq)
    assert math.isclose(s["PQ_th"], 100 * thing_sq * thing_rq, rel_tol=1e-9)
    assert math.isclose(s["PQ"], 100 * (stuff_sq + thing_sq * thing_rq) / 2, rel_tol=1e-9)
    assert s["N"] == 2


def test_pq_rejects_unlisted_segments():
    with pytest.raises(ValueError, match="not in its segments"):
        PQStat.zeros(2).add_image(np.ones((2, 2), int), [seg(1, 0)], np.full((2, 2), 7), [seg(1, 0)])


def test_miou_hand_worked_example():
    cm = ConfusionMatrix(2)
    cm.add(np.array([[0, 0, 1], [1, 255, 1]]), np.array([[0, 1, 1], [1, 0, 0]]))
    s = cm.summary()
    assert math.isclose(s["mIoU"], 100 * (1 / 3 + 2 / 4) / 2)
    assert math.isclose(s["pixel_accuracy"], 60.0)
    assert cm.per_class_iou() == [pytest.approx(100 / 3), pytest.approx(50.0)]


def test_semantic_ground_truth_labels_crowd_segments_and_ignores_void():
    """mIoU scores crowd regions under their category, as the official panoptic-to-semantic conversion
    does (PQ alone treats crowd specially); pixels in no segment are VOID, 255."""
    ids = np.array([[1, 1, 0], [2, 2, 7]])
    got = semantic_ground_truth(ids, [seg(1, 0), seg(2, 1, crowd=1), seg(7, 1)])
    assert got.tolist() == [[0, 0, 255], [1, 1, 1]]


def test_pq_agrees_with_torchmetrics_without_crowd():
    """torchmetrics' PanopticQuality takes (category, instance) per pixel and cannot mark crowd regions;
    on crowd-free data (VOID included) it must give our numbers."""
    torch = pytest.importorskip("torch")
    tm = pytest.importorskip("torchmetrics.detection")

    def encode(segment_map, segments):
        category = {s["id"]: s["category"] for s in segments}
        pairs = [[category.get(v, 255), v if v in category else 0] for v in segment_map.flatten().tolist()]
        return torch.tensor(pairs).view(1, *segment_map.shape, 2)

    metric = tm.PanopticQuality(things={1}, stuffs={0}, return_sq_and_rq=True, allow_unknown_preds_category=True)
    stat = PQStat.zeros(2)
    for gt, gts, pr, prs in list(images())[:3]:
        stat.add_image(gt, gts, pr, prs)
        metric.update(encode(pr, prs), encode(gt, gts))
    s = stat.summary(ISTHING)
    assert metric.compute().tolist() == pytest.approx([s["PQ"] / 100, s["SQ"] / 100, s["RQ"] / 100])
