"""MaskFormer's loss: cross-entropy over classes (no-object weight 0.1), sigmoid focal (weight 20) and
dice (weight 1) on matched masks, normalised by the number of masks, on the final and every intermediate
decoder layer."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from model.matcher import HungarianMatcher


def sigmoid_focal_loss(inputs: Tensor, targets: Tensor, num_masks: float, alpha: float = 0.25, gamma: float = 2.0):
    """[N, P] logits and targets -> focal loss averaged over pixels, summed over masks, / num_masks."""
    prob = inputs.sigmoid()
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_masks


def dice_loss(inputs: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    prob = inputs.sigmoid()
    numerator = 2 * (prob * targets).sum(-1)
    denominator = prob.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


class SetCriterion(nn.Module):
    empty_weight: Tensor

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher | None = None,
        no_object_weight: float = 0.1,
        ce_weight: float = 1.0,
        focal_weight: float = 20.0,
        dice_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher or HungarianMatcher()
        self.weights = {"loss_ce": ce_weight, "loss_focal": focal_weight, "loss_dice": dice_weight}
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.register_buffer("empty_weight", empty_weight)

    def layer_losses(
        self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]], num_masks: float
    ) -> dict[str, Tensor]:
        indices = self.matcher(outputs, targets)
        logits = outputs["pred_logits"]
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        for b, ((src, tgt), target) in enumerate(zip(indices, targets)):
            target_classes[b, src.to(logits.device)] = target["labels"][tgt]
        loss_ce = F.cross_entropy(logits.transpose(1, 2).float(), target_classes, self.empty_weight)

        # Matched masks, upsampled to the target resolution as in the official loss.
        src_masks = torch.cat([outputs["pred_masks"][b, src] for b, (src, _) in enumerate(indices)])
        tgt_masks = torch.cat([t["masks"][tgt] for t, (_, tgt) in zip(targets, indices)]).float()
        if len(src_masks) == 0:
            zero = outputs["pred_masks"].sum() * 0.0
            return {"loss_ce": loss_ce, "loss_focal": zero, "loss_dice": zero}
        src_masks = F.interpolate(
            src_masks[:, None].float(), size=tgt_masks.shape[-2:], mode="bilinear", align_corners=False
        )
        src_flat, tgt_flat = src_masks.flatten(1), tgt_masks.flatten(1)
        return {
            "loss_ce": loss_ce,
            "loss_focal": sigmoid_focal_loss(src_flat, tgt_flat, num_masks),
            "loss_dice": dice_loss(src_flat, tgt_flat, num_masks),
        }

    def forward(self, outputs: dict, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """All losses (unweighted, per layer) plus "loss": their weighted sum over every decoder layer."""
        num_masks = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=outputs["pred_logits"].device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_masks)
            num_masks = num_masks / dist.get_world_size()
        n = max(num_masks.item(), 1.0)
        losses = self.layer_losses(outputs, targets, n)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update({f"{k}_{i}": v for k, v in self.layer_losses(aux, targets, n).items()})
        weighted = [self.weights[k.rsplit("_", 1)[0] if k[-1].isdigit() else k] * v for k, v in losses.items()]
        losses["loss"] = torch.stack(weighted).sum()
        return losses
