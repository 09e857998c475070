"""Evaluation: mIoU for semantic and PQ/SQ/RQ for panoptic results, with panopticapi's definitions.

PQ follows panopticapi's pq_compute: a prediction matches a ground-truth segment of the same category
when IoU > 0.5, where the union leaves out the prediction's pixels on VOID; unmatched ground truth is a
false negative unless crowd; an unmatched prediction is a false positive unless more than half of it lies
on VOID or on a crowd region of its own category. Categories with no TP, FP or FN are left out of the mean.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from model.postprocess import postprocess
from model.preprocess import letterbox

VOID = 0
OFFSET = 256 * 256 * 256  # panopticapi's id pairing offset


@dataclass
class PQStat:
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    iou: np.ndarray

    @classmethod
    def zeros(cls, num_classes: int) -> PQStat:
        return cls(*(np.zeros(num_classes) for _ in range(4)))

    def add_image(
        self,
        gt_map: np.ndarray,
        gt_segments: Sequence[dict],
        pred_map: np.ndarray,
        pred_segments: Sequence[dict],
    ) -> None:
        """Segments are dicts with "id", "category" (contiguous index) and, for ground truth, "iscrowd"."""
        gt = {s["id"]: s for s in gt_segments}
        pred = {s["id"]: s for s in pred_segments}
        pairs, counts = np.unique(gt_map.astype(np.int64) * OFFSET + pred_map.astype(np.int64), return_counts=True)
        overlap = {(int(p // OFFSET), int(p % OFFSET)): int(c) for p, c in zip(pairs, counts)}
        gt_area: dict[int, int] = defaultdict(int)
        pred_area: dict[int, int] = defaultdict(int)
        for (g, p), c in overlap.items():
            gt_area[g] += c
            pred_area[p] += c
        unknown = {p for p in pred_area if p != VOID} - set(pred)
        if unknown:
            raise ValueError(f"segment ids {sorted(unknown)} are in the prediction map but not in its segments")

        matched_gt, matched_pred = set(), set()
        for (g, p), inter in overlap.items():
            if g not in gt or p not in pred or gt[g].get("iscrowd", 0):
                continue
            if gt[g]["category"] != pred[p]["category"]:
                continue
            union = pred_area[p] + gt_area[g] - inter - overlap.get((VOID, p), 0)
            iou = inter / union
            if iou > 0.5:
                c = gt[g]["category"]
                self.tp[c] += 1
                self.iou[c] += iou
                matched_gt.add(g)
                matched_pred.add(p)

        crowd_by_category = {s["category"]: g for g, s in gt.items() if s.get("iscrowd", 0)}
        for g, s in gt.items():
            if g not in matched_gt and not s.get("iscrowd", 0):
                self.fn[s["category"]] += 1
        for p, s in pred.items():
            if p in matched_pred or pred_area[p] == 0:
                continue
            ignored = overlap.get((VOID, p), 0)
            if s["category"] in crowd_by_category:
                ignored += overlap.get((crowd_by_category[s["category"]], p), 0)
            if ignored / pred_area[p] > 0.5:
                continue
            self.fp[s["category"]] += 1

    def summary(self, isthing: Sequence[bool]) -> dict[str, float]:
        things = np.array(isthing, bool)
        out = {}
        for name, select in (("", np.ones_like(things)), ("_th", things), ("_st", ~things)):
            present = select & ((self.tp + self.fp + self.fn) > 0)
            if not present.any():
                out.update({f"PQ{name}": 0.0, f"SQ{name}": 0.0, f"RQ{name}": 0.0, f"N{name}": 0})
                continue
            tp, fp, fn, iou = self.tp[present], self.fp[present], self.fn[present], self.iou[present]
            denominator = tp + 0.5 * fp + 0.5 * fn
            sq = np.where(tp > 0, iou / np.maximum(tp, 1), 0.0)
            rq = tp / denominator
            out.update(
                {
                    f"PQ{name}": float(100 * (sq * rq).mean()),
                    f"SQ{name}": float(100 * sq.mean()),
                    f"RQ{name}": float(100 * rq.mean()),
                    f"N{name}": int(present.sum()),
                }
            )
        return out


@dataclass
class ConfusionMatrix:
    num_classes: int
    matrix: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.matrix = np.zeros((self.num_classes, self.num_classes), np.int64)

    def add(self, gt: np.ndarray, pred: np.ndarray, ignore: int = 255) -> None:
        """gt and pred are [H, W] class ids; gt pixels equal to `ignore` are skipped."""
        valid = gt != ignore
        k = self.num_classes
        self.matrix += np.bincount(gt[valid] * k + pred[valid], minlength=k * k).reshape(k, k)

    def summary(self) -> dict[str, float]:
        tp = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(0) + self.matrix.sum(1) - tp
        present = union > 0
        iou = tp[present] / union[present]
        return {
            "mIoU": float(100 * iou.mean()) if present.any() else 0.0,
            "pixel_accuracy": float(100 * tp.sum() / max(self.matrix.sum(), 1)),
        }

    def per_class_iou(self) -> list[float | None]:
        tp = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(0) + self.matrix.sum(1) - tp
        return [float(100 * t / u) if u > 0 else None for t, u in zip(tp, union)]


def semantic_ground_truth(ids: np.ndarray, segments: Sequence[dict]) -> np.ndarray:
    """A panoptic id map -> the semantic one mIoU is scored on: each segment's category, crowd ones too (as
    the official panoptic-to-semantic conversion labels them), and 255 (ignored) where no segment is."""
    out = np.full(ids.shape, 255, np.int64)
    for s in segments:
        out[ids == s["id"]] = s["category"]
    return out


@torch.no_grad()
def evaluate_panoptic_dataset(
    model, dataset, limit: int | None = None, batch_size: int = 8, precision: str = "fp32"
) -> dict:
    """PQ (panoptic inference) and mIoU (semantic inference) of `model` on a CocoPanoptic dataset.

    For fp16/bf16, pass a model from model.inference.prepare_for_inference; post-processing stays fp32.
    """
    from tqdm import tqdm

    from model.inference import run

    isthing = model.info.isthing
    device = next(model.parameters()).device
    num_classes = model.cfg.num_classes
    pq = PQStat.zeros(num_classes)
    confusion = ConfusionMatrix(num_classes)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, count, batch_size), desc="eval", unit="batch", leave=False):
        raw = [dataset.load(i) for i in range(start, min(start + batch_size, count))]
        inputs, sizes = zip(
            *(letterbox(torch.from_numpy(image).permute(2, 0, 1).float(), model.cfg.input_size) for image, _, _ in raw)
        )
        logits, masks = run(model, torch.stack(inputs).to(device), device, precision)
        outputs = {"pred_logits": logits, "pred_masks": masks}
        origs = [image.shape[:2] for image, _, _ in raw]
        panoptic = postprocess(outputs, "panoptic", isthing, image_sizes=sizes, orig_sizes=origs)
        semantic = postprocess(outputs, "semantic", isthing, image_sizes=sizes, orig_sizes=origs)
        for (_, ids, segments), pan, sem in zip(raw, panoptic, semantic):
            assert pan.segment_map is not None
            gt_segments = [
                {"id": s["id"], "category": dataset.contiguous[s["category_id"]], "iscrowd": s.get("iscrowd", 0)}
                for s in segments
            ]
            pred_segments = [{"id": s.id, "category": s.label_id} for s in pan.segments]
            pq.add_image(ids, gt_segments, pan.segment_map.cpu().numpy(), pred_segments)
            confusion.add(semantic_ground_truth(ids, gt_segments), sem.label_map().cpu().numpy())
    model.train(was_training)
    summary = {**pq.summary(isthing), **confusion.summary(), "images": count}
    return {"summary": summary, "per_class_iou": confusion.per_class_iou()}
