"""Segmentation losses against values computed by hand with `math`."""

from __future__ import annotations

import math

import pytest
import torch

from ddeseg.config import LossConfig
from ddeseg.losses import SegmentationLoss, cross_entropy_loss, dice_loss, focal_loss, iou_loss

S = 1e-5  # the official smoothing constant


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


# Two pixels, three classes: logits per pixel, targets 0 and 2.
MULTI_LOGITS = [[1.0, 0.0, -1.0], [0.5, 0.2, 2.0]]
MULTI_TARGET = [0, 2]


def multi_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.tensor(MULTI_LOGITS).t().reshape(1, 3, 1, 2)  # [B=1, C=3, H=1, W=2]
    return logits, torch.tensor([[MULTI_TARGET]])


def hand_multi() -> dict[str, float]:
    probs = [softmax(p) for p in MULTI_LOGITS]
    ce_pixels = [-math.log(probs[i][t]) for i, t in enumerate(MULTI_TARGET)]
    dice, iou = [], []
    for c in range(3):
        p = [probs[i][c] for i in range(2)]
        t = [1.0 if MULTI_TARGET[i] == c else 0.0 for i in range(2)]
        inter = sum(a * b for a, b in zip(p, t, strict=True))
        dice.append((2 * inter + S) / (sum(p) + sum(t) + S))
        iou.append((inter + S) / (sum(p) + sum(t) - inter + S))
    return {
        "ce": sum(ce_pixels) / 2,
        "dice": 1 - sum(dice) / 3,
        "iou": 1 - sum(iou) / 3,
        "focal": sum(0.5 * (1 - math.exp(-ce)) ** 2 * ce for ce in ce_pixels) / 2,
    }


def test_multiclass_terms_match_hand_values():
    logits, target = multi_inputs()
    expected = hand_multi()
    assert cross_entropy_loss(logits, target).item() == pytest.approx(expected["ce"], rel=1e-6)
    assert dice_loss(logits, target).item() == pytest.approx(expected["dice"], rel=1e-6)
    assert iou_loss(logits, target).item() == pytest.approx(expected["iou"], rel=1e-6)
    assert focal_loss(logits, target).item() == pytest.approx(expected["focal"], rel=1e-6)


def test_weighted_total_and_parts():
    logits, target = multi_inputs()
    logits.requires_grad_(True)
    expected = hand_multi()
    loss_fn = SegmentationLoss(LossConfig(), num_classes=3)  # official defaults 5, 5, 2, 0
    total, parts = loss_fn(logits, target)
    assert set(parts) == {"ce_loss", "dice_loss", "iou_loss"}
    assert parts["ce_loss"].item() == pytest.approx(5 * expected["ce"], rel=1e-6)
    assert parts["dice_loss"].item() == pytest.approx(5 * expected["dice"], rel=1e-6)
    assert parts["iou_loss"].item() == pytest.approx(2 * expected["iou"], rel=1e-6)
    assert total.item() == pytest.approx(5 * expected["ce"] + 5 * expected["dice"] + 2 * expected["iou"], rel=1e-6)
    total.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    with_focal = SegmentationLoss(LossConfig(ce_weight=0, dice_weight=0, iou_weight=0, focal_weight=3), 3)
    total, parts = with_focal(logits, target)
    assert set(parts) == {"focal_loss"} and total.item() == pytest.approx(3 * expected["focal"], rel=1e-6)


def test_binary_mode_matches_hand_values_and_binarises_targets():
    logits = torch.tensor([[[[0.0, 2.0, -1.0]]]])  # [1, 1, 1, 3]
    target = torch.tensor([[[0, 5, 0]]])  # class id 5: foreground in binary mode
    bits = [0.0, 1.0, 0.0]
    probs = [sigmoid(x) for x in (0.0, 2.0, -1.0)]
    bce = [-(t * math.log(p) + (1 - t) * math.log(1 - p)) for p, t in zip(probs, bits, strict=True)]
    inter = sum(p * t for p, t in zip(probs, bits, strict=True))
    dice = (2 * inter + S) / (sum(probs) + 1 + S)
    iou = (inter + S) / (sum(probs) + 1 - inter + S)
    loss_fn = SegmentationLoss(LossConfig(ce_weight=1, dice_weight=1, iou_weight=1, focal_weight=1), num_classes=1)
    total, parts = loss_fn(logits, target)
    assert parts["ce_loss"].item() == pytest.approx(sum(bce) / 3, rel=1e-6)
    assert parts["dice_loss"].item() == pytest.approx(1 - dice, rel=1e-6)
    assert parts["iou_loss"].item() == pytest.approx(1 - iou, rel=1e-6)
    focal = sum(0.5 * (1 - math.exp(-b)) ** 2 * b for b in bce) / 3
    assert parts["focal_loss"].item() == pytest.approx(focal, rel=1e-6)
    assert total.item() == pytest.approx(sum(bce) / 3 + 2 - dice - iou + focal, rel=1e-6)


@pytest.mark.parametrize("num_classes", [1, 3])
def test_ignored_pixels_count_in_no_term(num_classes):
    torch.manual_seed(0)
    logits = torch.randn(2, num_classes, 3, 4)
    target = torch.randint(0, max(2, num_classes), (2, 3, 4))
    target_ignored = target.clone()
    target_ignored[:, :, 3] = 255
    loss_fn = SegmentationLoss(LossConfig(ce_weight=1, dice_weight=1, iou_weight=1, focal_weight=1), num_classes)
    total_ignored, parts_ignored = loss_fn(logits, target_ignored)
    # Cutting the ignored column away gives the same losses.
    total_cut, parts_cut = loss_fn(logits[..., :3], target[..., :3])
    for name in parts_cut:
        assert parts_ignored[name].item() == pytest.approx(parts_cut[name].item(), rel=1e-5), name
    assert total_ignored.item() == pytest.approx(total_cut.item(), rel=1e-5)


def test_perfect_prediction_is_near_zero_and_logits_are_upsampled():
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[:, 2:6, 2:6] = 1
    logits = torch.full((1, 2, 8, 8), -20.0)
    logits[:, 0][target == 0] = 20.0
    logits[:, 1][target == 1] = 20.0
    total, _ = SegmentationLoss(LossConfig(), 2)(logits, target)
    assert total.item() < 1e-4
    small = torch.zeros(1, 2, 4, 4, requires_grad=True)
    total, _ = SegmentationLoss(LossConfig(), 2)(small, target)  # 4x4 logits, 8x8 target
    total.backward()
    assert small.grad.shape == (1, 2, 4, 4)


def test_bad_configuration_and_shapes_are_refused():
    with pytest.raises(ValueError, match="every loss weight is 0"):
        SegmentationLoss(LossConfig(ce_weight=0, dice_weight=0, iou_weight=0), 3)
    with pytest.raises(ValueError, match=r"logits must be \[B, 3"):
        SegmentationLoss(LossConfig(), 3)(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
