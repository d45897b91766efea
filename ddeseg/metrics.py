"""Segmentation metrics as the papers compute them, accumulated over a split and reducible across ranks.

Two meters, three protocols. Each protocol's numbers are reported under its own keys.

`SegmentationMeter` (predicted class labels against ground-truth class labels):

- **DDESeg protocol** (keys `miou`, `fscore`, `f1`): the official DDESeg evaluation
  (github YenanLiu/DDESeg @ 75a8471, `train.py::evaluation` and `train.py::compute_metrics_ddp`,
  counts from `util_tools/metrics.py::compute_iou_per_class` / `compute_fscore_per_class`).
  Per class c, over every pixel of the whole split: intersection = TP, union = TP + FP + FN,
  summed over batches and then over ranks. A class is *evaluated* when its union is non-zero
  (it occurs in the ground truth or in the predictions somewhere in the split); background
  (class 0) is a class like any other. With eps = 1e-10 exactly where the official adds it:

      IoU_c       = TP / (union + eps)
      precision_c = TP / (TP + FP + eps)          recall_c = TP / (TP + FN + eps)
      F_c         = (1 + 0.3) P R / (0.3 P + R + eps)     (the paper's F-score, beta^2 = 0.3)
      F1_c        = 2 P R / (P + R + eps)

  and `miou`, `fscore`, `f1` are the plain means of IoU_c, F_c, F1_c over evaluated classes.
  The official reports the beta^2 = 0.3 mean as its "f_score" (`mean_fscore_03`).

- **AVSBench-semantic (AVSS) protocol** (keys `avsbench_miou`, `avsbench_fscore`): the
  AVSBench AVSS test (github OpenNLPLab/AVSBench @ f7414af, `avs_scripts/avss/test.py` and
  `avs_scripts/avss/utils/compute_color_metrics.py::_batch_miou_fscore`). Per *frame* and class:
  IoU = inter / (union + 2.22e-16) and F = 1.3 P R / (0.3 P + R) with P = inter / predicted,
  R = inter / target, F = 0 where that is 0/0 (no overlap). Each class sums its per-frame IoU
  and F over the frames where its union is non-zero and divides by that frame count; a class
  with no such frame scores 0. `avsbench_miou` / `avsbench_fscore` are the means over **all**
  `num_classes` classes, background included, so a class absent from the split pulls the mean
  down (unlike the DDESeg protocol, which leaves it out).

`AVSBenchBinaryMeter` (foreground logits against 0/1 masks): the **AVSBench S4/MS3 protocol**
(keys `avsbench_miou`, `avsbench_fscore`), `avs_scripts/avs_s4/utils/utility.py::mask_iou`,
`::Eval_Fmeasure`, `::_eval_pr` and `avs_scripts/avs_s4/test.py` (avs_ms3 is identical). See the
class docstring.

Deviations from the official code, all deliberate:

- counts are exact int64 (the official DDESeg sums float32, which rounds once a class passes
  2**24 pixels over the split) and ratios are float64 (the official uses float32); the results
  agree to ~1e-6.
- `ignore_index` pixels (VPO's 255) are left out of every count. Neither official protocol has
  them (the DDESeg `one_hot` would fail on 255), so this changes nothing on their data.
- the DDESeg code's binary path (`num_classes: 1`) cannot run: it allocates two bins but calls
  `one_hot(num_classes=1)` on 0/1 masks, which raises. Its evident intent, and what we do, is the
  two-class protocol: evaluate binary tasks with `num_classes=2` (0 background, 1 foreground)
  and `predicted_labels` (sigmoid > 0.5, as the official thresholds them).
- an empty meter computes 0.0 everywhere (the official mIoU gives 0.0; its F-score would be NaN).
- AVSS: the official loader pads the 5-frame v1s/v1m videos of the AVSS split to 10 frames with
  all-background labels (and black images) and scores those padded frames too; we score real
  frames only. Its `miou_noBg` / `F_score_noBg` drop the *last* class, not background (0), so
  we do not report them. (Its `test.py` also unpacks 3 of the 4 values `calc_color_miou_fscore`
  returns, which raises at HEAD; `train.py` has the same line.)

Duplicated frames (e.g. a sampler padding the last batch) are counted twice by
`SegmentationMeter`, exactly as the official DDP evaluation does with its padded
`DistributedSampler`; give every frame to exactly one rank. `AVSBenchBinaryMeter` keys frames by
(video, frame) and keeps the first copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from ddeseg.data.schema import IGNORE_INDEX
from ddeseg.errors import DataError

FSCORE_BETA2 = 0.3  # beta^2 of the F-score in both papers
DDESEG_EPS = 1e-10  # `compute_metrics_ddp(..., epsilon=1e-10)`
AVSS_IOU_EPS = 2.220446049250313e-16  # `_batch_miou_fscore`: float64 machine epsilon
AVSBENCH_IOU_EPS = 1e-7  # `mask_iou(..., eps=1e-7)`
AVSBENCH_PR_EPS = 1e-20  # `_eval_pr`
AVSBENCH_NUM_THRESHOLDS = 255  # `Eval_Fmeasure(..., pr_num=255)`


def _f_beta(precision: torch.Tensor, recall: torch.Tensor, beta2: float, eps: float = 0.0) -> torch.Tensor:
    return (1 + beta2) * precision * recall / (beta2 * precision + recall + eps)


def _distributed(group: Any = None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _as_frames(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """`[H, W]` or `[B, H, W]` -> `[B, H*W]`."""
    if tensor.dim() == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 3:
        raise ValueError(f"{name} must be [B, H, W] or [H, W], got shape {tuple(tensor.shape)}")
    return tensor.reshape(tensor.shape[0], -1)


# --------------------------------------------------------------------------------------------
# From model outputs to what the meters take
# --------------------------------------------------------------------------------------------


def predicted_labels(logits: torch.Tensor) -> torch.Tensor:
    """Class labels the way the official DDESeg evaluation derives them.

    Args:
        logits: `[B, C, H, W]`. C == 1: a binary model's foreground logit.
    Returns:
        int64 `[B, H, W]`: for C == 1, `sigmoid(logit) > 0.5` (0 background, 1 foreground);
        otherwise the argmax of the softmax over C (`train.py::evaluation`). Both in float32.
    """
    if logits.dim() != 4:
        raise ValueError(f"logits must be [B, C, H, W], got shape {tuple(logits.shape)}")
    logits = logits.float()
    if logits.shape[1] == 1:
        return (torch.sigmoid(logits[:, 0]) > 0.5).long()
    # The official takes the argmax of the softmax, not of the logits; ties can differ.
    return torch.softmax(logits, dim=1).argmax(dim=1)


def foreground_logits(logits: torch.Tensor) -> torch.Tensor:
    """The logit of "some sounding class" for the AVSBench binary protocol.

    Args:
        logits: `[B, C, H, W]`; channel 0 is background when C > 1.
    Returns:
        float32 `[B, H, W]` whose sigmoid is the foreground probability: the logit itself for
        C == 1, else `logsumexp(logits[:, 1:]) - logits[:, 0]`, so that
        `sigmoid(result) == 1 - softmax(logits)[:, 0]`.
    """
    if logits.dim() != 4:
        raise ValueError(f"logits must be [B, C, H, W], got shape {tuple(logits.shape)}")
    logits = logits.float()
    if logits.shape[1] == 1:
        return logits[:, 0]
    return torch.logsumexp(logits[:, 1:], dim=1) - logits[:, 0]


# --------------------------------------------------------------------------------------------
# Multi-class: DDESeg protocol and AVSBench-semantic protocol
# --------------------------------------------------------------------------------------------

# Order of the state in `state_tensors()` and in the packed all-reduce buffer.
_COUNT_STATES = (
    "intersection",
    "predicted_pixels",
    "target_pixels",
    "avss_frames",
    "num_frames",
    "num_pixels",
    "target_frames",
    "confusion",
)
_SUM_STATES = ("avss_iou_sum", "avss_fscore_sum")


class SegmentationMeter:
    """Accumulates class-label predictions over a split for the DDESeg and AVSS protocols.

    See the module docstring for the definitions and their sources.

    Args:
        num_classes: classes including background (0); binary tasks are 2 classes.
        ignore_index: target value to leave out of every count (None: no such value).
        device: where the state lives; by default the device of the first `update`.

    Use: `update` per batch on each rank, then `all_reduce()` once (a no-op without a process
    group), then `compute()` on any rank. `merge` adds another meter's state (the same sum).
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None = IGNORE_INDEX,
        device: torch.device | str | None = None,
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + classes), got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._device = torch.device(device) if device is not None else None
        self._state: dict[str, torch.Tensor] | None = None
        self._reduced = False

    # ---- state

    def _zeros(self, device: torch.device) -> dict[str, torch.Tensor]:
        c = self.num_classes
        state = {
            "intersection": torch.zeros(c, dtype=torch.int64, device=device),
            "predicted_pixels": torch.zeros(c, dtype=torch.int64, device=device),
            "target_pixels": torch.zeros(c, dtype=torch.int64, device=device),
            "avss_frames": torch.zeros(c, dtype=torch.int64, device=device),
            "num_frames": torch.zeros((), dtype=torch.int64, device=device),
            "num_pixels": torch.zeros((), dtype=torch.int64, device=device),
            # For reports, not for either protocol: frames whose ground truth holds the class,
            # and pixels by (ground-truth class, predicted class).
            "target_frames": torch.zeros(c, dtype=torch.int64, device=device),
            "confusion": torch.zeros(c, c, dtype=torch.int64, device=device),
        }
        state.update({name: torch.zeros(c, dtype=torch.float64, device=device) for name in _SUM_STATES})
        return state

    def _ensure_state(self, device: torch.device) -> dict[str, torch.Tensor]:
        if self._state is None:
            self._state = self._zeros(self._device or device)
        return self._state

    def reset(self) -> None:
        self._state = None
        self._reduced = False

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Copies of the accumulated sums (int64 counts, float64 per-frame sums), by name."""
        state = self._ensure_state(self._device or torch.device("cpu"))
        return {name: tensor.clone() for name, tensor in state.items()}

    def merge(self, other: SegmentationMeter) -> SegmentationMeter:
        """Add `other`'s state into this meter (as if its batches had been given here); returns self."""
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge a meter of {other.num_classes} classes (ignore {other.ignore_index}) into "
                f"one of {self.num_classes} classes (ignore {self.ignore_index})"
            )
        if other._state is None:
            return self
        state = self._ensure_state(other._state["intersection"].device)
        for name, tensor in other._state.items():
            state[name] += tensor.to(state[name].device)
        return self

    def all_reduce(self, group: Any = None) -> SegmentationMeter:
        """Sum the state over the ranks of `group` (one collective); a no-op in a single process.

        Every rank must call it, once, after its last `update`. Returns self.
        """
        if not _distributed(group):
            return self
        if self._reduced:
            raise RuntimeError("SegmentationMeter.all_reduce called twice: the counts would be multiplied")
        state = self._ensure_state(self._device or torch.device("cpu"))
        names = (*_COUNT_STATES, *_SUM_STATES)
        # One float64 buffer: counts stay exact below 2**53.
        packed = torch.cat([state[name].reshape(-1).double() for name in names])
        backend = dist.get_backend(group)
        if backend == "gloo":
            packed = packed.cpu()
        elif backend == "nccl" and packed.device.type != "cuda":
            packed = packed.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for name in names:
            size = state[name].numel()
            chunk = packed[offset : offset + size].reshape(state[name].shape).to(state[name].device)
            state[name] = chunk.round().long() if state[name].dtype == torch.int64 else chunk
            offset += size
        self._reduced = True
        return self

    # ---- accumulation

    def _checked_frames(
        self, pred_labels: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`update`'s inputs as long `[B, H*W]` frames on one device, and the mask of scored
        (not ignored) pixels; raises for what `update` documents."""
        if self._reduced:
            raise RuntimeError("SegmentationMeter.update after all_reduce: reset() first")
        if pred_labels.shape != target.shape:
            raise ValueError(
                f"pred_labels {tuple(pred_labels.shape)} and target {tuple(target.shape)} differ"
            )
        if pred_labels.is_floating_point() or target.is_floating_point():
            raise ValueError(
                "pred_labels and target must be integer class ids (use predicted_labels(logits))"
            )
        pred = _as_frames(pred_labels, "pred_labels").long()
        gt = _as_frames(target, "target").to(pred.device).long()
        c = self.num_classes

        valid = (
            gt != self.ignore_index
            if self.ignore_index is not None
            else torch.ones_like(gt, dtype=torch.bool)
        )
        bad_pred = (((pred < 0) | (pred >= c)) & valid).any()
        bad_target = (((gt < 0) | (gt >= c)) & valid).any()
        bad_pred, bad_target = torch.stack([bad_pred, bad_target]).tolist()  # one sync
        if bad_target:
            values = sorted(torch.unique(gt[valid & ((gt < 0) | (gt >= c))]).tolist())[:10]
            raise DataError(
                f"ground-truth values {values} are not classes of this task (0..{c - 1}) nor the "
                f"ignore index {self.ignore_index}: map masks with task_label_lut for the task"
            )
        if bad_pred:
            raise ValueError(f"predicted labels outside 0..{c - 1}")
        return pred, gt, valid

    def update(self, pred_labels: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Add a batch of frames.

        Args:
            pred_labels: integer `[B, H, W]` (or `[H, W]`) predicted class ids in `[0, num_classes)`.
            target: integer, same shape: ground-truth ids in `[0, num_classes)` or `ignore_index`.
        Returns:
            float64 `[B]` on the input's device: each frame's mean IoU over the classes present in
            its prediction or ground truth (NaN if every pixel is ignored). For ranking frames
            (e.g. the worst ones); not a protocol of either paper.
        Raises:
            DataError: a ground-truth value that is neither a class nor `ignore_index`.
            ValueError: shapes differ, or a predicted label is out of range.
        """
        pred, gt, valid = self._checked_frames(pred_labels, target)
        batch, c = gt.shape[0], self.num_classes

        # Per-frame, per-class counts with one bincount each: frame f, class k -> bin f*C + k;
        # ignored pixels go to one extra bin that is dropped (no boolean indexing, no sync).
        frame_base = torch.arange(batch, device=pred.device).unsqueeze(1) * c
        dropped = batch * c

        def per_frame_counts(bins: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
            bins = torch.where(keep, bins + frame_base, dropped)
            return torch.bincount(bins.reshape(-1), minlength=dropped + 1)[:dropped].view(batch, c)

        inter = per_frame_counts(gt, valid & (pred == gt))  # [B, C]
        pred_area = per_frame_counts(pred, valid)
        target_area = per_frame_counts(gt, valid)
        union = pred_area + target_area - inter

        # AVSS: per-frame IoU and F of every class present in the frame.
        present = union > 0
        inter64, pred64, target64 = inter.double(), pred_area.double(), target_area.double()
        frame_iou = inter64 / (union.double() + AVSS_IOU_EPS)
        precision = inter64 / pred64.clamp_min(1)
        recall = inter64 / target64.clamp_min(1)
        frame_f = torch.where(
            inter > 0, _f_beta(precision, recall, FSCORE_BETA2), torch.zeros_like(frame_iou)
        )

        state = self._ensure_state(pred.device)
        updates = {
            "intersection": inter.sum(0),
            "predicted_pixels": pred_area.sum(0),
            "target_pixels": target_area.sum(0),
            "avss_frames": present.sum(0),
            "num_frames": torch.tensor(batch, device=pred.device),
            "num_pixels": valid.sum(),
            "target_frames": (target_area > 0).sum(0),
            "confusion": torch.bincount(
                torch.where(valid, gt * c + pred, c * c).reshape(-1), minlength=c * c + 1
            )[: c * c].view(c, c),
            "avss_iou_sum": frame_iou.sum(0),  # zero where absent: inter = 0 there
            "avss_fscore_sum": frame_f.sum(0),
        }
        for name, value in updates.items():
            state[name] += value.to(state[name].device)

        present_count = present.sum(1)
        return (frame_iou * present).sum(1) / present_count.double()  # NaN where nothing is present

    # ---- results

    def compute(self) -> dict[str, Any]:
        """The metrics of everything accumulated (call `all_reduce` first under torchrun).

        Returns a dict of plain Python values:
            `miou`, `fscore` (beta^2 = 0.3), `f1`: the DDESeg protocol;
            `avsbench_miou`, `avsbench_fscore`: the AVSS protocol;
            `num_classes_evaluated` (classes with non-zero union), `num_frames`, `num_pixels`;
            `per_class`: `{class_id: {...}}` for every class with `tp`, `fp`, `fn`, `union`,
            `target_pixels`, `predicted_pixels`, `evaluated`, `iou`, `precision`, `recall`,
            `fscore`, `f1` (None when not evaluated), `avsbench_frames`, `avsbench_iou`,
            `avsbench_fscore` (0.0 for a class in no frame, as that protocol counts it),
            `target_frames` (frames whose ground truth holds the class);
            `confusion`: `[num_classes][num_classes]` pixel counts, row = ground-truth class,
            column = predicted class (not part of either protocol; for reports).
        """
        state = {name: t.cpu() for name, t in self._ensure_state(self._device or torch.device("cpu")).items()}
        tp = state["intersection"].double()
        predicted = state["predicted_pixels"].double()
        target = state["target_pixels"].double()
        fp, fn = predicted - tp, target - tp
        union = tp + fp + fn
        evaluated = union > 0

        iou = tp / (union + DDESEG_EPS)
        precision = tp / (tp + fp + DDESEG_EPS)
        recall = tp / (tp + fn + DDESEG_EPS)
        fscore = _f_beta(precision, recall, FSCORE_BETA2, DDESEG_EPS)
        f1 = _f_beta(precision, recall, 1.0, DDESEG_EPS)

        def mean_evaluated(values: torch.Tensor) -> float:
            return values[evaluated].mean().item() if bool(evaluated.any()) else 0.0

        frames = state["avss_frames"]
        avss_iou = torch.where(frames > 0, state["avss_iou_sum"] / frames.clamp_min(1), 0.0)
        avss_f = torch.where(frames > 0, state["avss_fscore_sum"] / frames.clamp_min(1), 0.0)

        per_class: dict[int, dict[str, Any]] = {}
        for k in range(self.num_classes):
            on = bool(evaluated[k])
            per_class[k] = {
                "evaluated": on,
                "iou": iou[k].item() if on else None,
                "precision": precision[k].item() if on else None,
                "recall": recall[k].item() if on else None,
                "fscore": fscore[k].item() if on else None,
                "f1": f1[k].item() if on else None,
                "tp": int(tp[k]),
                "fp": int(fp[k]),
                "fn": int(fn[k]),
                "union": int(union[k]),
                "target_pixels": int(target[k]),
                "predicted_pixels": int(predicted[k]),
                "avsbench_frames": int(frames[k]),
                "avsbench_iou": avss_iou[k].item(),
                "avsbench_fscore": avss_f[k].item(),
                "target_frames": int(state["target_frames"][k]),
            }
        return {
            "miou": mean_evaluated(iou),
            "fscore": mean_evaluated(fscore),
            "f1": mean_evaluated(f1),
            "avsbench_miou": avss_iou.mean().item(),
            "avsbench_fscore": avss_f.mean().item(),
            "num_classes_evaluated": int(evaluated.sum()),
            "num_frames": int(state["num_frames"]),
            "num_pixels": int(state["num_pixels"]),
            "per_class": per_class,
            "confusion": state["confusion"].tolist(),
        }


# --------------------------------------------------------------------------------------------
# Binary: AVSBench S4 / MS3 protocol
# --------------------------------------------------------------------------------------------


def avsbench_thresholds(num_thresholds: int = AVSBENCH_NUM_THRESHOLDS) -> torch.Tensor:
    """The F-measure sweep's thresholds, float32 `[num_thresholds]`: `linspace(0, 1 - 1e-10)`.

    In float32 the end point rounds to exactly 1.0, so the last threshold only keeps pixels
    whose float32 sigmoid saturates to 1.0 (logits above ~16.6), as in the official `_eval_pr`.
    """
    return torch.linspace(0.0, 1.0 - 1e-10, num_thresholds, dtype=torch.float32)


class AVSBenchBinaryMeter:
    """The AVSBench S4/MS3 metrics (binary, per frame, foreground only).

    Source: github OpenNLPLab/AVSBench @ f7414af, `avs_scripts/avs_s4/utils/utility.py`
    (`mask_iou`, `Eval_Fmeasure`, `_eval_pr`; avs_ms3's copy is identical) as driven by
    `avs_scripts/avs_s4/test.py` with its default `--test_batch_size 1`, so one official batch is
    one video's 5 frames and the per-batch numbers are per-video numbers:

    - **IoU** (`avsbench_miou`): prediction = `sigmoid(logit) > 0.5` in float32. A frame with
      foreground: inter / (union + 1e-7). A frame whose ground truth is empty: (pixels where both
      are background) / (all pixels + 1e-7), i.e. 1 for an empty prediction and the background
      fraction otherwise. A video scores the mean over its frames; the split the mean over videos.
    - **F-measure** (`avsbench_fscore`): for each frame with foreground, at each of 255
      thresholds t_i = `avsbench_thresholds()` (i/254, the last exactly 1.0), a pixel is positive
      when `sigmoid(logit) >= t_i`; P = TP / (positives + 1e-20), R = TP / (foreground + 1e-20),
      F = 1.3 P R / (0.3 P + R), 0 where that is 0/0. A video's F curve is the mean of its
      foreground frames' curves and its score is the curve's maximum (the best threshold is chosen
      per video, not per split). Frames with empty ground truth are skipped, and a video with no
      foreground frame at all scores 0 and still counts. The split's F is the mean over videos.

    The state is one row per (video, frame): merging and all-reducing are exact whatever the
    split of frames between ranks, and a frame given twice is kept once (`duplicate_frames`).
    Rows live on the CPU (float64); the per-pixel work runs on the input's device.
    """

    def __init__(self, num_thresholds: int = AVSBENCH_NUM_THRESHOLDS) -> None:
        self.num_thresholds = num_thresholds
        self._thresholds = avsbench_thresholds(num_thresholds)
        self._rows: dict[tuple[str, int], torch.Tensor] = {}  # [iou, has_foreground, F curve...]
        self.duplicate_frames = 0

    def reset(self) -> None:
        self._rows.clear()
        self.duplicate_frames = 0

    def _add_row(self, key: tuple[str, int], row: torch.Tensor) -> None:
        if key in self._rows:
            self.duplicate_frames += 1
        else:
            self._rows[key] = row

    def update(
        self,
        foreground_logits: torch.Tensor,
        target: torch.Tensor,
        videos: Sequence[str],
        frames: Sequence[int],
    ) -> torch.Tensor:
        """Add a batch of frames.

        Args:
            foreground_logits: float `[B, H, W]` (or `[H, W]`) logits, before the sigmoid (see
                `foreground_logits` for multi-class models).
            target: `[B, H, W]` ground truth, 0 background, 1 foreground.
            videos, frames: the video id and frame index of each of the B frames.
        Returns:
            float64 `[B]` (CPU): each frame's AVSBench IoU.
        Raises:
            DataError: a target value other than 0 or 1.
            ValueError: shapes or lengths differ.
        """
        if foreground_logits.shape != target.shape:
            raise ValueError(
                f"logits {tuple(foreground_logits.shape)} and target {tuple(target.shape)} differ"
            )
        logits = _as_frames(foreground_logits, "foreground_logits").float()
        gt = _as_frames(target, "target").to(logits.device)
        batch, num_pixels = logits.shape
        if len(videos) != batch or len(frames) != batch:
            raise ValueError(f"{batch} frames but {len(videos)} video ids and {len(frames)} frame indices")
        if bool(((gt != 0) & (gt != 1)).any()):
            values = sorted(torch.unique(gt).tolist())[:10]
            raise DataError(f"the AVSBench binary protocol needs 0/1 masks, got values {values}")
        gt = gt.bool()

        probs = torch.sigmoid(logits)  # float32, as the official
        binary = probs > 0.5
        foreground = gt.sum(1)
        has_foreground = foreground > 0
        inter = torch.where(has_foreground, (binary & gt).sum(1), (~binary & ~gt).sum(1))
        union = torch.where(has_foreground, (binary | gt).sum(1), torch.full_like(foreground, num_pixels))
        iou = inter.double() / (union.double() + AVSBENCH_IOU_EPS)

        # Threshold sweep without a [B, T, pixels] tensor: `level` = how many thresholds a pixel
        # reaches (t_i <= p, the official's `>=`), histogrammed per frame; the positives at
        # threshold i are the pixels whose level exceeds i.
        t = self.num_thresholds
        level = torch.searchsorted(self._thresholds.to(probs.device), probs, right=True)  # [B, P] in 0..T
        frame_base = torch.arange(batch, device=probs.device).unsqueeze(1) * (t + 1)
        dropped = batch * (t + 1)

        def reaching(keep: torch.Tensor | None) -> torch.Tensor:
            bins = level + frame_base
            if keep is not None:
                bins = torch.where(keep, bins, dropped)
            hist = torch.bincount(bins.reshape(-1), minlength=dropped + 1)[:dropped].view(batch, t + 1)
            return hist.flip(1).cumsum(1).flip(1)[:, 1:]  # [B, T]: pixels with level > i

        positives = reaching(None).double()
        true_positives = reaching(gt).double()
        precision = true_positives / (positives + AVSBENCH_PR_EPS)
        recall = true_positives / (foreground.double().unsqueeze(1) + AVSBENCH_PR_EPS)
        curve = torch.where(
            true_positives > 0, _f_beta(precision, recall, FSCORE_BETA2), torch.zeros_like(precision)
        )
        curve = curve * has_foreground.unsqueeze(1)

        rows = torch.cat([iou.unsqueeze(1), has_foreground.double().unsqueeze(1), curve], dim=1).cpu()
        for i in range(batch):
            self._add_row((str(videos[i]), int(frames[i])), rows[i])
        return rows[:, 0].clone()

    def merge(self, other: AVSBenchBinaryMeter) -> AVSBenchBinaryMeter:
        """Add `other`'s frames (those not already here); returns self."""
        if other.num_thresholds != self.num_thresholds:
            raise ValueError(
                f"cannot merge meters of {other.num_thresholds} and {self.num_thresholds} thresholds"
            )
        self.duplicate_frames += other.duplicate_frames
        for key in sorted(other._rows):
            self._add_row(key, other._rows[key])
        return self

    def all_reduce(self, group: Any = None) -> AVSBenchBinaryMeter:
        """Gather every rank's frames on every rank (all ranks must call it); a no-op in one process.

        Rows are merged in rank order, so every rank ends with the same state. Returns self.
        """
        if not _distributed(group):
            return self
        keys = sorted(self._rows)
        rows = torch.stack([self._rows[k] for k in keys]) if keys else torch.zeros(0, self.num_thresholds + 2)
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, (keys, rows.numpy(), self.duplicate_frames), group=group)
        self.reset()
        for rank_keys, rank_rows, rank_duplicates in gathered:
            self.duplicate_frames += rank_duplicates
            rank_rows = torch.from_numpy(rank_rows)
            for key, row in zip(rank_keys, rank_rows, strict=True):
                self._add_row(tuple(key), row)
        return self

    def frame_ious(self) -> dict[tuple[str, int], float]:
        """Each frame's AVSBench IoU, keyed by (video, frame), in sorted order."""
        return {key: self._rows[key][0].item() for key in sorted(self._rows)}

    def compute(self) -> dict[str, Any]:
        """`avsbench_miou`, `avsbench_fscore` (means over videos), `num_videos`, `num_frames`,
        `num_empty_target_frames`, `duplicate_frames`. An empty meter gives 0.0 for both metrics."""
        keys = sorted(self._rows)
        if not keys:
            return {
                "avsbench_miou": 0.0,
                "avsbench_fscore": 0.0,
                "num_videos": 0,
                "num_frames": 0,
                "num_empty_target_frames": 0,
                "duplicate_frames": self.duplicate_frames,
            }
        rows = torch.stack([self._rows[k] for k in keys])  # sorted: the sums are order-independent
        video_names = sorted({video for video, _ in keys})
        video_index = {name: i for i, name in enumerate(video_names)}
        index = torch.tensor([video_index[video] for video, _ in keys])
        num_videos = len(video_names)

        def per_video(values: torch.Tensor) -> torch.Tensor:
            out = torch.zeros((num_videos, *values.shape[1:]), dtype=torch.float64)
            return out.index_add_(0, index, values)

        frames_per_video = per_video(torch.ones(len(keys), dtype=torch.float64))
        video_iou = per_video(rows[:, 0]) / frames_per_video
        foreground_frames = per_video(rows[:, 1])
        mean_curve = per_video(rows[:, 2:]) / foreground_frames.clamp_min(1).unsqueeze(1)
        video_f = torch.where(foreground_frames > 0, mean_curve.max(dim=1).values, 0.0)
        return {
            "avsbench_miou": video_iou.mean().item(),
            "avsbench_fscore": video_f.mean().item(),
            "num_videos": num_videos,
            "num_frames": len(keys),
            "num_empty_target_frames": int((rows[:, 1] == 0).sum()),
            "duplicate_frames": self.duplicate_frames,
        }
