"""Which evaluated frames get pictures: `PictureCollector` keeps, while the split is scored,
the frames chosen across videos (best, median and worst by frame IoU and a seeded few at random)
and the videos for the best / median / worst strips; the drawing is `ddeseg.visualize`'s.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from ddeseg.visualize import (
    FramePicture,
    denormalize_images,
)

if TYPE_CHECKING:
    pass

STRIP_VIDEOS = 12  # videos kept for the best / median / worst video strips


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
