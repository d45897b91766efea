"""Metrics on tiny hand-computed masks; every expected value is worked out in the comments."""

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ddeseg.errors import DataError
from ddeseg.metrics import (
    AVSBenchBinaryMeter,
    SegmentationMeter,
    avsbench_thresholds,
    foreground_logits,
    predicted_labels,
)


def f03(precision: float, recall: float) -> float:
    return 1.3 * precision * recall / (0.3 * precision + recall)


# --------------------------------------------------------------------------------------------
# Multi-class data (4 classes; class 3 appears nowhere)
#
# frame A  target  0 0 1    pred  0 1 1
#                  0 2 2          0 2 0
# frame B  target  1 1 0    pred  1 0 0
#                  0 0 0          0 0 0
# --------------------------------------------------------------------------------------------

TARGET_A = [[0, 0, 1], [0, 2, 2]]
PRED_A = [[0, 1, 1], [0, 2, 0]]
TARGET_B = [[1, 1, 0], [0, 0, 0]]
PRED_B = [[1, 0, 0], [0, 0, 0]]


def multiclass_batch():
    pred = torch.tensor([PRED_A, PRED_B])
    target = torch.tensor([TARGET_A, TARGET_B])
    return pred, target


def test_ddeseg_protocol_multiclass():
    meter = SegmentationMeter(num_classes=4)
    pred, target = multiclass_batch()
    meter.update(pred, target)
    result = meter.compute()

    # Split totals (A + B):
    # class 0: target 3+4=7, predicted 3+5=8, inter 2+4=6 -> TP 6, FP 2, FN 1, union 9
    #          IoU 6/9; P 6/8, R 6/7; F0.3 = 1.3*(9/14)/(9/40+6/7) = 78/101; F1 = (9/7)/(45/28) = 4/5
    # class 1: target 1+2=3, predicted 2+1=3, inter 1+1=2 -> TP 2, FP 1, FN 1, union 4
    #          IoU 1/2; P = R = 2/3 -> F0.3 = F1 = 2/3
    # class 2: target 2+0=2, predicted 1+0=1, inter 1 -> TP 1, FP 0, FN 1, union 2
    #          IoU 1/2; P 1, R 1/2 -> F0.3 = 0.65/0.8 = 13/16; F1 = 1/1.5 = 2/3
    # class 3: union 0 -> not evaluated, left out of the means.
    assert result["num_classes_evaluated"] == 3
    assert result["miou"] == pytest.approx((2 / 3 + 1 / 2 + 1 / 2) / 3, abs=1e-9)  # 5/9
    assert result["fscore"] == pytest.approx((78 / 101 + 2 / 3 + 13 / 16) / 3, abs=1e-9)
    assert result["f1"] == pytest.approx((4 / 5 + 2 / 3 + 2 / 3) / 3, abs=1e-9)  # 32/45
    assert 78 / 101 == pytest.approx(f03(3 / 4, 6 / 7))

    c0 = result["per_class"][0]
    assert (c0["tp"], c0["fp"], c0["fn"], c0["union"]) == (6, 2, 1, 9)
    assert (c0["target_pixels"], c0["predicted_pixels"]) == (7, 8)
    assert c0["precision"] == pytest.approx(3 / 4) and c0["recall"] == pytest.approx(6 / 7)
    assert result["per_class"][2]["fscore"] == pytest.approx(13 / 16)
    assert result["per_class"][2]["f1"] == pytest.approx(2 / 3)
    absent = result["per_class"][3]
    assert absent["evaluated"] is False and absent["iou"] is None and absent["fscore"] is None
    assert absent["union"] == 0
    assert result["num_frames"] == 2 and result["num_pixels"] == 12


def test_avss_protocol_multiclass():
    meter = SegmentationMeter(num_classes=4)
    pred, target = multiclass_batch()
    frame_scores = meter.update(pred, target)
    result = meter.compute()

    # Per frame (AVSS: P = inter/pred, R = inter/target; a class counts in the frames where it is
    # in the prediction or the target):
    # class 0  A: inter 2, union 4 -> IoU 1/2, P 2/3, R 2/3 -> F 2/3
    #          B: inter 4, union 5 -> IoU 4/5, P 4/5, R 1 -> F 1.04/1.24 = 26/31
    # class 1  A: inter 1, union 2 -> IoU 1/2, P 1/2, R 1 -> F 0.65/1.15 = 13/23
    #          B: inter 1, union 2 -> IoU 1/2, P 1, R 1/2 -> F 13/16
    # class 2  A: inter 1, union 2 -> IoU 1/2, P 1, R 1/2 -> F 13/16; absent from B
    # class 3  in no frame -> 0, and it still counts in the mean over the 4 classes.
    per_class_iou = [(1 / 2 + 4 / 5) / 2, (1 / 2 + 1 / 2) / 2, 1 / 2, 0.0]
    per_class_f = [(2 / 3 + 26 / 31) / 2, (13 / 23 + 13 / 16) / 2, 13 / 16, 0.0]
    assert result["avsbench_miou"] == pytest.approx(sum(per_class_iou) / 4, abs=1e-9)  # 33/80
    assert result["avsbench_fscore"] == pytest.approx(sum(per_class_f) / 4, abs=1e-9)
    assert [result["per_class"][k]["avsbench_frames"] for k in range(4)] == [2, 2, 1, 0]
    assert result["per_class"][1]["avsbench_fscore"] == pytest.approx((13 / 23 + 13 / 16) / 2)
    assert 26 / 31 == pytest.approx(f03(4 / 5, 1.0)) and 13 / 23 == pytest.approx(f03(1 / 2, 1.0))

    # Frame scores: mean IoU over the classes present in each frame.
    # A: classes 0, 1, 2 -> (1/2 + 1/2 + 1/2)/3 = 1/2;  B: classes 0, 1 -> (4/5 + 1/2)/2 = 13/20
    assert frame_scores.tolist() == pytest.approx([1 / 2, 13 / 20])


def test_disjoint_prediction_gives_zero_not_nan():
    # target 0 1, pred 1 0: both classes have inter 0, union 2 -> IoU 0; P = R = 0 -> F 0 (0/0 -> 0).
    meter = SegmentationMeter(num_classes=2)
    meter.update(torch.tensor([[[1, 0]]]), torch.tensor([[[0, 1]]]))
    result = meter.compute()
    for key in ("miou", "fscore", "f1", "avsbench_miou", "avsbench_fscore"):
        assert result[key] == 0.0, key
    assert result["num_classes_evaluated"] == 2


def test_binary_empty_target_and_empty_prediction():
    # Two-class protocol of binary tasks (0 background, 1 foreground).
    # frame 1: target 0 0 0 0 (empty), pred 0 0 0 0 (empty)
    # frame 2: target 1 1 0 0,         pred 0 0 0 0 (empty prediction)
    pred = torch.tensor([[[0, 0, 0, 0]], [[0, 0, 0, 0]]])
    target = torch.tensor([[[0, 0, 0, 0]], [[1, 1, 0, 0]]])
    meter = SegmentationMeter(num_classes=2)
    meter.update(pred, target)
    result = meter.compute()

    # DDESeg, split totals:
    # class 0: target 6, predicted 8, inter 6 -> union 8, IoU 3/4; P 3/4, R 1
    #          F0.3 = 1.3*0.75/(0.225+1) = 39/49; F1 = 1.5/1.75 = 6/7
    # class 1: target 2, predicted 0, inter 0 -> union 2, IoU 0; P = 0/(0+eps) = 0, R 0 -> F 0
    assert result["miou"] == pytest.approx((3 / 4 + 0) / 2)  # 3/8
    assert result["fscore"] == pytest.approx((39 / 49 + 0) / 2)  # 39/98
    assert result["f1"] == pytest.approx((6 / 7 + 0) / 2)  # 3/7
    assert result["per_class"][1]["precision"] == 0.0

    # AVSS, per frame:
    # class 0  frame 1: inter 4, union 4 -> IoU 1, F 1;  frame 2: inter 2, union 4 -> IoU 1/2,
    #          P 2/4, R 1 -> F 13/23.  class 1: frame 2 only: inter 0, union 2 -> IoU 0, F 0.
    assert result["avsbench_miou"] == pytest.approx(((1 + 1 / 2) / 2 + 0) / 2)  # 3/8
    assert result["avsbench_fscore"] == pytest.approx(((1 + 13 / 23) / 2 + 0) / 2)  # 9/23


def test_class_absent_from_split_ddeseg_leaves_it_out_avss_counts_it():
    # Only an all-background frame, predicted all background: foreground has union 0.
    meter = SegmentationMeter(num_classes=2)
    meter.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
    result = meter.compute()
    # DDESeg: only background is evaluated: IoU 4/4 = 1 -> mIoU 1, F0.3 = F1 = 1 (up to eps).
    assert result["num_classes_evaluated"] == 1
    assert result["miou"] == pytest.approx(1.0) and result["fscore"] == pytest.approx(1.0)
    assert result["per_class"][1]["iou"] is None
    # AVSS: mean over both classes, the absent one as 0 -> (1 + 0)/2.
    assert result["avsbench_miou"] == pytest.approx(0.5)
    assert result["avsbench_fscore"] == pytest.approx(0.5)


def test_ignore_index_pixels_are_left_out():
    # target 0 1 255 255, pred 0 1 1 0. Only the first two pixels count:
    # class 0: inter 1, union 1 -> IoU 1; class 1: inter 1, union 1 -> IoU 1 -> mIoU 1.
    # (Counting the ignored pixels' predictions would give union 2 for each -> mIoU 1/2.)
    pred = torch.tensor([[[0, 1, 1, 0]]])
    target = torch.tensor([[[0, 1, 255, 255]]])
    meter = SegmentationMeter(num_classes=2, ignore_index=255)
    scores = meter.update(pred, target)
    result = meter.compute()
    assert result["miou"] == pytest.approx(1.0)
    assert result["avsbench_miou"] == pytest.approx(1.0)
    assert result["num_pixels"] == 2
    assert result["per_class"][1]["predicted_pixels"] == 1
    assert scores.tolist() == pytest.approx([1.0])

    # A frame with every pixel ignored adds nothing, and its frame score is NaN.
    scores = meter.update(torch.tensor([[[1, 1]]]), torch.tensor([[[255, 255]]]))
    assert math.isnan(scores.item())
    assert meter.compute()["miou"] == pytest.approx(1.0)


def test_bad_values_are_reported():
    with pytest.raises(DataError, match="255"):
        SegmentationMeter(num_classes=2, ignore_index=None).update(
            torch.tensor([[[0, 1]]]), torch.tensor([[[0, 255]]])
        )
    with pytest.raises(DataError, match=r"\[3\]"):
        SegmentationMeter(num_classes=2).update(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 3]]]))
    with pytest.raises(ValueError, match="predicted labels"):
        SegmentationMeter(num_classes=2).update(torch.tensor([[[0, 2]]]), torch.tensor([[[0, 1]]]))
    with pytest.raises(ValueError, match="differ"):
        SegmentationMeter(num_classes=2).update(
            torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long)
        )
    with pytest.raises(ValueError, match="integer"):
        SegmentationMeter(num_classes=2).update(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))


def test_merge_equals_one_meter_over_all_data():
    pred, target = multiclass_batch()
    whole = SegmentationMeter(num_classes=4)
    whole.update(pred, target)
    first, second = SegmentationMeter(num_classes=4), SegmentationMeter(num_classes=4)
    first.update(pred[:1], target[:1])
    second.update(pred[1:], target[1:])
    merged = first.merge(second)
    for name, tensor in whole.state_tensors().items():
        assert torch.equal(tensor, merged.state_tensors()[name]), name
    assert merged.compute() == whole.compute()
    # Merging an empty meter changes nothing.
    assert merged.merge(SegmentationMeter(num_classes=4)).compute() == whole.compute()
    with pytest.raises(ValueError, match="classes"):
        merged.merge(SegmentationMeter(num_classes=3))


def test_empty_meter_and_reset():
    meter = SegmentationMeter(num_classes=3)
    result = meter.compute()
    scalars = ("miou", "fscore", "f1", "avsbench_miou", "avsbench_fscore", "num_frames")
    assert [result[key] for key in scalars] == [0.0, 0.0, 0.0, 0.0, 0.0, 0]
    pred, target = multiclass_batch()
    meter = SegmentationMeter(num_classes=4)
    meter.update(pred, target)
    meter.reset()
    assert meter.compute()["num_frames"] == 0


def test_evaluating_twice_is_identical():
    generator = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 5, (3, 8, 8), generator=generator)
    target = torch.randint(0, 5, (3, 8, 8), generator=generator)
    results = []
    for _ in range(2):
        meter = SegmentationMeter(num_classes=5)
        meter.update(pred, target)
        results.append(meter.compute())
    assert results[0] == results[1]


# --------------------------------------------------------------------------------------------
# From logits to labels
# --------------------------------------------------------------------------------------------


def test_predicted_labels_and_foreground_logits():
    # One channel: sigmoid > 0.5. sigmoid(0) = 0.5 and float32 sigmoid(1e-9) rounds to 0.5: both
    # background; sigmoid(2) > 0.5: foreground.
    single = torch.tensor([-1.0, 0.0, 1e-9, 2.0]).view(1, 1, 1, 4)
    assert predicted_labels(single).tolist() == [[[0, 0, 0, 1]]]
    # Three channels: argmax per pixel. pixel 0: (5, 1, 0) -> 0; pixel 1: (0, 1, 3) -> 2.
    multi = torch.tensor([[5.0, 0.0], [1.0, 1.0], [0.0, 3.0]]).view(1, 3, 1, 2)
    assert predicted_labels(multi).tolist() == [[[0, 2]]]

    # foreground_logits: C = 3, all logits 0 -> P(background) = 1/3, P(foreground) = 2/3
    # -> logit log((2/3)/(1/3)) = log 2.
    assert foreground_logits(torch.zeros(1, 3, 1, 1)).item() == pytest.approx(math.log(2))
    # C = 2: logits (1, 3) -> P(fg) = e^3/(e^1+e^3) = sigmoid(2) -> logit 2.
    assert foreground_logits(torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)).item() == pytest.approx(2.0)
    # C = 1: the logit itself.
    assert foreground_logits(torch.full((1, 1, 1, 1), -0.7)).item() == pytest.approx(-0.7)


# --------------------------------------------------------------------------------------------
# AVSBench S4/MS3 binary protocol
#
# Frames of 4 pixels, given as sigmoid probabilities (chosen away from the thresholds i/254).
# A pixel of probability p is positive at thresholds i = 0 .. floor(254 p):
#   p = 0.1 -> i <= 25,  0.3 -> i <= 76,  0.6 -> i <= 152,  0.9 -> i <= 228.
# --------------------------------------------------------------------------------------------

FRAMES = [
    # (video, frame, target, probabilities)
    ("a", 0, [1, 1, 0, 0], [0.9, 0.3, 0.6, 0.1]),
    ("a", 1, [0, 0, 0, 0], [0.9, 0.3, 0.1, 0.1]),
    ("a", 2, [0, 0, 1, 1], [0.3, 0.1, 0.3, 0.6]),
    ("b", 0, [0, 0, 0, 0], [0.1, 0.1, 0.3, 0.3]),
    ("c", 0, [1, 1, 1, 1], [0.1, 0.1, 0.1, 0.3]),
]


def add_frames(meter: AVSBenchBinaryMeter, frames) -> torch.Tensor:
    logits = torch.logit(torch.tensor([f[3] for f in frames], dtype=torch.float64)).float().view(-1, 1, 4)
    target = torch.tensor([f[2] for f in frames]).view(-1, 1, 4)
    return meter.update(logits, target, [f[0] for f in frames], [f[1] for f in frames])


def test_avsbench_binary_iou_and_fmeasure():
    meter = AVSBenchBinaryMeter()
    frame_ious = add_frames(meter, FRAMES)
    result = meter.compute()

    # IoU, prediction p > 0.5:
    # a0: pred 1 0 1 0 vs 1 1 0 0 -> inter 1, union 3 -> 1/3
    # a1: empty target, pred 1 0 0 0 -> both-background pixels 3 of 4 -> 3/4
    # a2: pred 0 0 0 1 vs 0 0 1 1 -> inter 1, union 2 -> 1/2
    # b0: empty target, empty prediction -> 4/4 = 1
    # c0: full target, empty prediction -> inter 0, union 4 -> 0
    assert frame_ious.tolist() == pytest.approx([1 / 3, 3 / 4, 1 / 2, 1.0, 0.0], abs=1e-6)
    # Videos: a (1/3 + 3/4 + 1/2)/3 = 19/36, b 1, c 0 -> (19/36 + 1 + 0)/3 = 55/108.
    # (The per-frame mean, 31/60, would differ.)
    assert result["avsbench_miou"] == pytest.approx(55 / 108, abs=1e-6)

    # F curves (1.3 P R / (0.3 P + R)) of the frames with foreground:
    # a0 (gt pixels 0.9, 0.3):  i 0-25: 4 positives, TP 2 -> P 1/2, R 1 -> 13/23
    #                           i 26-76: 3 pos, TP 2 -> P 2/3, R 1 -> 13/18
    #                           i 77-152: 2 pos, TP 1 -> P 1/2, R 1/2 -> 1/2
    #                           i 153-228: 1 pos, TP 1 -> P 1, R 1/2 -> 13/16;  i >= 229: 0
    # a2 (gt pixels 0.3, 0.6):  i 0-25: 13/23;  i 26-76: 3 pos, TP 2 -> 13/18
    #                           i 77-152: 1 pos, TP 1 -> 13/16;  i >= 153: 0
    # video a: mean curve 13/23, 13/18, (1/2 + 13/16)/2 = 21/32, 13/32, 0 -> max 13/18
    #          (a1 has an empty target: skipped; the mean of per-frame maxima would be 13/16).
    # video b: no frame with foreground -> 0, still counted.
    # video c (gt everywhere): i 0-25: 4 pos, TP 4 -> P 1, R 1 -> F 1 -> max 1.
    assert result["avsbench_fscore"] == pytest.approx((13 / 18 + 0 + 1) / 3, abs=1e-6)  # 31/54
    assert 13 / 18 == pytest.approx(f03(2 / 3, 1.0)) and 21 / 32 == pytest.approx((1 / 2 + f03(1, 1 / 2)) / 2)
    assert (result["num_videos"], result["num_frames"], result["num_empty_target_frames"]) == (3, 5, 2)
    assert result["duplicate_frames"] == 0
    assert list(meter.frame_ious()) == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("c", 0)]


def test_avsbench_top_threshold_is_one_and_inclusive():
    thresholds = avsbench_thresholds()
    # 255 thresholds i/254; linspace(0, 1 - 1e-10) ends at exactly 1.0 in float32.
    assert thresholds.shape == (255,) and thresholds[0].item() == 0.0 and thresholds[-1].item() == 1.0
    assert thresholds[127].item() == pytest.approx(0.5, abs=1e-7)

    # target 1 0; logits 30 (float32 sigmoid saturates to exactly 1.0) and logit(0.999)
    # (positive for i <= floor(253.7) = 253). i <= 253: 2 pos, TP 1 -> 13/23;
    # i = 254 (t = 1.0): only the saturated pixel, 1.0 >= 1.0 -> P 1, R 1 -> F 1. Max 1.
    meter = AVSBenchBinaryMeter()
    logits = torch.tensor([[30.0, math.log(0.999 / 0.001)]])
    meter.update(logits, torch.tensor([[1, 0]]), ["v"], [0])
    assert meter.compute()["avsbench_fscore"] == pytest.approx(1.0)


def test_avsbench_merge_duplicates_and_errors():
    whole = AVSBenchBinaryMeter()
    add_frames(whole, FRAMES)
    first, second = AVSBenchBinaryMeter(), AVSBenchBinaryMeter()
    add_frames(first, [FRAMES[0], FRAMES[1], FRAMES[3]])  # video "a" split across meters
    add_frames(second, [FRAMES[2], FRAMES[4], FRAMES[0]])  # a0 again: a duplicate once merged
    merged = first.merge(second)
    result = merged.compute()
    assert result.pop("duplicate_frames") == 1
    expected = whole.compute()
    expected.pop("duplicate_frames")
    assert result == expected

    with pytest.raises(DataError, match="0/1"):
        AVSBenchBinaryMeter().update(torch.zeros(1, 2), torch.tensor([[0, 2]]), ["v"], [0])
    with pytest.raises(ValueError, match="video ids"):
        AVSBenchBinaryMeter().update(torch.zeros(2, 1, 2), torch.zeros(2, 1, 2, dtype=torch.long), ["v"], [0])
    empty = AVSBenchBinaryMeter().compute()
    assert (empty["avsbench_miou"], empty["avsbench_fscore"], empty["num_frames"]) == (0.0, 0.0, 0)


# --------------------------------------------------------------------------------------------
# Reduction across ranks (two gloo processes) equals one process over all the data
# --------------------------------------------------------------------------------------------


def _reduce_worker(rank: int, world_size: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        pred, target = multiclass_batch()
        segmentation = SegmentationMeter(num_classes=4)
        segmentation.update(pred[rank : rank + 1], target[rank : rank + 1])
        segmentation.all_reduce()
        binary = AVSBenchBinaryMeter()
        add_frames(binary, FRAMES[rank::2])  # rank 0: a0, a2, c0; rank 1: a1, b0
        binary.all_reduce()
        results[rank] = (segmentation.compute(), binary.compute())
    finally:
        dist.destroy_process_group()


def test_all_reduce_over_two_processes_matches_one():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_reduce_worker, args=(2, port, results), nprocs=2, join=True)

    pred, target = multiclass_batch()
    segmentation = SegmentationMeter(num_classes=4)
    segmentation.update(pred, target)
    segmentation.all_reduce()  # no process group: a no-op
    binary = AVSBenchBinaryMeter()
    add_frames(binary, FRAMES)
    for rank in (0, 1):
        reduced_segmentation, reduced_binary = results[rank]
        assert reduced_segmentation == segmentation.compute()
        assert reduced_binary == binary.compute()
