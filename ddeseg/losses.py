"""Segmentation losses: cross-entropy, Dice, IoU and focal, weighted as the official recipe.

Definitions follow the official `util_tools/losses.py`:

- cross-entropy: mean over pixels (`BCEWithLogits` on the single channel in binary mode);
- Dice: per (sample, class) `(2 * sum(p * t) + 1e-5) / (sum(p) + sum(t) + 1e-5)` with softmax
  probabilities (sigmoid in binary mode) and one-hot targets, averaged over samples and classes
  (classes absent from a sample included, background included); loss `1 - mean`;
- IoU: the same with `(sum(p * t) + 1e-5) / (sum(p) + sum(t) - sum(p * t) + 1e-5)`;
- focal: `alpha * (1 - exp(-ce))**gamma * ce` per pixel, alpha 0.5, gamma 2, mean over pixels.

Total = ce_weight * CE + dice_weight * Dice + iou_weight * IoU + focal_weight * focal (official
defaults 5, 5, 2, 0); a term with weight 0 is not computed.

One addition: pixels labelled `IGNORE_INDEX` (255, VPO's ignore label) count in no term (the
official code has none in AVSS). Without such pixels the values equal the official ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddeseg.config import LossConfig
from ddeseg.data.schema import IGNORE_INDEX

SMOOTH = 1e-5
FOCAL_ALPHA = 0.5
FOCAL_GAMMA = 2.0


def _valid(target: torch.Tensor, ignore_index: int | None) -> torch.Tensor | None:
    """float `[B, H, W]`, 1 where the pixel counts; None when every pixel counts by definition.

    Always a tensor when there is an ignore label (no `.all()` check: that would synchronise
    the GPU every step); with no ignored pixel the results equal the plain means.
    """
    if ignore_index is None:
        return None
    return (target != ignore_index).float()


def _masked_mean(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is None:
        return values.mean()
    return (values * valid).sum() / valid.sum().clamp_min(1.0)


def pixel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None = IGNORE_INDEX
) -> torch.Tensor:
    """Unreduced CE `[B, H, W]` (BCE-with-logits for one channel); ignored pixels give 0."""
    if logits.shape[1] == 1:
        valid = _valid(target, ignore_index)
        if valid is None:
            return F.binary_cross_entropy_with_logits(logits[:, 0], target.float(), reduction="none")
        binary = target.float() * valid  # an ignored pixel's term is zeroed below
        return F.binary_cross_entropy_with_logits(logits[:, 0], binary, reduction="none") * valid
    return F.cross_entropy(
        logits, target, reduction="none", ignore_index=-100 if ignore_index is None else ignore_index
    )


def cross_entropy_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None = IGNORE_INDEX) -> torch.Tensor:
    """Mean pixel cross-entropy over the counted pixels."""
    return _masked_mean(pixel_cross_entropy(logits, target, ignore_index), _valid(target, ignore_index))


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int | None = IGNORE_INDEX,
    alpha: float = FOCAL_ALPHA,
    gamma: float = FOCAL_GAMMA,
) -> torch.Tensor:
    """Focal loss `alpha (1 - p_t)^gamma CE`, mean over the counted pixels."""
    ce = pixel_cross_entropy(logits, target, ignore_index)
    focal = alpha * (1.0 - torch.exp(-ce)) ** gamma * ce
    return _masked_mean(focal, _valid(target, ignore_index))


def _probabilities_and_onehot(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, C, H*W]` probabilities and targets, both zero at ignored pixels."""
    batch, channels = logits.shape[:2]
    valid = _valid(target, ignore_index)
    clean = target if valid is None else target * valid.long()  # ignore -> 0, masked out below
    if channels == 1:
        probabilities = torch.sigmoid(logits)
        onehot = clean.unsqueeze(1).float()
    else:
        probabilities = torch.softmax(logits, dim=1)
        onehot = F.one_hot(clean, num_classes=channels).permute(0, 3, 1, 2).float()
    if valid is not None:
        probabilities = probabilities * valid.unsqueeze(1)
        onehot = onehot * valid.unsqueeze(1)
    return probabilities.reshape(batch, channels, -1), onehot.reshape(batch, channels, -1)


def dice_loss(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None = IGNORE_INDEX, smooth: float = SMOOTH
) -> torch.Tensor:
    """`1 - mean over (sample, class) of the soft Dice coefficient`."""
    probabilities, onehot = _probabilities_and_onehot(logits, target, ignore_index)
    intersection = (probabilities * onehot).sum(2)
    total = probabilities.sum(2) + onehot.sum(2)
    return 1.0 - ((2.0 * intersection + smooth) / (total + smooth)).mean()


def iou_loss(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None = IGNORE_INDEX, smooth: float = SMOOTH
) -> torch.Tensor:
    """`1 - mean over (sample, class) of the soft IoU`."""
    probabilities, onehot = _probabilities_and_onehot(logits, target, ignore_index)
    intersection = (probabilities * onehot).sum(2)
    union = probabilities.sum(2) + onehot.sum(2) - intersection
    return 1.0 - ((intersection + smooth) / (union + smooth)).mean()


class SegmentationLoss(nn.Module):
    """Weighted sum of CE, Dice, IoU and focal losses.

    Args:
        config: the weights (`LossConfig`).
        num_classes: model outputs; 1 = binary mode (sigmoid/BCE, target {0, 1}).
        ignore_index: target value that counts in no term (None: every pixel counts).
    Forward:
        logits float `[B, C, h, w]` (upsampled bilinearly when (h, w) is not the target's size),
        target int `[B, H, W]` class ids (in binary mode anything > 0 except `ignore_index` is
        foreground). Returns the total loss (a scalar tensor with gradient) and a dict of the
        weighted terms, detached: `ce_loss`, `dice_loss`, `iou_loss`, `focal_loss` (only those
        with a weight > 0), which sum to the total.
    """

    def __init__(self, config: LossConfig, num_classes: int, ignore_index: int | None = IGNORE_INDEX) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        terms = {
            "ce_loss": (config.ce_weight, cross_entropy_loss),
            "dice_loss": (config.dice_weight, dice_loss),
            "iou_loss": (config.iou_weight, iou_loss),
            "focal_loss": (config.focal_weight, focal_loss),
        }
        negative = {name: weight for name, (weight, _) in terms.items() if weight < 0}
        if negative:
            raise ValueError(f"loss weights must be >= 0, got {negative}")
        self.terms = {name: term for name, term in terms.items() if term[0] > 0}
        if not self.terms:
            raise ValueError("every loss weight is 0: set at least one of ce/dice/iou/focal_weight > 0")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if logits.ndim != 4 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must be [B, {self.num_classes}, H, W], got {tuple(logits.shape)}")
        if target.ndim == 4 and target.shape[1] == 1:
            target = target[:, 0]
        if target.ndim != 3 or target.shape[0] != logits.shape[0]:
            raise ValueError(f"target must be [B, H, W] with B={logits.shape[0]}, got {tuple(target.shape)}")
        target = target.long()
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        if self.num_classes == 1:
            binary = (target > 0).long()
            target = binary if self.ignore_index is None else torch.where(target == self.ignore_index, target, binary)
        parts = {name: weight * term(logits, target, self.ignore_index) for name, (weight, term) in self.terms.items()}
        total = torch.stack(list(parts.values())).sum()
        return total, {name: value.detach() for name, value in parts.items()}
