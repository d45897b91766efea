"""The `ddeseg predict` stage: every video of a request into its own folder.

Outputs of `predict_to_directory` (`ddeseg predict`), per video under `OUT/{video stem}/`
------------------------------------------------------------------------------------------------
- `masks/{k:06d}.png`: 8-bit 'L' PNG of class ids (0 = background) at the video's frame size;
- `overlays/{k:06d}.png`: the frame with the classes blended in the project palette
  (`ddeseg.visualize.overlay`) and, on the right, a legend panel: time, audio source, and per
  class present its colour, name and pixel share;
- `overlay.mp4`: by default (`predict.overlay_video: source`) every frame of the video at its own
  frame rate, each with the mask and legend of the last prediction at or before it (the frames
  before the first prediction take the first one), so it plays as the source does; with
  `sampled`, the overlay pictures at F frames/s (F capped at the video's frame rate: above it
  every extra sample would repeat a frame; a warning says so). H.264, or MPEG-4 Part 2 when the
  PyAV build has no libx264; padded to even sizes; with the source's audio track (AAC copied,
  others re-encoded to AAC); no audio stream when the source has none;
- `predictions.json`: see `PREDICTIONS_VERSION` and `FramePrediction.to_json`: per frame its
  index, `time_s` (= k / F), `frame_time_s` (timestamp of the frame shown), audio source, and the
  classes present with `pixel_fraction` and `box` (normalised `[x0, y0, x1, y1]`, inclusive pixel
  indices / size, the convention of `ddeseg.pipelines.bboxes`).
A video's folder is written under a temporary name and renamed at the end: a failed video leaves
nothing behind (nor does a run whose every video fails: no empty `OUT`), and a re-run replaces the
previous result whole. Two inputs with the same stem in one run get `{stem}`, `{stem}-2`, ...
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import av.logging
import numpy as np
import torch
from PIL import Image

from ddeseg.classes import display_palette
from ddeseg.config import Config, check_overrides
from ddeseg.fileio import building_directory, reporting_disk_full
from ddeseg.inference import InferenceModel, load_for_inference, require_output_folder, resolve_class_names
from ddeseg.segment import MASKS_DIR, OVERLAYS_DIR, FramePrediction, frame_name, predict_video
from ddeseg.stage import ConfigSource, RunOptions, write_stage_config
from ddeseg.video import (
    OverlayVideoWriter,
    SourceFrames,
    VideoError,
    VideoInfo,
    ffmpeg_reason,
    first_video_time,
    probe_video,
)
from ddeseg.visualize import LegendOverlay

PREDICTIONS_VERSION = 1
PREDICTIONS_FILE, OVERLAY_VIDEO = "predictions.json", "overlay.mp4"


# --------------------------------------------------------------------------------------------
# The request and its model
# --------------------------------------------------------------------------------------------


@dataclass
class PredictPaths:
    """What `run_predict` reads and writes (its settings are `config.predict`)."""

    checkpoint: Path
    videos: list[Path]
    out: Path  # one folder per video, and config.yaml
    classes: Path | None = None  # classes.json or a JSON list of names, for checkpoints without one
    memory_bank: Path | None = None  # required for official checkpoints (they hold no bank)


def load_predictor(
    config: ConfigSource, paths: PredictPaths, device: str | torch.device | None = None
) -> tuple[torch.nn.Module, Config, list[str], InferenceModel]:
    """Model (on `device`, eval mode), resolved config, class names and the loaded checkpoint
    (`ddeseg.inference.load_for_inference`)."""
    from ddeseg.distributed import resolve_device

    loaded = load_for_inference(
        paths.checkpoint, config.file, config.overrides, paths.memory_bank, device=resolve_device(device)
    )
    class_names = resolve_class_names(loaded.config, loaded.classes, paths.classes)
    return loaded.model, loaded.config, class_names, loaded


def sampling_rate(video_frame_rate: float | None, requested: float) -> float:
    """Frames sampled per second: `requested`, capped at the video's frame rate (above it every
    extra sample would repeat a frame already written)."""
    if video_frame_rate and requested > video_frame_rate * (1 + 1e-6):
        return video_frame_rate
    return requested


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


def _write_frames(
    folder: Path,
    predictions: Iterable[FramePrediction],
    writer: OverlayVideoWriter,
    source: SourceFrames | None,
    palette: Any,
    audio_note: str | None,
    frames: list[dict[str, Any]],
    advance: Callable[[], None],
) -> None:
    """Each prediction's mask and overlay PNG into `folder`, and the overlay video: the sampled
    pictures, or (`source`) every source frame under the mask of the latest prediction before
    it. Appends each frame's JSON entry to `frames`."""
    painter: LegendOverlay | None = None
    for prediction in predictions:
        name = frame_name(prediction.index)
        Image.fromarray(prediction.mask, mode="L").save(folder / MASKS_DIR / name, optimize=False)
        latest = LegendOverlay(prediction, palette, audio_note)
        picture = latest(prediction.image)
        # Fast compression: the overlays are pictures to look at, written once per frame.
        Image.fromarray(picture, mode="RGB").save(folder / OVERLAYS_DIR / name, compress_level=1)
        if source is None:
            writer.write(picture)
        else:  # the source frames up to this prediction keep the previous mask
            _write_source_frames(writer, source.until(prediction.time_s), painter or latest)
        painter = latest
        frames.append(prediction.to_json())
        advance()
    if source is not None and painter is not None:
        _write_source_frames(writer, source.until(None), painter)


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
    overlay_video: str = "source",
) -> VideoResult:
    """Predict one video and write `out_dir/` (masks, overlays, overlay.mp4, predictions.json).
    `overlay_video`: `source` (overlay.mp4 at the video's frame rate) or `sampled` (at the
    sampling rate); see the module docstring.

    `out_dir` is written as `.{name}.partial` beside it and renamed at the end (replacing an old
    one). `frames_per_second` above the video's frame rate is capped at it, with a warning on
    stderr. `progress`: a rich `Progress` to add this video's bar to. Raises `VideoError`."""
    path, out_dir = Path(path), Path(out_dir)
    info = probe_video(path, allow_no_audio)
    rate = sampling_rate(info.frame_rate, frames_per_second)
    if rate != frames_per_second:
        print(
            f"warning: {path}: --frames-per-second {frames_per_second:g} is above the video's {rate:g}"
            f" frames/s; sampling {rate:g} frames/s (every frame once)",
            file=sys.stderr, flush=True,
        )
    task = None if progress is None else progress.add_task(path.name[:18], total=info.expected_frames(rate))
    frames: list[dict[str, Any]] = []
    try:
        with building_directory(out_dir) as temporary:
            (temporary / MASKS_DIR).mkdir()
            (temporary / OVERLAYS_DIR).mkdir()
            # Without a known frame rate the source's frames cannot be timed: the sampled pictures.
            at_source_rate = overlay_video == "source" and bool(info.frame_rate)
            video_rate = info.frame_rate if at_source_rate else rate
            writer = OverlayVideoWriter(
                temporary / OVERLAY_VIDEO, video_rate, path if info.has_audio else None, first_video_time(path)
            )
            source = SourceFrames(path) if at_source_rate else None
            finished = False
            try:
                predictions = predict_video(
                    path, model, config, class_names,
                    frames_per_second=rate, batch_size=batch_size, allow_no_audio=allow_no_audio,
                )
                audio_note = None if info.has_audio else "no audio: silence"
                advance = (lambda: progress.advance(task)) if progress is not None else (lambda: None)
                _write_frames(temporary, predictions, writer, source, display_palette(class_names), audio_note, frames, advance)
                finished = True
            finally:
                writer.close(finish=finished)
                if source is not None:
                    source.close()
            document = predictions_document(path, info, frames, class_names, config, rate, frames_per_second)
            document["checkpoint"] = checkpoint
            if info.has_audio:
                document["audio"]["overlay_mp4"] = "copied" if writer.audio_copied else "re-encoded to AAC"
            document["overlay_video"] = {
                "frames": "source" if source is not None else "sampled",
                "frames_per_second": video_rate,
                "frames_written": writer.frames_written,
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
        classes=dict(document["summary"]),
    )


def _write_source_frames(writer: OverlayVideoWriter, images: Any, painter: LegendOverlay) -> None:
    """Each source frame with `painter`'s mask and legend (a frame of another size than the
    prediction, in a stream that changes size, is resized to it first)."""
    height, width = painter.shape
    for image in images:
        if image.shape[:2] != painter.shape:
            image = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
        writer.write(painter(image))


def predictions_document(
    path: Path,
    info: VideoInfo,
    frames: list[dict[str, Any]],
    class_names: Sequence[str],
    config: Config,
    frames_per_second: float,
    requested_frames_per_second: float,
) -> dict[str, Any]:
    """The `predictions.json` dict of a video's frames (`FramePrediction.to_json` each); the
    caller adds `checkpoint` and `audio.overlay_mp4`."""
    seen: dict[str, list[float]] = {}
    for frame in frames:
        for entry in frame["classes"]:
            seen.setdefault(entry["name"], []).append(entry["pixel_fraction"])
    summary = {
        name: {"frames": len(fractions), "mean_pixel_fraction": round(float(np.mean(fractions)), 6)}
        for name, fractions in sorted(seen.items(), key=lambda item: (-len(item[1]), item[0]))
    }
    return {
        "version": PREDICTIONS_VERSION,
        "video": str(path),
        "checkpoint": None,
        "width": info.width,
        "height": info.height,
        "duration_s": info.duration_s,
        "frames_per_second": frames_per_second,
        "frames_per_second_requested": requested_frames_per_second,
        "audio": {
            "track": info.has_audio,
            "silence": not info.has_audio,
            "note": None if info.has_audio else "the video has no audio track: predicted with silence (--allow-no-audio)",
            "sources": sorted({frame["audio"] for frame in frames}),
            "overlay_mp4": None,
            "window": f"frame k at time_s = k / {frames_per_second:g} hears [time_s, time_s + {config.data.clip_seconds:g})"
            " of the track, mono, resampled to the model's rate",
        },
        "class_names": list(class_names),
        "box_format": "[x0, y0, x1, y1] normalised: inclusive pixel indices / width or height",
        "summary": summary,
        "frames": frames,
    }


def output_names(videos: Sequence[Path]) -> list[str]:
    """Folder name per input: its stem, `{stem}-2`, `{stem}-3`, ... for repeated stems."""
    used: dict[str, int] = {}
    names = []
    for video in videos:
        stem = video.stem or "video"
        used[stem] = used.get(stem, 0) + 1
        names.append(stem if used[stem] == 1 else f"{stem}-{used[stem]}")
    return names


def run_predict(config: ConfigSource, paths: PredictPaths, run: RunOptions = RunOptions()) -> list[VideoResult]:
    """`ddeseg predict`: every video of `paths` into `out/{stem}/`, with the settings of
    `config.predict` (the checkpoint's config, or `config.file`, with `config.overrides`), on
    `run.device`; `out/config.yaml` is the resolved config, written when a video was.

    A bad video is reported on stderr on one line (`error: PATH: reason`) and skipped; the others
    are still done. Returns one `VideoResult` per input (with `error` set for the failed ones).
    Bad options, an `--out` that is a file and checkpoint problems raise `DDESegError` before any
    video is touched; an output folder this run created stays only if a video was written in it."""
    require_output_folder(paths.out)
    check_overrides(config.overrides)  # a typo fails now, not after the checkpoint is read
    # predict.frames_per_second > 0 and predict.batch_size >= 1 are checked on load
    model, resolved, class_names, loaded = load_predictor(config, paths, run.device)
    # FFmpeg's own messages off (torchvision turns them on when imported): a bad video is
    # reported on our one line, not with decoder chatter around it.
    ffmpeg_log_level = av.logging.get_level()
    av.logging.set_level(None)
    try:
        with reporting_disk_full(Path(paths.out), "predictions"):  # one line; finished videos stay
            return _predict_all(paths, run, model, resolved, class_names, loaded)
    finally:
        av.logging.set_level(ffmpeg_log_level)


def _predict_all(
    paths: PredictPaths, run: RunOptions, model: torch.nn.Module, config: Config, class_names: list[str], loaded: InferenceModel
) -> list[VideoResult]:
    from ddeseg.progress import console

    if loaded.warning():
        console.print(f"[yellow]warning[/]: {loaded.warning()}")
    out_root = Path(paths.out)
    created = [folder for folder in (out_root, *out_root.parents) if not folder.exists()]
    try:
        results = _predict_videos(paths, run, model, config, class_names, out_root)
        if any(result.error is None for result in results):
            write_stage_config(config, out_root)
    finally:
        for folder in created:  # innermost first: a run that wrote nothing leaves no empty folder
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    print_summary(results, class_names, console)
    return results


def _predict_videos(
    paths: PredictPaths, run: RunOptions, model: torch.nn.Module, config: Config, class_names: list[str], out_root: Path
) -> list[VideoResult]:
    from ddeseg.progress import stage_progress

    results = []
    settings = config.predict
    for video, name in zip(paths.videos, output_names(paths.videos), strict=True):
        video = Path(video)
        bar = stage_progress("frames", enabled=run.progress)
        try:
            with bar:
                result = predict_to_directory(
                    video, model, config, class_names, out_root / name,
                    frames_per_second=settings.frames_per_second, batch_size=settings.batch_size,
                    allow_no_audio=settings.allow_no_audio, checkpoint=str(paths.checkpoint), progress=bar,
                    overlay_video=settings.overlay_video,
                )
        except VideoError as error:
            result = VideoResult(path=video, error=str(error))
        except (av.error.FFmpegError, OSError) as error:
            result = VideoResult(path=video, error=f"{video}: {ffmpeg_reason(error)}")
        if result.error is not None:
            # One line, whatever the terminal width (rich would wrap it).
            print(f"error: {' '.join(result.error.split())}", file=sys.stderr, flush=True)
        results.append(result)
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
