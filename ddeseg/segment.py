"""Segment the sounding objects of a video file, frame by frame (what `ddeseg predict` runs).

Inputs
------
Frames and audio come from `ddeseg.video` (its docstring says which frame and which second of
audio each sampled frame gets: frame k is on screen at `t_k = k / F` and hears
`[t_k, t_k + clip_seconds)`). The checkpoint is loaded by `ddeseg.inference.load_for_inference`.
The log-mel is computed by prepare's `LogMelBatcher` around the model's own front end
(`DDESeg.frontend()`, so a filterbank loaded from a checkpoint is the one used), float16 as
`prepare` stores it in the shards, and the frame and log-mel go through `preprocess_for_model`,
the evaluation loader's function: the model gets bit for bit what evaluation gives it for the
same frame and audio (`model_inputs`; tests/test_predict.py checks it against the evaluation
loader).

Prediction
----------
The model's logits (at `data.image_size`) are resized to the frame size bilinearly
(`align_corners=False`, as mmseg resizes to the original shape) and turned into labels as
`ddeseg.metrics.predicted_labels` does: the argmax over classes (equal to the argmax of the
softmax up to exact ties), or `logit > 0` (sigmoid > 0.5) for a binary model (foreground = 1).
The resize runs a few classes at a time (`labels_at_size`) so that a 71-class model on a 4K frame
needs a few hundred MB, not gigabytes.

The `ddeseg predict` stage (one folder per video) is `ddeseg.pipelines.predict`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ddeseg.audio import LogMelBatcher
from ddeseg.config import Config
from ddeseg.data.augment import preprocess_for_model
from ddeseg.data.boxes import sounding_boxes
from ddeseg.errors import DDESegError
from ddeseg.video import SampledFrame, sample_frames

MASKS_DIR, OVERLAYS_DIR = "masks", "overlays"  # where `FramePrediction.to_json` says its pictures are
RESIZE_BUDGET = 1 << 25  # logits values (float32) resized at once: 128 MB


# --------------------------------------------------------------------------------------------
# Model inputs and labels
# --------------------------------------------------------------------------------------------


def model_inputs(
    frames: Sequence[SampledFrame], logmel: Callable[[np.ndarray], np.ndarray], config: Config
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model inputs of sampled frames, exactly as evaluation builds them (module docstring).

    Args:
        frames: sampled frames (uint8 images, mono waveforms at the front end's rate).
        logmel: prepare's log-mel computation, `LogMelBatcher(model.frontend(), device)`:
            float32 `[N, samples]` -> float16 `[N, frames, mel_bins]`, as stored in the shards.
        config: the run config (`data.image_size`).
    Returns:
        image float32 `[B, 3, S, S]` and log-mel float32 `[B, 1, frames, mel_bins]`, on the CPU.
    """
    logmels = logmel(np.stack([frame.audio for frame in frames]))
    pairs = [preprocess_for_model(frame.image, mel, config) for frame, mel in zip(frames, logmels, strict=True)]
    return torch.stack([image for image, _ in pairs]), torch.stack([mel for _, mel in pairs])


def labels_at_size(logits: torch.Tensor, size: tuple[int, int], budget: int = RESIZE_BUDGET) -> torch.Tensor:
    """Class labels of logits `[B, C, h, w]` at `size` = (H, W): uint8 `[B, H, W]` (same device).

    Bilinear resize (`align_corners=False`) of the logits, then `predicted_labels`' rule: argmax
    over C (first index on ties), or `logit > 0` when C == 1. Resizes at most `budget` values at
    a time (classes in groups), keeping a running maximum, so memory does not scale with C.
    """
    if logits.dim() != 4:
        raise ValueError(f"logits must be [B, C, H, W], got shape {tuple(logits.shape)}")
    batch, classes = logits.shape[:2]
    height, width = size
    if classes > 255:
        raise ValueError(f"{classes} classes do not fit an 8-bit mask")
    labels = torch.empty((batch, height, width), dtype=torch.uint8, device=logits.device)
    group = max(1, budget // max(1, height * width))
    for b in range(batch):
        if classes == 1:
            resized = F.interpolate(logits[b : b + 1].float(), size=size, mode="bilinear", align_corners=False)
            labels[b] = (resized[0, 0] > 0).to(torch.uint8)
            continue
        best = torch.full((height, width), -torch.inf, device=logits.device)
        best_class = torch.zeros((height, width), dtype=torch.uint8, device=logits.device)
        for start in range(0, classes, group):
            chunk = logits[b : b + 1, start : start + group].float()
            resized = F.interpolate(chunk, size=size, mode="bilinear", align_corners=False)[0]
            value, index = resized.max(dim=0)  # first maximum within the group
            better = value > best  # strict: an earlier group keeps a tie
            best = torch.where(better, value, best)
            best_class = torch.where(better, (index + start).to(torch.uint8), best_class)
        labels[b] = best_class
    return labels


@dataclass
class FramePrediction:
    """One sampled frame and what the model found in it (what `predict_video` yields)."""

    index: int
    time_s: float
    frame_time_s: float
    image: np.ndarray  # uint8 RGB [H, W, 3]
    mask: np.ndarray  # uint8 [H, W] class ids at the frame's size
    classes: list[dict[str, Any]]  # per class present: id, name, pixel_fraction, box
    union_box: list[float] | None  # box of every non-background pixel
    audio_source: str

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "time_s": round(self.time_s, 6),
            "frame_time_s": round(self.frame_time_s, 6),
            "audio": self.audio_source,
            "classes": self.classes,
            "union_box": self.union_box,
            "mask": f"{MASKS_DIR}/{frame_name(self.index)}",
            "overlay": f"{OVERLAYS_DIR}/{frame_name(self.index)}",
        }


def frame_name(index: int) -> str:
    return f"{index:06d}.png"


def classes_present(mask: np.ndarray, class_names: Sequence[str]) -> tuple[list[dict[str, Any]], list[float] | None]:
    """Per class in `mask` (background excluded): id, name, pixel fraction and normalised box, by id;
    and the union box. Boxes as `ddeseg.pipelines.bboxes` (inclusive pixel indices / size)."""

    ids, union_box, boxes = sounding_boxes(mask)
    counts = np.bincount(mask.ravel(), minlength=256)
    entries = [
        {
            "id": class_id,
            "name": class_names[class_id] if class_id < len(class_names) else f"class {class_id}",
            "pixel_fraction": round(float(counts[class_id]) / mask.size, 6),
            "box": [round(v, 6) for v in boxes[str(class_id)]],
        }
        for class_id in ids
    ]
    return entries, None if union_box is None else [round(v, 6) for v in union_box]


def predict_video(
    path: str | Path,
    model: torch.nn.Module,
    config: Config,
    class_names: Sequence[str],
    *,
    frames_per_second: float = 1.0,
    batch_size: int = 8,
    allow_no_audio: bool = False,
) -> Iterator[FramePrediction]:
    """Segment the sounding objects of a video file, one `FramePrediction` per sampled frame.

    Args:
        path: any video file FFmpeg reads (with an audio track unless `allow_no_audio`).
        model: a `DDESeg` with its memory bank, on the device to run on (put in eval mode here).
        config: its config (`data.image_size`, `data.clip_seconds`, `model.frontend`).
        class_names: names by class id (`model.num_classes` names; 2 for a binary model).
        frames_per_second: sampling rate F (frame k at k / F seconds).
        batch_size: frames per forward pass.
        allow_no_audio: predict with silence when the file has no audio track.
    Yields:
        `FramePrediction`s in order, masks at the video's frame size.
    Raises:
        `VideoError` for an unusable file, possibly after some frames were yielded (corrupt data).
    """
    yield from predict_frames(
        sample_frames(path, config, frames_per_second, allow_no_audio), model, config, class_names, batch_size=batch_size
    )


def predict_frames(
    frames: Iterable[SampledFrame],
    model: torch.nn.Module,
    config: Config,
    class_names: Sequence[str],
    *,
    batch_size: int = 8,
) -> Iterator[FramePrediction]:
    """Segment frames with their audio (from a video, or given in memory by `ddeseg.api`).

    Args:
        frames: `SampledFrame`s: uint8 RGB images of any size, mono float32 waveforms of
            `data.clip_seconds` at `model.frontend.sample_rate`.
        model, config, class_names, batch_size: as `predict_video`.
    Yields:
        one `FramePrediction` per frame, in order, masks at each frame's size.
    """
    if batch_size < 1:
        raise DDESegError(f"batch size must be >= 1, got {batch_size}")

    model.eval()
    device = next(model.parameters()).device
    # The model's own front end (e.g. a filterbank loaded from a checkpoint), run as prepare runs it.
    logmel = LogMelBatcher(model.frontend(), device, batch_size=batch_size)
    pending: list[SampledFrame] = []
    for frame in frames:
        pending.append(frame)
        if len(pending) == batch_size:
            yield from _predict_batch(pending, model, logmel, config, class_names, device)
            pending = []
    if pending:
        yield from _predict_batch(pending, model, logmel, config, class_names, device)


def _predict_batch(
    frames: list[SampledFrame],
    model: torch.nn.Module,
    logmel: Callable[[np.ndarray], np.ndarray],
    config: Config,
    class_names: Sequence[str],
    device: torch.device,
) -> Iterator[FramePrediction]:
    images, logmels = model_inputs(frames, logmel, config)
    with torch.inference_mode():
        logits = model(images.to(device), logmels.to(device))
        # Per frame: a stream may change its frame size mid-way.
        masks = [labels_at_size(logits[i : i + 1], frame.image.shape[:2])[0].cpu().numpy() for i, frame in enumerate(frames)]
    for frame, mask in zip(frames, masks, strict=True):
        entries, union_box = classes_present(mask, class_names)
        yield FramePrediction(
            frame.index, frame.time_s, frame.frame_time_s, frame.image, mask, entries, union_box, frame.audio_source
        )
