"""`ddeseg predict`: segment the sounding objects of a user's own video files, frame by frame.

Decoding (PyAV, streaming: memory does not grow with the length of the video)
------------------------------------------------------------------------------
- Timeline: time 0 is the presentation time of the video's first frame.
- Frames: the video stream is decoded in order, one frame at a time. Sampled frame k is the frame
  on screen at `t_k = k / F` (F = `frames_per_second`): the last decoded frame whose timestamp is
  <= t_k. Frames are sampled while t_k is before the end of the last frame (its timestamp plus
  its duration), so a 10 s video at F = 1 gives the frames shown at 0, 1, ..., 9 s.
- Audio, which second: frame k hears `[t_k, t_k + clip_seconds)` of the audio track, i.e. the
  frame is at the *start* of its second. This is the AVSBench convention (frame k is annotated
  with second k of the audio) and the window `ddeseg prepare` reads for a frame
  (`AudioSpec(window="second", start_s=k)`). The audio is read through a second, independent
  demuxer of the same file and decoded incrementally into a rolling buffer (one window plus one
  decoded audio frame), so neither the file's interleaving nor its length changes the memory.
  Each window is mixed to mono, resampled to `model.frontend.sample_rate` (soxr HQ) and
  repeat-padded when the track ends inside it: the functions `ddeseg prepare` uses
  (`mix_to_mono`, `resample`, `fit_length` of `ddeseg.pipelines.sources.common`). A window wholly
  after the end of the track, or a video without audio (only with `allow_no_audio`), is silence:
  a zero waveform, i.e. the log-mel of a zero waveform (-100 dB everywhere). Every frame records
  where its audio came from (`audio` in `predictions.json`).
- Model inputs: the log-mel is computed by prepare's `LogMelBatcher` around the model's own
  front end (`DDESeg.frontend()`, so a filterbank loaded from a checkpoint is the one used),
  float16 as `prepare` stores it in the shards, and the frame and log-mel go through
  `preprocess_for_model`, the evaluation loader's function: the model gets bit for bit what evaluation gives it for the same frame and
  audio (`model_inputs`; tests/test_predict.py checks it against the evaluation loader).

Prediction
----------
The model's logits (at `data.image_size`) are resized to the frame size bilinearly
(`align_corners=False`, as mmseg resizes to the original shape) and turned into labels as
`ddeseg.metrics.predicted_labels` does: the argmax over classes (equal to the argmax of the
softmax up to exact ties), or `logit > 0` (sigmoid > 0.5) for a binary model (foreground = 1).
The resize runs a few classes at a time (`labels_at_size`) so that a 71-class model on a 4K frame
needs a few hundred MB, not gigabytes.

Outputs of `predict_to_directory` (`ddeseg predict`), per video under `OUT/{video stem}/`
------------------------------------------------------------------------------------------------
- `masks/{k:06d}.png`: 8-bit 'L' PNG of class ids (0 = background) at the video's frame size;
- `overlays/{k:06d}.png`: the frame with the classes blended in the project palette
  (`ddeseg.visualize.overlay`) and, on the right, a legend panel: time, audio source, and per
  class present its colour, name and pixel share;
- `overlay.mp4`: the overlay pictures at F frames/s (H.264, or MPEG-4 Part 2 when the PyAV build
  has no libx264; padded to even sizes) with the source's whole audio track re-encoded to AAC;
  no audio stream when the source has none;
- `predictions.json`: see `PREDICTIONS_VERSION` and `FramePrediction.to_json`: per frame its
  index, `time_s` (= k / F), `frame_time_s` (timestamp of the frame shown), audio source, and the
  classes present with `pixel_fraction` and `box` (normalised `[x0, y0, x1, y1]`, inclusive pixel
  indices / size, the convention of `ddeseg.pipelines.bboxes`).
A video's folder is written under a temporary name and renamed at the end: a failed video leaves
nothing behind, and a re-run replaces the previous result whole. Two inputs with the same stem in
one run get `{stem}`, `{stem}-2`, ...
"""

from __future__ import annotations

import json
import math
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import av.logging
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ddeseg.config import Config
from ddeseg.data.augment import preprocess_for_model
from ddeseg.errors import DDESegError
from ddeseg.fileio import building_directory
from ddeseg.visualize import overlay_with_legend, voc_palette

PREDICTIONS_VERSION = 1
PREDICTIONS_FILE, MASKS_DIR, OVERLAYS_DIR, OVERLAY_VIDEO = "predictions.json", "masks", "overlays", "overlay.mp4"
TIME_TOLERANCE_S = 5e-4  # timestamps closer than this are the same instant (rounded time bases)
IMAGE_FORMATS = {"image2", "png_pipe", "jpeg_pipe", "bmp_pipe", "webp_pipe", "tiff_pipe", "gif"}
AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)
RESIZE_BUDGET = 1 << 25  # logits values (float32) resized at once: 128 MB
AUDIO_TRACK, AUDIO_PADDED = "track", "track (repeat-padded: the track ends within this window)"
SILENCE_NO_TRACK = "silence (the video has no audio track)"
SILENCE_AFTER_END = "silence (after the end of the audio track)"
SILENCE_BEFORE_START = "silence (before the audio track starts)"


class VideoError(DDESegError):
    """A video file that cannot be used (the message starts with its path)."""


# --------------------------------------------------------------------------------------------
# Probing and decoding
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoInfo:
    """What `probe_video` learns from a file's header."""

    path: Path
    width: int
    height: int
    duration_s: float | None  # None when the container does not say
    frame_rate: float | None  # average frames/s of the video stream, when known
    has_audio: bool
    audio_sample_rate: int | None
    audio_channels: int | None

    def expected_frames(self, frames_per_second: float) -> int | None:
        """Sampled frames for a video of this duration (None when the duration is unknown)."""
        if not self.duration_s:
            return None
        return max(1, math.ceil(self.duration_s * frames_per_second - TIME_TOLERANCE_S))


def _ffmpeg_reason(error: Exception) -> str:
    text = getattr(error, "strerror", None) or str(error)
    return " ".join(str(text).split())


def _open(path: Path) -> av.container.InputContainer:
    if not path.exists():
        raise VideoError(f"{path}: file not found")
    if not path.is_file():
        raise VideoError(f"{path}: not a file")
    try:
        return av.open(str(path), mode="r")
    except av.error.FFmpegError as error:
        raise VideoError(f"{path}: not a readable video ({_ffmpeg_reason(error)})") from None
    except OSError as error:
        raise VideoError(f"{path}: cannot be read ({error.strerror or error})") from None


def probe_video(path: str | Path, allow_no_audio: bool = False) -> VideoInfo:
    """Open `path` and check that it is a video we can predict on.

    Raises `VideoError` ("PATH: reason") for a missing file, a file FFmpeg cannot read (not a
    video, corrupt), a still image, no video stream, a zero duration, or no audio stream (unless
    `allow_no_audio`).
    """
    path = Path(path)
    with _open(path) as container:
        if container.format.name in IMAGE_FORMATS:
            raise VideoError(f"{path}: a still image ({container.format.name}), not a video")
        if not container.streams.video:
            kinds = sorted({stream.type for stream in container.streams}) or ["none"]
            raise VideoError(f"{path}: no video stream (streams: {', '.join(kinds)})")
        video = container.streams.video[0]
        width, height = video.codec_context.width, video.codec_context.height
        if width <= 0 or height <= 0:
            raise VideoError(f"{path}: the video stream has no frame size ({width}x{height})")
        duration_s = None
        if video.duration is not None and video.time_base is not None:
            duration_s = float(video.duration * video.time_base)
        elif container.duration is not None:
            duration_s = container.duration / av.time_base
        if duration_s is not None and duration_s <= 0:
            raise VideoError(f"{path}: zero duration")
        rate = video.average_rate or video.guessed_rate
        audio = container.streams.audio[0] if container.streams.audio else None
        if audio is None and not allow_no_audio:
            raise VideoError(
                f"{path}: no audio track; DDESeg segments what is heard (pass --allow-no-audio to predict with silence)"
            )
        return VideoInfo(
            path=path,
            width=width,
            height=height,
            duration_s=duration_s,
            frame_rate=float(rate) if rate else None,
            has_audio=audio is not None,
            audio_sample_rate=audio.codec_context.sample_rate if audio is not None else None,
            audio_channels=audio.codec_context.channels if audio is not None else None,
        )


def _frame_time(frame: av.VideoFrame | av.AudioFrame, fallback: float) -> float:
    return float(frame.time) if frame.time is not None else fallback


def _video_frames(path: Path, container: av.container.InputContainer) -> Iterator[tuple[float, av.VideoFrame]]:
    """(presentation time in s, frame) of every frame of the first video stream, in order."""
    stream = container.streams.video[0]
    # No `stream.thread_type = "AUTO"`: with frame threading, closing the container mid-stream
    # (an early stop, an error) sometimes hangs when torchvision is loaded in the process.
    rate = float(stream.average_rate or stream.guessed_rate or 25)
    index, time_s = 0, 0.0
    try:
        for frame in container.decode(stream):
            time_s = _frame_time(frame, index / rate)
            yield time_s, frame
            index += 1
    except av.error.FFmpegError as error:
        raise VideoError(f"{path}: corrupt video data after {time_s:.2f} s ({_ffmpeg_reason(error)})") from None


def _frame_duration(frame: av.VideoFrame, stream: av.VideoStream) -> float:
    if frame.duration and frame.time_base:
        return float(frame.duration * frame.time_base)
    rate = stream.average_rate or stream.guessed_rate
    return 1.0 / float(rate) if rate else 0.0


def sampled_video_frames(path: str | Path, frames_per_second: float) -> Iterator[tuple[int, float, float, av.VideoFrame]]:
    """`(k, t_k, frame time, frame)` for the frame on screen at every `t_k = k / F` (see the module
    docstring); times are on the video's timeline (0 = first frame). Holds one decoded frame."""
    if not frames_per_second > 0:
        raise DDESegError(f"frames per second must be > 0, got {frames_per_second}")
    path = Path(path)
    with _open(path) as container:
        if not container.streams.video:
            raise VideoError(f"{path}: no video stream")
        stream = container.streams.video[0]
        origin: float | None = None
        previous: tuple[float, av.VideoFrame] | None = None
        k = 0
        for time_s, frame in _video_frames(path, container):
            if origin is None:
                origin = time_s
            time_s -= origin
            if previous is not None:
                while k / frames_per_second < time_s - TIME_TOLERANCE_S:  # `previous` is on screen at t_k
                    yield k, k / frames_per_second, previous[0], previous[1]
                    k += 1
            previous = (time_s, frame)
        if previous is None:
            raise VideoError(f"{path}: no video frames (zero duration)")
        end_s = previous[0] + _frame_duration(previous[1], stream)
        while k == 0 or k / frames_per_second < end_s - TIME_TOLERANCE_S:
            yield k, k / frames_per_second, previous[0], previous[1]
            k += 1


class AudioWindows:
    """Windows of a file's first audio track on the video's timeline, decoded incrementally.

    `window(t)` returns the mono waveform the model hears for a frame at `t` seconds (see the
    module docstring), float32 `[round(clip_seconds * sample_rate)]`, and where it came from.
    Calls must come with non-decreasing `t`: samples before the last window are dropped.
    """

    def __init__(self, path: str | Path, origin_s: float, sample_rate: int, clip_seconds: float):
        self.path = Path(path)
        self.sample_rate, self.clip_seconds = sample_rate, clip_seconds
        self.clip_samples = int(round(clip_seconds * sample_rate))
        self.origin_s = origin_s
        self._container = _open(self.path)
        if not self._container.streams.audio:
            self._container.close()
            raise VideoError(f"{self.path}: no audio stream")
        stream = self._container.streams.audio[0]
        self.rate = stream.codec_context.sample_rate
        if not self.rate or self.rate <= 0:
            self._container.close()
            raise VideoError(f"{self.path}: the audio stream has no sample rate")
        self._frames = self._decoded(stream)
        self._chunks: deque[np.ndarray] = deque()  # float32 [samples, channels], contiguous in time
        self._start = 0  # track sample index of the first buffered sample
        self._end = 0  # track sample index after the last buffered sample
        self._offset: int | None = None  # track sample 0 on the video timeline, in samples
        self._exhausted = False

    def _decoded(self, stream: av.AudioStream) -> Iterator[tuple[float, np.ndarray]]:
        # Packed float32 at the track's own rate and layout: only the sample format changes
        # (int16 -> x / 32768 as soundfile reads a wav), so the prepare code does the resampling.
        converter = av.AudioResampler(format="flt")
        time_s = 0.0
        try:
            for frame in self._container.decode(stream):
                time_s = _frame_time(frame, time_s)
                for converted in converter.resample(frame):
                    yield time_s, _packed_samples(converted)
            for converted in converter.resample(None):
                yield time_s, _packed_samples(converted)
        except av.error.FFmpegError as error:
            raise VideoError(f"{self.path}: corrupt audio data after {time_s:.2f} s ({_ffmpeg_reason(error)})") from None

    def _pull(self) -> bool:
        item = next(self._frames, None)
        if item is None:
            self._exhausted = True
            return False
        time_s, samples = item
        if self._offset is None:
            self._offset = int(round((time_s - self.origin_s) * self.rate))
        if samples.shape[0]:
            self._chunks.append(samples)
            self._end += samples.shape[0]
        return True

    def window(self, time_s: float) -> tuple[np.ndarray, str]:
        from ddeseg.pipelines.sources.common import fit_length, mix_to_mono, resample

        if self._offset is None and not self._pull():
            return np.zeros(self.clip_samples, dtype=np.float32), SILENCE_AFTER_END
        length = int(round(self.clip_seconds * self.rate))
        first = int(round(time_s * self.rate)) - (self._offset or 0)
        last = first + length
        while self._end < last and self._pull():
            self._drop_before(max(first, 0))  # also while pulling: F < 1 skips audio between windows
        self._drop_before(max(first, 0))
        available = self._take(max(first, 0), min(last, self._end))
        if available.shape[0] == 0:
            source = SILENCE_BEFORE_START if last <= 0 else SILENCE_AFTER_END
            return np.zeros(self.clip_samples, dtype=np.float32), source
        if first < 0:  # the track starts after t: silence before it
            lead = np.zeros((-first, available.shape[1]), dtype=np.float32)
            available = np.concatenate([lead, available])
        wave = resample(mix_to_mono(available), self.rate, self.sample_rate)
        source = AUDIO_TRACK if available.shape[0] >= length else AUDIO_PADDED
        return fit_length(wave, self.clip_samples), source

    def _drop_before(self, sample: int) -> None:
        while self._chunks and self._start + self._chunks[0].shape[0] <= sample:
            self._start += self._chunks.popleft().shape[0]

    def _take(self, begin: int, end: int) -> np.ndarray:
        channels = self._chunks[0].shape[1] if self._chunks else 1
        if end <= begin or not self._chunks:
            return np.zeros((0, channels), dtype=np.float32)
        joined = np.concatenate(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        # Keep one chunk from `begin` on (windows never go back): a window plus one decoded frame.
        joined = joined[begin - self._start :]
        self._chunks, self._start = deque([joined]), begin
        return joined[: end - begin]

    def close(self) -> None:
        self._frames.close()
        self._container.close()

    def __enter__(self) -> AudioWindows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _packed_samples(frame: av.AudioFrame) -> np.ndarray:
    """A packed float32 frame -> float32 `[samples, channels]`."""
    channels = frame.layout.nb_channels
    return frame.to_ndarray().reshape(-1, channels).astype(np.float32, copy=False)


@dataclass
class SampledFrame:
    """One sampled frame and the audio the model hears with it."""

    index: int  # k
    time_s: float  # t_k = k / F on the video's timeline
    frame_time_s: float  # timestamp of the decoded frame shown at t_k
    image: np.ndarray  # uint8 RGB [H, W, 3], the video's frame size
    audio: np.ndarray  # float32 [clip samples], mono, at model.frontend.sample_rate
    audio_source: str  # AUDIO_TRACK, AUDIO_PADDED, SILENCE_NO_TRACK or SILENCE_AFTER_END


def sample_frames(
    path: str | Path, config: Config, frames_per_second: float = 1.0, allow_no_audio: bool = False
) -> Iterator[SampledFrame]:
    """Stream a video file into `SampledFrame`s (see the module docstring for the timing).

    Raises `VideoError` for an unusable file (also when it turns out corrupt mid-way).
    """
    path = Path(path)
    info = probe_video(path, allow_no_audio)
    frontend = config.model.frontend
    clip_samples = int(round(config.data.clip_seconds * frontend.sample_rate))
    audio: AudioWindows | None = None
    try:
        for k, time_s, frame_time_s, frame in sampled_video_frames(path, frames_per_second):
            if audio is None and info.has_audio:
                # Opened once the video's first timestamp is known: it is the timeline's origin.
                origin = _first_video_time(path)
                audio = AudioWindows(path, origin, frontend.sample_rate, config.data.clip_seconds)
            if audio is not None:
                wave, source = audio.window(time_s)
            else:
                wave, source = np.zeros(clip_samples, dtype=np.float32), SILENCE_NO_TRACK
            image = frame.to_ndarray(format="rgb24")
            yield SampledFrame(k, time_s, frame_time_s, image, wave, source)
    finally:
        if audio is not None:
            audio.close()


def _first_video_time(path: Path) -> float:
    with _open(path) as container:
        for time_s, _ in _video_frames(path, container):
            return time_s
    return 0.0


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
    from ddeseg.pipelines.bboxes import sounding_boxes

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
    if batch_size < 1:
        raise DDESegError(f"batch size must be >= 1, got {batch_size}")
    from ddeseg.pipelines.logmel import LogMelBatcher

    model.eval()
    device = next(model.parameters()).device
    # The model's own front end (e.g. a filterbank loaded from a checkpoint), run as prepare runs it.
    logmel = LogMelBatcher(model.frontend(), device=str(device), batch_size=batch_size)
    pending: list[SampledFrame] = []
    for frame in sample_frames(path, config, frames_per_second, allow_no_audio):
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


# --------------------------------------------------------------------------------------------
# Pictures and the overlay video
# --------------------------------------------------------------------------------------------


def video_codec() -> str:
    """libx264 when this PyAV build has it, else FFmpeg's own MPEG-4 Part 2 encoder."""
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


class OverlayVideoWriter:
    """Writes `overlay.mp4`: pictures at `frames_per_second`, with the source's audio track.

    An AAC track is copied packet for packet (the original audio, no re-encoding); any other
    codec is decoded and encoded to AAC. The audio is read from `audio_source` by its own
    streaming reader as the video advances, so the file is interleaved and memory stays flat.
    `write` every picture (one size), then `close`.
    """

    def __init__(self, path: str | Path, frames_per_second: float, audio_source: Path | None, origin_s: float = 0.0):
        self.path = Path(path)
        self.rate = Fraction(frames_per_second).limit_denominator(1001)
        self.container = av.open(str(self.path), mode="w")
        self.video: av.VideoStream | None = None
        self.frames_written = 0
        self.audio_in: av.container.InputContainer | None = None
        self.audio_copied = False
        self._audio_packets: Iterator[tuple[float, av.Packet]] | None = None
        if audio_source is not None:
            # Every stream must exist before the first packet is written: the audio one now.
            self.audio_in = _open(audio_source)
            stream = self.audio_in.streams.audio[0]
            self.audio_copied = stream.codec_context.name == "aac"
            if self.audio_copied:
                self._audio_packets = self._copied(stream, origin_s)
            else:
                self._audio_packets = self._encoded(stream, origin_s)

    def _copied(self, stream: av.AudioStream, origin_s: float) -> Iterator[tuple[float, av.Packet]]:
        output = self.container.add_stream_from_template(stream)
        shift = int(round(origin_s / stream.time_base)) if stream.time_base else 0
        for packet in self.audio_in.demux(stream):
            if packet.dts is None:  # the demuxer's empty packet at the end
                continue
            packet.dts -= shift
            if packet.pts is not None:
                packet.pts -= shift
            packet.stream = output
            yield float((packet.pts if packet.pts is not None else packet.dts) * stream.time_base), packet

    def _encoded(self, stream: av.AudioStream, origin_s: float) -> Iterator[tuple[float, av.Packet]]:
        rate = stream.codec_context.sample_rate
        out_rate = rate if rate in AAC_RATES else 48000
        layout = "mono" if stream.codec_context.channels == 1 else "stereo"
        output = self.container.add_stream("aac", rate=out_rate, layout=layout)
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=out_rate)
        next_pts: int | None = None  # in samples at out_rate, on the video's timeline

        def encode(frame: av.AudioFrame | None) -> Iterator[tuple[float, av.Packet]]:
            nonlocal next_pts
            for converted in resampler.resample(frame):
                converted.pts, converted.time_base = next_pts, Fraction(1, out_rate)
                next_pts += converted.samples
                for packet in output.encode(converted):
                    yield next_pts / out_rate, packet
            if frame is None:
                for packet in output.encode(None):
                    yield next_pts / out_rate, packet

        yield from ()  # a generator even when nothing is decoded
        for frame in self.audio_in.decode(stream):
            if next_pts is None:
                next_pts = int(round((_frame_time(frame, 0.0) - origin_s) * out_rate))
            yield from encode(frame)
        if next_pts is not None:
            yield from encode(None)

    def write(self, picture: np.ndarray) -> None:
        """Append a uint8 RGB picture `[h, w, 3]` (padded to even sizes for the encoder)."""
        height, width = picture.shape[:2]
        even = np.pad(picture, ((0, height % 2), (0, width % 2), (0, 0)))
        if self.video is not None and (even.shape[1], even.shape[0]) != (self.video.width, self.video.height):
            # The stream changed its frame size mid-way: the encoder keeps the first size.
            even = np.asarray(Image.fromarray(even).resize((self.video.width, self.video.height), Image.BILINEAR))
        if self.video is None:
            codec = video_codec()
            self.video = self.container.add_stream(codec, rate=self.rate)
            self.video.width, self.video.height = even.shape[1], even.shape[0]
            self.video.pix_fmt = "yuv420p"
            if codec == "libx264":
                self.video.options = {"crf": "20", "preset": "veryfast"}
            else:
                self.video.bit_rate = 4_000_000
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(even), format="rgb24")
        frame.pts = self.frames_written
        frame.time_base = 1 / self.rate
        self.container.mux(self.video.encode(frame))
        self.frames_written += 1
        self._pump_audio(float(self.frames_written / self.rate))

    def _pump_audio(self, until_s: float | None) -> None:
        """Write source audio up to `until_s` seconds of the output (None: to the end)."""
        if self._audio_packets is None:
            return
        try:
            for time_s, packet in self._audio_packets:
                self.container.mux(packet)
                if until_s is not None and time_s >= until_s:
                    return
        except av.error.FFmpegError:
            pass  # a corrupt track: the prediction reports it; keep what was written
        self._audio_packets = None

    def close(self, finish: bool = True) -> None:
        """Flush the encoders and write the rest of the audio (`finish`), then close the files.
        `finish=False` (after an error) only closes them."""
        try:
            if finish:
                if self.video is not None:
                    self.container.mux(self.video.encode(None))
                self._pump_audio(None)
        finally:
            self.container.close()
            if self.audio_in is not None:
                self.audio_in.close()


# --------------------------------------------------------------------------------------------
# Loading a checkpoint, class names
# --------------------------------------------------------------------------------------------


def resolve_class_names(config: Config, stored: Sequence[str], classes_file: Path | None = None) -> list[str]:
    """Names of the model's classes by class id (2 names for a binary model).

    From `classes_file` when given (a `classes.json` of `ddeseg prepare`, read for `config.task`
    as evaluation reads it, or a plain JSON list of names), else from the checkpoint's stored
    unified list, else the task's known list (binary; AVSS for v2 with 71 classes; VPO with 22).
    """
    from ddeseg.engine.evaluate import task_class_names
    from ddeseg.pipelines.records import AVSS_CLASSES, VPO_CLASSES

    num_classes = config.model.num_classes
    binary = num_classes == 1
    wanted = 2 if binary else num_classes
    task = config.task
    names: list[str] | None = None
    where = "the checkpoint"
    if classes_file is not None:
        where = str(classes_file)
        try:
            data = json.loads(Path(classes_file).read_text())
        except (OSError, ValueError) as error:
            raise DDESegError(f"{classes_file}: cannot be read as JSON ({error})") from None
        if isinstance(data, dict) and isinstance(data.get("names"), list):
            if task in data.get("tasks", {}):
                names = task_class_names(data, task)
            else:
                stored = data["names"]
        elif isinstance(data, list) and all(isinstance(name, str) for name in data):
            names = list(data)
        else:
            raise DDESegError(f"{classes_file}: expected classes.json from `ddeseg prepare` or a JSON list of names")
    if names is None and stored:
        if binary:
            names = [stored[0], "foreground"]
        elif task.startswith("VPO-"):
            names = list(VPO_CLASSES)  # task ids name the VPO classes, whatever their unified ids
        else:
            names = list(stored)
    if names is None:
        if binary:
            names = ["background", "foreground"]
        elif task == "v2" and num_classes == len(AVSS_CLASSES):
            names = list(AVSS_CLASSES)
        elif task.startswith("VPO-") and num_classes == len(VPO_CLASSES):
            names = list(VPO_CLASSES)
        else:
            raise DDESegError(
                f"the checkpoint has no class list and task {task!r} with {num_classes} classes has no known one:"
                " pass --classes classes.json (from `ddeseg prepare`)"
            )
    if len(names) < wanted:
        raise DDESegError(f"{where} names {len(names)} classes but the model predicts {wanted}")
    return names[:wanted]


@dataclass
class PredictRequest:
    """Inputs of `run_predict` (what `ddeseg predict` parses)."""

    checkpoint: Path
    videos: list[Path]
    out_dir: Path
    frames_per_second: float = 1.0
    device: str | None = None
    batch_size: int = 8
    classes_file: Path | None = None
    config_path: Path | None = None  # required for official checkpoints; replaces a stored config
    memory_bank: Path | None = None  # required for official checkpoints (they hold no bank)
    allow_no_audio: bool = False
    show_progress: bool = True


def load_predictor(request: PredictRequest) -> tuple[torch.nn.Module, Config, list[str], dict[str, Any]]:
    """Model (on the requested device, eval mode), config, class names and checkpoint description.

    Loads ours and official full checkpoints through `ddeseg.engine.evaluate.load_for_evaluation`."""
    from ddeseg.distributed import resolve_device
    from ddeseg.engine.evaluate import EvaluateRequest, load_for_evaluation

    model, config, info = load_for_evaluation(
        EvaluateRequest(
            checkpoint=request.checkpoint,
            shards_dir=Path(),  # not read when loading
            out_dir=Path(),
            config_path=request.config_path,
            memory_bank=request.memory_bank,
        )
    )
    class_names = resolve_class_names(config, info["classes"], request.classes_file)
    model.to(resolve_device(request.device)).eval()
    return model, config, class_names, info


# --------------------------------------------------------------------------------------------
# One video to a folder, and the `ddeseg predict` stage
# --------------------------------------------------------------------------------------------


@dataclass
class VideoResult:
    """What happened to one input video (a row of the final table)."""

    path: Path
    out_dir: Path | None = None
    error: str | None = None
    frames: int = 0
    audio: str = ""
    classes: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> frames, mean fraction


def predict_to_directory(
    path: str | Path,
    model: torch.nn.Module,
    config: Config,
    class_names: Sequence[str],
    out_dir: str | Path,
    *,
    frames_per_second: float = 1.0,
    batch_size: int = 8,
    allow_no_audio: bool = False,
    checkpoint: str | None = None,
    progress: Any = None,
) -> VideoResult:
    """Predict one video and write `out_dir/` (masks, overlays, overlay.mp4, predictions.json).

    `out_dir` is written as `.{name}.partial` beside it and renamed at the end (replacing an old
    one). `progress`: a rich `Progress` to add this video's bar to. Raises `VideoError`."""
    path, out_dir = Path(path), Path(out_dir)
    info = probe_video(path, allow_no_audio)
    origin_s = _first_video_time(path)
    palette = voc_palette()
    audio_note = None if info.has_audio else "no audio: silence"
    task = None
    if progress is not None:
        task = progress.add_task(path.name[:18], total=info.expected_frames(frames_per_second))
    frames: list[dict[str, Any]] = []
    seen: dict[str, list[float]] = {}
    try:
        with building_directory(out_dir) as temporary:
            (temporary / MASKS_DIR).mkdir()
            (temporary / OVERLAYS_DIR).mkdir()
            writer = OverlayVideoWriter(
                temporary / OVERLAY_VIDEO, frames_per_second, path if info.has_audio else None, origin_s
            )
            finished = False
            try:
                for prediction in predict_video(
                    path, model, config, class_names,
                    frames_per_second=frames_per_second, batch_size=batch_size, allow_no_audio=allow_no_audio,
                ):
                    name = frame_name(prediction.index)
                    Image.fromarray(prediction.mask, mode="L").save(temporary / MASKS_DIR / name, optimize=False)
                    picture = overlay_with_legend(prediction, palette, audio_note)
                    # Fast compression: the overlays are pictures to look at, written once per frame.
                    Image.fromarray(picture, mode="RGB").save(temporary / OVERLAYS_DIR / name, compress_level=1)
                    writer.write(picture)
                    frames.append(prediction.to_json())
                    for entry in prediction.classes:
                        seen.setdefault(entry["name"], []).append(entry["pixel_fraction"])
                    if progress is not None:
                        progress.advance(task)
                finished = True
            finally:
                writer.close(finish=finished)
            audio_sources = sorted({frame["audio"] for frame in frames})
            summary = {
                name: {"frames": len(fractions), "mean_pixel_fraction": round(float(np.mean(fractions)), 6)}
                for name, fractions in sorted(seen.items(), key=lambda item: (-len(item[1]), item[0]))
            }
            document = {
                "version": PREDICTIONS_VERSION,
                "video": str(path),
                "checkpoint": checkpoint,
                "width": info.width,
                "height": info.height,
                "duration_s": info.duration_s,
                "frames_per_second": frames_per_second,
                "audio": {
                    "track": info.has_audio,
                    "silence": not info.has_audio,
                    "note": None if info.has_audio else "the video has no audio track: predicted with silence (--allow-no-audio)",
                    "sources": audio_sources,
                    "overlay_mp4": ("copied" if writer.audio_copied else "re-encoded to AAC") if info.has_audio else None,
                    "window": f"frame k at time_s = k / {frames_per_second:g} hears [time_s, time_s + {config.data.clip_seconds:g})"
                    " of the track, mono, resampled to the model's rate",
                },
                "class_names": list(class_names),
                "box_format": "[x0, y0, x1, y1] normalised: inclusive pixel indices / width or height",
                "summary": summary,
                "frames": frames,
            }
            (temporary / PREDICTIONS_FILE).write_text(json.dumps(document, indent=1) + "\n")
    finally:
        if progress is not None and task is not None:
            progress.update(task, total=len(frames), completed=len(frames))
    return VideoResult(
        path=path,
        out_dir=out_dir,
        frames=len(frames),
        audio="track" if info.has_audio else "silence (no track)",
        classes={name: entry for name, entry in summary.items()},
    )


def output_names(videos: Sequence[Path]) -> list[str]:
    """Folder name per input: its stem, `{stem}-2`, `{stem}-3`, ... for repeated stems."""
    used: dict[str, int] = {}
    names = []
    for video in videos:
        stem = video.stem or "video"
        used[stem] = used.get(stem, 0) + 1
        names.append(stem if used[stem] == 1 else f"{stem}-{used[stem]}")
    return names


def run_predict(request: PredictRequest) -> list[VideoResult]:
    """`ddeseg predict`: every video of the request into `out_dir/{stem}/`.

    A bad video is reported on stderr on one line (`error: PATH: reason`) and skipped; the others
    are still done. Returns one `VideoResult` per input (with `error` set for the failed ones).
    Checkpoint problems raise `DDESegError` before any video is touched."""
    if not request.frames_per_second > 0:
        raise DDESegError(f"--frames-per-second must be > 0, got {request.frames_per_second}")
    if request.batch_size < 1:
        raise DDESegError(f"--batch-size must be >= 1, got {request.batch_size}")
    model, config, class_names, info = load_predictor(request)
    # FFmpeg's own messages off (torchvision turns them on when imported): a bad video is
    # reported on our one line, not with decoder chatter around it.
    ffmpeg_log_level = av.logging.get_level()
    av.logging.set_level(None)
    try:
        return _predict_all(request, model, config, class_names, info)
    finally:
        av.logging.set_level(ffmpeg_log_level)


def _predict_all(
    request: PredictRequest, model: torch.nn.Module, config: Config, class_names: list[str], info: dict[str, Any]
) -> list[VideoResult]:
    from ddeseg.progress import console, stage_progress

    if info["load_incomplete"]:
        console.print(f"[yellow]warning[/]: the checkpoint does not fill the model: {info['load_report']}")
    out_root = Path(request.out_dir)
    out_root.mkdir(parents=True, exist_ok=True)
    results = []
    for video, name in zip(request.videos, output_names(request.videos), strict=True):
        video = Path(video)
        bar = stage_progress("frames", enabled=request.show_progress)
        try:
            with bar:
                result = predict_to_directory(
                    video, model, config, class_names, out_root / name,
                    frames_per_second=request.frames_per_second, batch_size=request.batch_size,
                    allow_no_audio=request.allow_no_audio, checkpoint=str(request.checkpoint), progress=bar,
                )
        except VideoError as error:
            result = VideoResult(path=video, error=str(error))
        except (av.error.FFmpegError, OSError) as error:
            result = VideoResult(path=video, error=f"{video}: {_ffmpeg_reason(error)}")
        if result.error is not None:
            # One line, whatever the terminal width (rich would wrap it).
            print(f"error: {' '.join(result.error.split())}", file=sys.stderr, flush=True)
        results.append(result)
    print_summary(results, class_names, console)
    return results


def print_summary(results: Sequence[VideoResult], class_names: Sequence[str], console: Any) -> None:
    """A rich table: per video, its frames, its audio, and the classes heard and seen."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title="heard and seen (sounding objects the model segmented)")
    for column in ("video", "frames", "audio", "classes (frames, mean area)", "output"):
        table.add_column(column, justify="right" if column == "frames" else "left")
    for result in results:
        if result.error is not None:
            reason = result.error.removeprefix(f"{result.path}: ")
            table.add_row(Text(result.path.name), "–", "–", Text("failed", style="red"), Text(reason))
            continue
        heard = ", ".join(
            f"{name} ({entry['frames']}, {100 * entry['mean_pixel_fraction']:.1f}%)" for name, entry in result.classes.items()
        ) or "nothing"
        output = f"{result.out_dir.name}/" if result.out_dir is not None else "–"
        table.add_row(Text(result.path.name), str(result.frames), result.audio, Text(heard), Text(output))
    console.print(table)
