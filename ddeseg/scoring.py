"""Scoring a model over a split: `evaluate_model` runs it over an evaluation loader
(`make_eval_loader`, which gives every frame of the split to exactly one rank) and returns the
metrics of `ddeseg.metrics`:

- the DDESeg protocol (`miou`, `fscore` with beta^2 = 0.3, `f1`, `per_class`): predictions are
  `predicted_labels(logits)` (sigmoid > 0.5 for the binary tasks, which are scored as two
  classes, background and foreground), ground truth the loader's mask, both at the model's input
  size (the loader resizes the ground truth with nearest neighbour, as the official evaluation);
- the AVSBench protocol (`avsbench_miou`, `avsbench_fscore`): for the binary tasks (v1s, v1m:
  `model.num_classes == 1`) the per-video S4/MS3 protocol of `AVSBenchBinaryMeter` on the
  foreground logits, otherwise the AVSS per-frame protocol of `SegmentationMeter`.

Under torchrun every rank runs its frames and the meters are summed (gathered) across ranks, so
every rank returns the same numbers, equal to a single process's on the same split. With an
audio control (`ddeseg.audio_controls`) the frames hear other audio. Evaluation is
deterministic: `model.eval()`, float32, no random draw; evaluating twice gives identical numbers.
The training loop validates with it; the `ddeseg evaluate` stage is `ddeseg.pipelines.evaluate`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ddeseg.config import Config
from ddeseg.distributed import DistributedContext
from ddeseg.errors import DDESegError
from ddeseg.metrics import AVSBenchBinaryMeter, SegmentationMeter, foreground_logits, predicted_labels

if TYPE_CHECKING:
    pass
from ddeseg.audio_controls import AudioControl
from ddeseg.picture_choice import PictureCollector


def video_frame_ids(batch: dict[str, Any]) -> tuple[list[str], list[int]]:
    """Video id and frame index of every frame of a batch (the binary protocol groups by video).

    From the batch's `video` / `frame` fields when the loader provides them, else from the
    sample key `{task}-{video}-{frame:03d}` (`schema.sample_key`): everything before the last
    `-` names the video (unique within a task), the rest is the frame index.
    """
    if "video" in batch and "frame" in batch:
        frames = batch["frame"]
        frames = frames.tolist() if torch.is_tensor(frames) else list(frames)
        return [str(v) for v in batch["video"]], [int(f) for f in frames]
    videos, frames = [], []
    for key in batch["key"]:
        video, _, frame = str(key).rpartition("-")
        if not video or not frame.isdigit():
            raise DDESegError(f"sample key {key!r} is not of the form TASK-VIDEO-FRAME; cannot group frames by video")
        videos.append(video)
        frames.append(int(frame))
    return videos, frames


def _select(batch: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
    """The frames of `batch` where `keep` (bool `[B]`) is true."""
    index = keep.nonzero().flatten().tolist()
    out: dict[str, Any] = {}
    for name, value in batch.items():
        if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == keep.shape[0]:
            out[name] = value[keep.to(value.device)]
        elif isinstance(value, (list, tuple)) and len(value) == keep.shape[0]:
            out[name] = [value[i] for i in index]
        else:
            out[name] = value
    return out


def class_entries(per_class: dict[int, dict[str, Any]], class_names: Sequence[str] | None) -> dict[int, dict[str, Any]]:
    """`per_class` with each class's `name` (default `class_{id}`)."""
    return {
        k: {"name": class_names[k] if class_names is not None and k < len(class_names) else f"class_{k}", **entry}
        for k, entry in per_class.items()
    }


def annotated_frames(batch: dict[str, Any], audio: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor] | None:
    """The annotated frames of `batch` and their `audio` (all of them when the batch has no
    `annotated` field); None when no frame of the batch is annotated."""
    if "annotated" not in batch or bool(batch["annotated"].all()):
        return batch, audio
    keep = batch["annotated"].bool()
    batch = _select(batch, keep)
    if not batch["key"]:
        return None
    return batch, audio[keep.to(audio.device)]


def score_batch(
    model: torch.nn.Module,
    batch: dict[str, Any],
    audio: torch.Tensor,
    device: torch.device,
    meter: SegmentationMeter,
    binary_meter: AVSBenchBinaryMeter | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run `model` on one batch with `audio`, feed the meters, and return `(target, predicted
    labels, per-frame scores)` (on `device`; the scores are `SegmentationMeter.update`'s)."""
    image = batch["image"].to(device, non_blocking=True)
    target = batch["mask"].to(device, non_blocking=True)
    logits = model(image, audio.to(device, non_blocking=True)).float()
    if logits.shape[-2:] != target.shape[-2:]:
        # The official head returns logits at the input size; upsample others to it.
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    labels = predicted_labels(logits)
    scores = meter.update(labels, target)
    if binary_meter is not None:
        videos, frames = video_frame_ids(batch)
        binary_meter.update(foreground_logits(logits), target, videos, frames)
    return target, labels, scores


def _score_batches(
    model: torch.nn.Module,
    batches: Iterable[tuple[dict[str, Any], torch.Tensor]],
    context: DistributedContext,
    meters: tuple[SegmentationMeter, AVSBenchBinaryMeter | None],
    pictures: PictureCollector | None,
    progress: Any,
) -> None:
    """The batch loop of `evaluate_model`: score every annotated frame of `batches` (`(batch,
    audio)` pairs) in eval mode without gradients, keep pictures, advance the bar."""
    meter, binary_meter = meters
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch, audio in batches:
                kept = annotated_frames(batch, audio)
                if kept is None:
                    continue
                batch, audio = kept
                target, labels, scores = score_batch(model, batch, audio, context.device, meter, binary_meter)
                if pictures is not None:
                    pictures.add(
                        list(batch["key"]), batch["image"], target, labels, scores, logmels=audio,
                        sounding=batch.get("classes"), videos=batch.get("video"), frames=batch.get("frame"),
                    )
                if progress is not None:
                    bar, task_id = progress
                    bar.advance(task_id, len(batch["key"]) * context.world_size)
    finally:
        model.train(was_training)


def reduce_scores(
    meter: SegmentationMeter, binary_meter: AVSBenchBinaryMeter | None, class_names: Sequence[str] | None
) -> dict[str, Any]:
    """Sum the meters across ranks (every rank must call it) and compute the result dict: the
    DDESeg protocol, and the AVSBench one (binary meter when given, else the AVSS numbers)."""
    meter.all_reduce()
    result = meter.compute()
    result["per_class"] = class_entries(result["per_class"], class_names)
    if binary_meter is not None:
        binary_meter.all_reduce()
        binary_result = binary_meter.compute()
        for name in ("avsbench_miou", "avsbench_fscore", "num_videos", "num_empty_target_frames", "duplicate_frames"):
            result[name] = binary_result[name]
        # The per-class AVSS numbers are not the binary protocol's; leave them out.
        for entry in result["per_class"].values():
            for name in ("avsbench_frames", "avsbench_iou", "avsbench_fscore"):
                entry.pop(name, None)
        result["avsbench_protocol"] = "AVSBench S4/MS3 (binary, per video)"
    else:
        result["avsbench_protocol"] = "AVSBench AVSS (semantic, per frame)"
    return result


def _unchanged_frames(control: AudioControl, context: DistributedContext) -> int:
    """`control.unchanged_frames` summed across ranks (every rank must call it)."""
    unchanged = torch.tensor([control.unchanged_frames], dtype=torch.float64)
    if context.is_distributed and dist.is_available() and dist.is_initialized():
        unchanged = unchanged.to(context.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(unchanged)
    return int(unchanged.item())


def evaluate_model(
    model: torch.nn.Module,
    loader: Iterable[dict[str, Any]],
    config: Config,
    context: DistributedContext,
    *,
    audio_control: str = "none",
    pictures: PictureCollector | None = None,
    class_names: Sequence[str] | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Score `model` on this rank's batches and reduce across ranks.

    Args:
        model: a DDESeg model (not DDP-wrapped) on `context.device`; `model(image, logmel)` gives
            logits `[B, C, H, W]`, C == 1 for the binary tasks. Its train/eval mode is restored.
        loader: batches of `make_eval_loader` (`image`, `mask`, `logmel`, `key`; `annotated` and
            `video`/`frame` when present). Unannotated frames are skipped.
        config: the run config (`model.num_classes`, `model.frontend` for `silent`).
        context: rank, world size and device. Every rank must call this (collectives inside).
        audio_control: `none`, `shuffled` or `silent` (see the module docstring).
        pictures: collects frames to draw; after the call it holds the split-wide selection.
        class_names: names of the task's classes by task id (added to `per_class`).
        progress: a `(rich Progress, task id)` pair to advance by frames, on the main rank.
    Returns:
        the dict of `SegmentationMeter.compute()` (`miou`, `fscore`, `f1`, `per_class` keyed by
        task class id, each with a `name`, `num_frames`, ...) with `avsbench_miou` /
        `avsbench_fscore` from the binary meter for binary tasks (plus its `num_videos`,
        `num_empty_target_frames`), and `binary`, `num_classes`, `avsbench_protocol`,
        `audio_control`, `audio_control_unchanged_frames`. Identical on every rank.
    """
    binary = config.model.num_classes == 1
    meter = SegmentationMeter(2 if binary else config.model.num_classes, device=context.device)
    binary_meter = AVSBenchBinaryMeter() if binary else None
    control = AudioControl(audio_control, model, config)
    _score_batches(model, control(loader), context, (meter, binary_meter), pictures, progress)
    # The collectives run in the same order on every rank: meters, pictures, unchanged frames.
    result = reduce_scores(meter, binary_meter, class_names)
    if pictures is not None:
        pictures.gather()
    result.update(
        binary=binary,
        num_classes=meter.num_classes,
        audio_control=audio_control,
        audio_control_unchanged_frames=_unchanged_frames(control, context),
    )
    return result
