"""Hungarian matching between predicted (class, mask) pairs and ground-truth segments."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn


def pairwise_sigmoid_focal(inputs: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """[Q, P] logits, [T, P] binary targets -> [Q, T] focal loss averaged over pixels."""
    prob = inputs.sigmoid()
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    pos = alpha * (1 - prob) ** gamma * pos
    neg = (1 - alpha) * prob**gamma * neg
    return (pos @ targets.t() + neg @ (1 - targets).t()) / inputs.shape[1]


def pairwise_dice(inputs: Tensor, targets: Tensor) -> Tensor:
    """[Q, P] logits, [T, P] binary targets -> [Q, T] dice loss."""
    prob = inputs.sigmoid()
    numerator = 2 * prob @ targets.t()
    denominator = prob.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


class HungarianMatcher(nn.Module):
    """cost = w_class * (-p(class)) + w_focal * focal + w_dice * dice, targets resized to mask resolution."""

    def __init__(self, cost_class: float = 1.0, cost_focal: float = 20.0, cost_dice: float = 1.0) -> None:
        super().__init__()
        self.cost_class, self.cost_focal, self.cost_dice = cost_class, cost_focal, cost_dice

    @torch.no_grad()
    def cost_matrix(self, logits: Tensor, masks: Tensor, labels: Tensor, tgt_masks: Tensor) -> Tensor:
        prob = logits.softmax(-1)[:, labels]  # [Q, T]
        tgt = F.interpolate(tgt_masks[:, None].float(), size=masks.shape[-2:], mode="nearest")[:, 0]
        out, tgt = masks.flatten(1).float(), tgt.flatten(1)
        return (
            -self.cost_class * prob
            + self.cost_focal * pairwise_sigmoid_focal(out, tgt)
            + self.cost_dice * pairwise_dice(out, tgt)
        )

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """Per image (prediction indices, target indices), each sorted by prediction index."""
        indices = []
        for b, target in enumerate(targets):
            if len(target["labels"]) == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty))
                continue
            cost = self.cost_matrix(
                outputs["pred_logits"][b], outputs["pred_masks"][b], target["labels"], target["masks"]
            )
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
