"""Evaluation: the official metrics over a split, audio-reliance controls, and the `ddeseg evaluate` stage.

`evaluate_model` runs a model over an evaluation loader (`make_eval_loader`, which gives every
frame of the split to exactly one rank) and returns the metrics of `ddeseg.metrics`:

- the DDESeg protocol (`miou`, `fscore` with beta^2 = 0.3, `f1`, `per_class`): predictions are
  `predicted_labels(logits)` (sigmoid > 0.5 for the binary tasks, which are scored as two
  classes, background and foreground), ground truth the loader's mask, both at the model's input
  size (the loader resizes the ground truth with nearest neighbour, as the official evaluation);
- the AVSBench protocol (`avsbench_miou`, `avsbench_fscore`): for the binary tasks (v1s, v1m:
  `model.num_classes == 1`) the per-video S4/MS3 protocol of `AVSBenchBinaryMeter` on the
  foreground logits, otherwise the AVSS per-frame protocol of `SegmentationMeter`.

Under torchrun every rank runs its frames and the meters are summed (gathered) across ranks, so
every rank returns the same numbers, equal to a single process's on the same split.

Audio-reliance controls (`audio_control`): the model sees the frame with other audio, and the drop
from the normal score (`none`: no control, the frame's own audio; reports call it `normal`) says
how much it uses sound.

- `shuffled`: each frame gets the log-mel of another frame of its batch: frame i takes frame
  i + 1's (cyclically), a derangement for any batch of two or more. A batch of one frame takes
  the first frame of the previous batch on its rank; a rank's first batch, when it holds one
  frame, takes the next batch's. A rank that holds a single frame in all keeps its own audio
  (counted in `audio_control_unchanged_frames`). The numbers thus depend on how frames are
  batched (batch size, number of ranks), but not on anything random.
- `silent`: the log-mel of a zero waveform, computed by the model's own front end
  (`LogMelFrontend`): -100 dB everywhere (its floor), not zeros, which would be a loud 0 dB.

Evaluation is deterministic: `model.eval()`, float32, no random draw; evaluating twice gives
identical numbers.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ddeseg.config import STAGE_KEY_CHOICES, Config, check_overrides
from ddeseg.distributed import DistributedContext, barrier
from ddeseg.errors import DDESegError
from ddeseg.fileio import reporting_disk_full
from ddeseg.inference import InferenceModel, load_for_inference, require_bank_classes, require_output_folder
from ddeseg.metrics import AVSBenchBinaryMeter, SegmentationMeter, foreground_logits, predicted_labels
from ddeseg.stage import ConfigSource, write_stage_config
from ddeseg.visualize import (
    FramePicture,
    audio_label,
    contact_sheet,
    denormalize_images,
    frame_picture,
    picture_name,
    save_png,
    video_strip,
)

if TYPE_CHECKING:
    from ddeseg.data.shards import ShardIndex

AUDIO_CONTROLS = STAGE_KEY_CHOICES["eval.audio_control"]
EVAL_JSON, EVAL_MD, EVAL_HTML = "eval.json", "eval.md", "eval.html"
PICTURES_DIR, WORST_SHEET = "pictures", "worst-frames.png"
STRIP_VIDEOS = 12  # videos kept for the best / median / worst video strips


# --------------------------------------------------------------------------------------------
# Audio-reliance controls
# --------------------------------------------------------------------------------------------


def silent_logmel(model: torch.nn.Module, config: Config, frames: int, mel_bins: int) -> torch.Tensor:
    """float32 `[frames, mel_bins]` (CPU): the log-mel of a zero waveform by the model's front end.

    Uses the model's own front end (`DDESeg.frontend()`, or its `Spectrogram` and
    `LogMelFilterBank` modules), so a filterbank loaded from a checkpoint is the one used; a
    model without one gets a `LogMelFrontend` built from `config.model.frontend`. The waveform is long enough for `frames` frames.
    """
    from ddeseg.models.frontend import LogMelFilterBank, LogMelFrontend, Spectrogram

    if callable(getattr(model, "frontend", None)):
        frontend = model.frontend()  # DDESeg: its own extractors, e.g. a loaded filterbank
    else:
        spectrogram = next((m for m in model.modules() if isinstance(m, Spectrogram)), None)
        filterbank = next((m for m in model.modules() if isinstance(m, LogMelFilterBank)), None)
        if spectrogram is not None and filterbank is not None:
            frontend = LogMelFrontend.from_modules(spectrogram, filterbank)
        else:
            frontend = LogMelFrontend(config.model.frontend)
    hop, n_fft = config.model.frontend.hop_length, config.model.frontend.n_fft
    samples = max((frames - 1) * hop, n_fft)  # reflect padding needs more than n_fft / 2 samples
    device = next((p.device for p in frontend.parameters()), torch.device("cpu"))
    with torch.no_grad():
        logmel = frontend(torch.zeros(1, samples, device=device))[0].float().cpu()  # [frames', mel]
    if logmel.shape[1] != mel_bins:
        raise DDESegError(
            f"the model front end makes {logmel.shape[1]} mel bins but the shards' log-mels have {mel_bins}:"
            " the checkpoint's config does not match these shards"
        )
    # Every frame of silence is the same; repeat the last one if the front end made fewer frames.
    index = torch.arange(frames).clamp(max=logmel.shape[0] - 1)
    return logmel[index]


class AudioControl:
    """Pairs each batch with the audio the model is given, under one of `AUDIO_CONTROLS`.

    Iterate `control(batches)` to get `(batch, audio)`; `unchanged_frames` counts frames that
    kept their own audio under `shuffled` (only a rank holding one frame in all).
    """

    def __init__(self, mode: str, model: torch.nn.Module, config: Config) -> None:
        if mode not in AUDIO_CONTROLS:
            raise DDESegError(f"audio control {mode!r} is not one of {', '.join(AUDIO_CONTROLS)}")
        self.mode, self.model, self.config = mode, model, config
        self.unchanged_frames = 0
        self._silent: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, batches: Iterable[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
        if self.mode == "shuffled":
            yield from self._shuffled(batches)
            return
        for batch in batches:
            audio = batch["logmel"]
            yield batch, (self._silent_like(audio) if self.mode == "silent" else audio)

    def _silent_like(self, audio: torch.Tensor) -> torch.Tensor:
        frames, mel_bins = audio.shape[-2], audio.shape[-1]
        if (frames, mel_bins) not in self._silent:
            self._silent[frames, mel_bins] = silent_logmel(self.model, self.config, frames, mel_bins)
        return self._silent[frames, mel_bins].to(audio.dtype).expand(audio.shape).contiguous()

    def _shuffled(self, batches: Iterable[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
        pending: dict[str, Any] | None = None  # a first batch of one frame, waiting for a donor
        previous: torch.Tensor | None = None  # the last batch's own audio
        for batch in batches:
            audio = batch["logmel"]
            if audio.shape[0] >= 2:
                control = audio.roll(-1, dims=0)  # frame i hears frame i + 1
            elif previous is not None:
                control = previous[:1]
            else:
                pending, previous = batch, audio
                continue
            if pending is not None:
                yield pending, audio[:1]
                pending = None
            yield batch, control
            previous = audio
        if pending is not None:
            self.unchanged_frames += pending["logmel"].shape[0]
            yield pending, pending["logmel"]


# --------------------------------------------------------------------------------------------
# Frames kept for pictures
# --------------------------------------------------------------------------------------------


@dataclass
class PictureCollector:
    """Keeps the frames to draw, chosen the same whatever the number of ranks:

    - `samples` chosen frames (`chosen_frames()`), across videos, at most one per video while
      there are enough videos: a quarter (at least one) the best by frame IoU, a quarter the
      worst, a quarter the nearest to the split's median frame IoU, the rest at random (seeded by
      `seed`: the smallest hashes of `seed:key`); the median ones come from a random pool of
      `4 * samples` videos (a picture is kept only for candidates, not for every frame). With
      `keep` (key -> why it was chosen), exactly those frames instead, in that order: the demo
      gives the shuffled and silent evaluations the frames the normal one chose.
    - the `worst` frames by frame IoU (`worst_frames()`; ties by key; frames without a score are
      never chosen by score);
    - every frame of `videos` videos (default `STRIP_VIDEOS`, none when `samples` is 0) spread
      over the split (by a hash of the video id), from which `video_strips` picks the best, median
      and worst video by video IoU (the mean of its frames' IoUs).

    Each pool holds one frame per video and only the videos that can still be chosen: a video
    among the n first of the whole split is among the n first of every rank that sees it.
    `evaluate_model` calls `add` per batch and `gather` at the end, after which every rank holds
    the final selection.
    """

    samples: int = 16
    worst: int = 16
    videos: int | None = None  # default: STRIP_VIDEOS when samples are drawn, else none
    seed: int = 0
    keep: dict[str, str] | None = None
    _best: dict[str, FramePicture] = field(default_factory=dict)  # video -> its best frame
    _low: dict[str, FramePicture] = field(default_factory=dict)  # video -> its worst frame
    _random: dict[str, FramePicture] = field(default_factory=dict)  # video -> its smallest-hash frame
    _kept: dict[str, FramePicture] = field(default_factory=dict)
    _scores: dict[str, float] = field(default_factory=dict)  # every scored frame
    _worst: dict[str, FramePicture] = field(default_factory=dict)
    _videos: dict[str, dict[str, FramePicture]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.videos is None:
            self.videos = STRIP_VIDEOS if self.samples > 0 else 0

    def _hash(self, key: str) -> int:
        return zlib.crc32(f"{self.seed}:{key}".encode())

    def _quota(self) -> int:
        """Frames per chosen kind (best, median, worst)."""
        return max(1, self.samples // 4) if self.samples > 0 else 0

    def _pool_orders(self) -> dict[str, tuple[Any, int]]:
        """Per pool: how frames rank inside it (smallest first) and how many videos it keeps."""
        quota = self._quota()
        return {
            "_best": (lambda f: (-f.score, f.key), 2 * quota + 2),
            "_low": (lambda f: (f.score, f.key), 2 * quota + 2),
            "_random": (lambda f: (self._hash(f.key), f.key), 4 * max(0, self.samples)),
        }

    def _pool_add(self, name: str, frame: FramePicture) -> None:
        order, limit = self._pool_orders()[name]
        pool: dict[str, FramePicture] = getattr(self, name)
        video = frame.video if frame.video is not None else frame.key
        if name != "_random" and not math.isfinite(frame.score):
            return
        if video not in pool or order(frame) < order(pool[video]):
            pool[video] = frame
        if len(pool) > limit:
            for dropped in sorted(pool, key=lambda v: (order(pool[v]), v))[limit:]:
                del pool[dropped]

    def add(
        self,
        keys: Sequence[str],
        images: torch.Tensor,
        targets: torch.Tensor,
        predictions: torch.Tensor,
        scores: torch.Tensor,
        *,
        logmels: torch.Tensor | None = None,
        sounding: Sequence[Sequence[int]] | None = None,
        videos: Sequence[str] | None = None,
        frames: torch.Tensor | Sequence[int] | None = None,
    ) -> None:
        """One batch: normalised images `[B, 3, S, S]`, targets and predicted ids `[B, S, S]`, scores `[B]`;
        optionally the log-mels the model was given `[B, 1, T, M]`, the task ids sounding in each
        frame (the loader's `classes`), and each frame's video id and index (the loader's `video`,
        `frame`; without them no video strip is kept and each frame counts as its own video)."""
        if self.samples <= 0 and self.worst <= 0 and self.videos <= 0 and not self.keep:
            return
        scores_list = [float(s) for s in scores.detach().cpu().tolist()]
        frame_list = [int(f) for f in (frames.tolist() if torch.is_tensor(frames) else frames)] if frames is not None else None
        for key, score in zip(keys, scores_list, strict=True):
            if math.isfinite(score):
                self._scores[key] = score
        worst_candidates = dict(self._worst)
        for key, score in zip(keys, scores_list, strict=True):
            if math.isfinite(score):
                worst_candidates[key] = score  # type: ignore[assignment]
        worst_keys = set(self._select_worst(worst_candidates))
        video_ids = set(self._select_videos({*self._videos, *(videos or ())})) if videos is not None and frame_list is not None else set()
        in_video = [videos is not None and str(videos[i]) in video_ids for i in range(len(keys))]
        # Every frame is a candidate of the chosen pools; it is drawn (denormalised, copied) once.
        pictures = self._pictures(keys, images, targets, predictions, scores_list, logmels, sounding, videos, frame_list)
        for i, key in enumerate(keys):
            frame = pictures(i)
            if self.keep is not None:
                if key in self.keep:
                    self._kept[key] = frame
            elif self.samples > 0:
                for name in ("_best", "_low", "_random"):
                    self._pool_add(name, frame)
            if key in worst_keys:
                self._worst[key] = frame
            if in_video[i]:
                self._videos.setdefault(str(videos[i]), {})[key] = frame  # type: ignore[index]
        self._worst = {k: v for k, v in self._worst.items() if k in worst_keys}
        if video_ids:
            self._videos = {v: f for v, f in self._videos.items() if v in video_ids}

    @staticmethod
    def _pictures(
        keys: Sequence[str],
        images: torch.Tensor,
        targets: torch.Tensor,
        predictions: torch.Tensor,
        scores_list: list[float],
        logmels: torch.Tensor | None,
        sounding: Sequence[Sequence[int]] | None,
        videos: Sequence[str] | None,
        frame_list: list[int] | None,
    ) -> Callable[[int], FramePicture]:
        """A function `i -> FramePicture` of frame i of the batch, built on first use."""
        cache: dict[int, FramePicture] = {}

        def picture(i: int) -> FramePicture:
            if i not in cache:
                audio = None
                if logmels is not None:
                    chosen = logmels.detach()[i].float().cpu().numpy()
                    audio = chosen.reshape(-1, chosen.shape[-1])  # [T, M]
                cache[i] = FramePicture(
                    keys[i], denormalize_images(images.detach()[i : i + 1])[0],
                    targets.detach()[i].cpu().numpy().astype(np.uint8), predictions.detach()[i].cpu().numpy().astype(np.uint8),
                    scores_list[i], logmel=audio,
                    sounding=None if sounding is None else tuple(int(c) for c in sounding[i]),
                    video=None if videos is None else str(videos[i]),
                    frame=None if frame_list is None else frame_list[i],
                )
            return cache[i]

        return picture

    def _select_videos(self, videos: Iterable[str]) -> list[str]:
        return sorted(videos, key=lambda video: (zlib.crc32(video.encode()), video))[: max(0, self.videos)]

    def _select_worst(self, candidates: dict[str, Any]) -> list[str]:
        def score(key: str) -> float:
            value = candidates[key]
            return value.score if isinstance(value, FramePicture) else float(value)

        return sorted(candidates, key=lambda key: (score(key), key))[: max(0, self.worst)]

    def gather(self, group: Any = None) -> PictureCollector:
        """Merge every rank's frames on every rank (all ranks must call it); a no-op in one process."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1):
            return self
        gathered: list[Any] = [None] * dist.get_world_size(group)
        pools = ("_best", "_low", "_random")
        mine = (
            {name: list(getattr(self, name).values()) for name in pools}, list(self._kept.values()), self._scores,
            list(self._worst.values()), [f for v in self._videos.values() for f in v.values()],
        )
        dist.all_gather_object(gathered, mine, group=group)
        for name in pools:
            setattr(self, name, {})
        worst: dict[str, FramePicture] = {}
        videos: dict[str, dict[str, FramePicture]] = {}
        for rank_pools, rank_kept, rank_scores, rank_worst, rank_videos in gathered:
            for name in pools:
                for frame in rank_pools[name]:
                    self._pool_add(name, frame)
            self._kept.update({frame.key: frame for frame in rank_kept})
            self._scores.update(rank_scores)
            worst.update({frame.key: frame for frame in rank_worst})
            for frame in rank_videos:
                videos.setdefault(str(frame.video), {})[frame.key] = frame
        self._worst = {k: worst[k] for k in self._select_worst(worst)}
        self._videos = {v: videos[v] for v in self._select_videos(videos)}
        return self

    def median_score(self) -> float | None:
        """The median frame IoU of every scored frame (None when none was scored)."""
        values = sorted(self._scores.values())
        if not values:
            return None
        middle = len(values) // 2
        return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2

    def chosen_frames(self) -> list[tuple[str, FramePicture]]:
        """`(why, frame)` of the chosen frames, `why` one of `best`, `median`, `worst`, `random`
        (or the reason given in `keep`), best first, then median, worst, random; at most one frame
        per video, two when the split has too few videos."""
        if self.keep is not None:
            return [(why, self._kept[key]) for key, why in self.keep.items() if key in self._kept]
        if self.samples <= 0:
            return []
        quota = self._quota()
        median = self.median_score()
        orders = self._pool_orders()
        candidates = {
            "best": sorted(self._best.values(), key=orders["_best"][0]),
            "worst": sorted(self._low.values(), key=orders["_low"][0]),
            "median": sorted(
                (f for f in self._random.values() if math.isfinite(f.score)),
                key=lambda f: (abs(f.score - (median or 0.0)), self._hash(f.key), f.key),
            ),
            "random": sorted(self._random.values(), key=orders["_random"][0]),
        }
        wanted = {"best": quota, "median": quota if self.samples >= 3 else 0, "worst": quota if self.samples >= 2 else 0}
        wanted["random"] = max(0, self.samples - sum(wanted.values()))
        for per_video in (1, 2):
            chosen: dict[str, tuple[str, FramePicture]] = {}
            used: dict[str, int] = {}
            for why in ("best", "worst", "median", "random"):
                taken = 0
                for frame in candidates[why]:
                    video = frame.video if frame.video is not None else frame.key
                    if taken == wanted[why]:
                        break
                    if frame.key in chosen or used.get(video, 0) >= per_video:
                        continue
                    chosen[frame.key] = (why, frame)
                    used[video] = used.get(video, 0) + 1
                    taken += 1
            if len(chosen) >= min(self.samples, len(self._scores)):
                break
        order = {"best": 0, "median": 1, "worst": 2, "random": 3}
        return sorted(chosen.values(), key=lambda item: (order[item[0]], -item[1].score if math.isfinite(item[1].score) else 0.0, item[1].key))

    def sample_frames(self) -> list[FramePicture]:
        """The chosen frames (`chosen_frames`) without their reasons."""
        return [frame for _, frame in self.chosen_frames()]

    def worst_frames(self) -> list[FramePicture]:
        return [self._worst[k] for k in self._select_worst(self._worst)]

    def video_strips(self) -> list[tuple[str, str, float, list[FramePicture]]]:
        """`(label, video, video IoU, frames by index)` for the best, median and worst kept video
        with at least two frames and a score (fewer when fewer such videos were kept; a video is
        listed once). Video IoU: the mean IoU of its scored frames; ties by video id."""
        scored = []
        for video, frames in self._videos.items():
            ordered = sorted(frames.values(), key=lambda f: (f.frame if f.frame is not None else 0, f.key))
            values = [f.score for f in ordered if math.isfinite(f.score)]
            if len(ordered) >= 2 and values:
                scored.append((sum(values) / len(values), video, ordered))
        scored.sort(key=lambda item: (-item[0], item[1]))  # best first
        if not scored:
            return []
        picks = {"best": 0, "median": (len(scored) - 1) // 2, "worst": len(scored) - 1}
        strips, seen = [], set()
        for label, position in picks.items():
            if position not in seen:
                seen.add(position)
                score, video, ordered = scored[position]
                strips.append((label, video, score, ordered))
        return strips


# --------------------------------------------------------------------------------------------
# The evaluation loop
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# The `ddeseg evaluate` stage
# --------------------------------------------------------------------------------------------


@dataclass
class EvaluatePaths:
    """What `run_evaluation` reads and writes (its settings are `config.eval`, and the loader's
    `data.eval_batch_size`, `data.num_workers`)."""

    checkpoint: Path
    shards: Path
    out: Path  # eval.json, eval.md, eval.html, pictures/, config.yaml
    memory_bank: Path | None = None  # required for official checkpoints (they hold no bank)


def run_evaluation(
    config: ConfigSource,
    paths: EvaluatePaths,
    context: DistributedContext,
    *,
    progress: bool = True,
    pictures: PictureCollector | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint on a split of prepared shards and, on rank 0, write `eval.json`,
    `eval.md`, `pictures/` and `config.yaml` into `paths.out`. Returns the eval.json dict (every rank).

    The config is the checkpoint's (or `config.file`, required for official checkpoints) with
    `config.overrides` on top; `eval.split`, `eval.audio_control`, `eval.pictures`,
    `eval.worst_frames`, `task`, `data.eval_batch_size` and `data.num_workers` decide the run.

    A split not scored whole (frames of a corrupt or cut shard skipped) gives `"partial": true`
    with `counts.frames_not_scored` and `skipped_shards`, and a warning; `ddeseg evaluate` then
    exits 3 unless `--allow-partial`.

    `pictures`: the frames to draw (default: `eval.pictures` chosen frames seeded by
    `train.seed`, `eval.worst_frames` worst); the caller may read its frames afterwards (the demo
    passes the frames the normal evaluation chose to the shuffled and silent ones)."""
    out_dir = require_output_folder(paths.out)
    index, loaded = load_checked(config, paths)
    config = loaded.config  # resolved (eval.audio_control and eval.split are checked on load)
    task, split = config.task, config.eval.split
    class_names = index.task_class_names(task)
    _warn_checkpoint(loaded, index, context)
    shards = index.shards(task, split)
    total = index.count(task, split, annotated_only=True)
    errors_dir = out_dir / "data_errors"
    result, collector = _evaluate_split(
        loaded.model, config, index, shards, total, errors_dir, context, progress=progress, pictures=pictures
    )
    barrier()  # every rank's loader workers have written their error logs
    report = build_report(result, config, paths.checkpoint, loaded, total=total, errors_dir=errors_dir, world_size=context.world_size)
    report["shards"] = str(Path(paths.shards).resolve())
    report.update(partial_result(report["counts"]["frames_not_scored"], errors_dir, shards, index.root))
    if context.is_main:
        with reporting_disk_full(out_dir, "the evaluation"):  # one line, not a traceback
            _write_and_announce(report, collector, out_dir, class_names, config, errors_dir)
    return report


def load_checked(config: ConfigSource, paths: EvaluatePaths) -> tuple[ShardIndex, InferenceModel]:
    """`(ShardIndex, InferenceModel)`: the shard folder and the checkpoint, checked against each
    other before any frame is read (overrides, front end, number of classes, memory bank)."""
    from ddeseg.data.shards import ShardIndex

    check_overrides(config.overrides)  # a typo fails now, not after the checkpoint is read
    index = ShardIndex(paths.shards)
    loaded = load_for_inference(paths.checkpoint, config.file, config.overrides, paths.memory_bank)
    index.check_frontend(loaded.model, checkpoint=paths.checkpoint)  # shards' log-mels vs the model's filterbank
    task = loaded.config.task
    expected = index.num_outputs(task)
    if loaded.config.model.num_classes != expected:
        raise DDESegError(
            f"the model has {loaded.config.model.num_classes} output classes but task {task!r} of {index.root} needs"
            f" {expected}: evaluate it on its own task (--task) or with the matching --config"
        )
    require_bank_classes(loaded, len(index.bank_class_ids(task)), f"{task} of {index.root}")
    return index, loaded


def _warn_checkpoint(loaded: InferenceModel, index: ShardIndex, context: DistributedContext) -> None:
    """On the main rank, the checkpoint's own warning and a class list unlike the shards'."""
    from ddeseg.progress import console

    if loaded.warning() and context.is_main:
        console.print(f"[yellow]warning[/]: {loaded.warning()}")
    if loaded.classes and loaded.classes != index.class_names() and context.is_main:
        console.print(f"[yellow]warning[/]: the checkpoint's class list differs from the one of {index.root}")


def _clear_errors_dir(errors_dir: Path, context: DistributedContext) -> None:
    """Remove a previous run's data-error logs on the main rank; every rank waits for it."""
    if context.is_main and errors_dir.exists():
        shutil.rmtree(errors_dir)  # a previous run's skips are not this run's
    barrier()


def _evaluate_split(
    model: torch.nn.Module,
    config: Config,
    index: ShardIndex,
    shards: Sequence[str],
    total: int,
    errors_dir: Path,
    context: DistributedContext,
    *,
    progress: bool,
    pictures: PictureCollector | None = None,
) -> tuple[dict[str, Any], PictureCollector]:
    """`evaluate_model`'s result and pictures on `shards` (`config`'s task and split, `total`
    annotated frames), run deterministically on `context.device` under a frames progress bar;
    the loaders log unreadable data in `errors_dir`, emptied first of a previous run's logs."""
    from ddeseg.data.stream import make_eval_loader
    from ddeseg.progress import stage_progress

    task, split = config.task, config.eval.split
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    model.to(context.device)
    _clear_errors_dir(errors_dir, context)
    loader = make_eval_loader(
        shards,
        config,
        rank=context.rank,
        world_size=context.world_size,
        errors_dir=errors_dir,
        label_lut=index.label_lut(task, config.model.num_classes),
    )
    collector = pictures if pictures is not None else PictureCollector(
        samples=config.eval.pictures, worst=config.eval.worst_frames, seed=config.train.seed
    )
    bar = stage_progress("frames", enabled=context.is_main and progress)
    with bar:
        task_id = bar.add_task(f"evaluate {task}/{split}", total=total)
        result = evaluate_model(
            model,
            loader,
            config,
            context,
            audio_control=config.eval.audio_control,
            pictures=collector,
            class_names=index.task_class_names(task),
            progress=(bar, task_id),
        )
        # The frames scored, not the manifest's count: a bar must not claim a split it did not score.
        bar.update(task_id, completed=result["num_frames"])
    return result, collector


def build_report(
    result: dict[str, Any],
    config: Config,
    checkpoint: Path,
    loaded: InferenceModel,
    *,
    total: int,
    errors_dir: Path,
    world_size: int,
) -> dict[str, Any]:
    """The eval.json dict (without `partial` and pictures) from `evaluate_model`'s `result` on
    `config`'s task and split of `total` annotated frames, the `loaded` checkpoint's provenance,
    and the data errors the loaders logged in `errors_dir`."""
    from ddeseg.data.stream import count_data_errors

    return {
        "miou": result["miou"],
        "fscore": result["fscore"],
        "f1": result["f1"],
        "avsbench_miou": result["avsbench_miou"],
        "avsbench_fscore": result["avsbench_fscore"],
        "avsbench_protocol": result["avsbench_protocol"],
        "per_class": {entry["name"]: {"id": k, **_plain(entry, drop=("name",))} for k, entry in result["per_class"].items()},
        "confusion": result.get("confusion"),  # [GT][predicted] pixels; write_outputs summarises it
        "task": config.task,
        "split": config.eval.split,
        "binary": result["binary"],
        "num_classes": result["num_classes"],
        # Absolute: eval.json must say which files it scored wherever it is read from.
        "checkpoint": str(Path(checkpoint).resolve()),
        "checkpoint_format": loaded.format,
        "checkpoint_step": loaded.step,
        "memory_bank": loaded.memory_bank if loaded.memory_bank == "checkpoint" else str(Path(loaded.memory_bank).resolve()),
        "audio_control": config.eval.audio_control,
        "audio_control_unchanged_frames": result["audio_control_unchanged_frames"],
        "counts": {
            "frames": result["num_frames"],
            "frames_in_manifest": total,
            "pixels": result["num_pixels"],
            "classes_evaluated": result["num_classes_evaluated"],
            "frames_not_scored": max(0, total - int(result["num_frames"])),
            "skipped_samples": count_data_errors(errors_dir),
            "world_size": world_size,
            **{k: result[k] for k in ("num_videos", "num_empty_target_frames", "duplicate_frames") if k in result},
        },
    }


def _write_and_announce(
    report: dict[str, Any], collector: PictureCollector, out_dir: Path, class_names: Sequence[str], config: Config, errors_dir: Path
) -> None:
    """The main rank's part: eval.json / eval.md / eval.html / pictures, config.yaml, the score
    tables, and a one-line warning on stderr when the result is partial."""
    from ddeseg.progress import console

    out_dir.mkdir(parents=True, exist_ok=True)
    write_stage_config(config, out_dir)  # first: the pages link to it
    write_outputs(report, collector, out_dir, class_names)
    print_report(report, console)
    if report["partial"]:
        counts = report["counts"]
        # print, not rich: one line whatever the terminal width, as the CLI's errors
        print(
            f"warning: partial result: {counts['frames_not_scored']} of {counts['frames_in_manifest']} frames of"
            f" {report['task']}/{report['split']} not scored (unreadable"
            f" data in {', '.join(report['skipped_shards']) or 'a shard'}; details in {errors_dir});"
            ' eval.json says "partial": true',
            file=sys.stderr, flush=True,
        )


def partial_result(not_scored: int, errors_dir: Path, shards: Sequence[str], root: Path) -> dict[str, Any]:
    """eval.json's `partial` (frames of the split not scored) and, when partial, `skipped_shards`:
    the shards the loaders logged as unreadable, relative to the shard folder `root`."""
    from ddeseg.data.stream import read_data_errors

    if not_scored <= 0:
        return {"partial": False}
    read = {str(Path(shard)) for shard in shards}
    logged = {str(r["shard"]) for r in read_data_errors(errors_dir) if r.get("shard")}
    return {
        "partial": True,
        "skipped_shards": sorted(str(Path(shard).relative_to(root)) if shard in read else shard for shard in logged),
    }


def _plain(entry: dict[str, Any], drop: Sequence[str] = ()) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k not in drop}


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def write_outputs(report: dict[str, Any], collector: PictureCollector, out_dir: Path, class_names: Sequence[str]) -> None:
    """`eval.json`, `eval.md`, `eval.html` and `pictures/` (replaced whole, so no stale picture
    stays). Adds to `report` what was drawn (`pictures`, `samples`, `video_strips`,
    `worst_frames`) and turns a `confusion` matrix into its per-class summary."""
    from ddeseg.report import confusion_summary, evaluation_report, render_html, write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    pictures_dir = out_dir / PICTURES_DIR
    if pictures_dir.exists():
        shutil.rmtree(pictures_dir)
    control = str(report.get("audio_control", "none"))
    samples = []
    for i, (why, frame) in enumerate(collector.chosen_frames()):
        name = save_png(frame_picture(frame, class_names, control, label=why), pictures_dir / picture_name(i, frame.key)).name
        samples.append({
            "key": frame.key, "why": why, "video": frame.video, "frame": frame.frame,
            "iou": _finite(frame.score), "picture": f"{PICTURES_DIR}/{name}",
        })
    strips = []
    for label, video, score, frames in collector.video_strips():
        picture = video_strip(frames, f"{label} video {video}: video IoU {score:.3f}", class_names, control)
        name = save_png(picture, pictures_dir / f"video-{label}-{re.sub(r'[^A-Za-z0-9_-]', '_', video)}.png").name
        strips.append({"label": label, "video": video, "iou": score, "frames": len(frames), "picture": f"{PICTURES_DIR}/{name}"})
    worst = collector.worst_frames()
    written = [s["picture"] for s in samples] + [s["picture"] for s in strips]
    if worst:
        sheet = contact_sheet(worst, class_names=class_names, audio_control=control)
        written.append(f"{PICTURES_DIR}/{save_png(sheet, pictures_dir / WORST_SHEET).name}")
    report["pictures"] = written
    report["samples"] = samples
    report["frame_iou_median"] = collector.median_score()
    report["video_strips"] = strips
    report["worst_frames"] = [{"key": f.key, "iou": f.score} for f in worst]
    if isinstance(report.get("confusion"), list):
        report["confusion"] = confusion_summary(report["confusion"], class_names)
    write_text(out_dir / EVAL_JSON, json.dumps(report, indent=1, sort_keys=False, allow_nan=False, default=_json_default) + "\n")
    write_text(out_dir / EVAL_MD, markdown_report(report))
    write_text(out_dir / EVAL_HTML, render_html(evaluation_report(report)))


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def markdown_report(report: dict[str, Any]) -> str:
    """The eval.md text: settings, both protocols' scores, per class, confusion summary, pictures
    (the same content as eval.html; `ddeseg.report.evaluation_report`)."""
    from ddeseg.report import evaluation_report, render_markdown

    return render_markdown(evaluation_report(report))


def print_report(report: dict[str, Any], console: Any) -> None:
    """Rich tables of the overall and per-class scores, and where the report folder is."""
    from rich.table import Table

    from ddeseg.report import fmt

    audio = audio_label(report["audio_control"])
    overall = Table(title=f"{report['task']} / {report['split']}  (audio: {audio}, {report['counts']['frames']} frames)")
    for column in ("protocol", "mIoU", "F-score", "F1"):
        overall.add_column(column, justify="left" if column == "protocol" else "right")
    overall.add_row("DDESeg", fmt(report["miou"]), fmt(report["fscore"]), fmt(report["f1"]))
    overall.add_row(report["avsbench_protocol"], fmt(report["avsbench_miou"]), fmt(report["avsbench_fscore"]), "–")
    console.print(overall)
    per_class = Table(title="per class (DDESeg protocol)")
    # No F1 column here (eval.md has it): the table must stay readable in an 80-column terminal.
    for column in ("id", "class", "IoU", "F-score", "GT px", "pred px", "GT frames", "most painted instead"):
        per_class.add_column(column, justify="left" if column in ("class", "most painted instead") else "right")
    confusion = report.get("confusion") if isinstance(report.get("confusion"), dict) else {}
    for name, entry in report["per_class"].items():
        instead = next(iter(confusion.get(name, {}).items()), None)
        per_class.add_row(
            str(entry["id"]), name, fmt(entry["iou"]), fmt(entry["fscore"]),
            str(entry["target_pixels"]), str(entry["predicted_pixels"]), str(entry.get("target_frames", "–")),
            f"{instead[0]} ({instead[1]} px)" if instead else "",
        )
    console.print(per_class)
