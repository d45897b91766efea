"""The Python API: load a checkpoint once, segment frames (with their second of audio) or videos.

    import ddeseg
    model = ddeseg.load("demo-out/run/best.pt")
    result = model.segment(frame, audio, sample_rate)   # one frame, or a batch
    result.masks[0]                                      # uint8 [H, W] class ids
    result.names(0)                                      # the sounding classes in it

Everything here is a thin layer over what `ddeseg predict` and `ddeseg evaluate` run:
`ddeseg.inference.load_for_inference` builds the model, `ddeseg.segment.predict_frames` makes its
inputs exactly as evaluation does and turns logits into labels, and the audio goes through
`ddeseg.audio`'s mono mix, resampling and clip fitting, as `prepare` and `predict` do.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddeseg.audio import fit_length, mix_to_mono, resample
from ddeseg.errors import DDESegError
from ddeseg.inference import InferenceModel, load_for_inference, resolve_class_names
from ddeseg.segment import FramePrediction, predict_frames, predict_video
from ddeseg.video import SampledFrame

IN_MEMORY = "given"  # `FramePrediction.audio_source` of audio passed to `segment`


@dataclass
class Segmentation:
    """What `Segmenter.segment` returns for N frames."""

    masks: list[np.ndarray]  # per frame: uint8 [H, W] class ids at the frame's own size
    class_names: list[str]  # names by class id (index 0: background)
    present: list[list[dict[str, Any]]] = field(default_factory=list)  # per frame: id, name, pixel_fraction, box

    def __len__(self) -> int:
        return len(self.masks)

    def names(self, frame: int = 0) -> list[str]:
        """The names of the classes painted in frame `frame` (background excluded), by id."""
        return [entry["name"] for entry in self.present[frame]]


class Segmenter:
    """A loaded DDESeg (eval mode) with its class names. Build it with `ddeseg.load`."""

    def __init__(self, loaded: InferenceModel, class_names: Sequence[str]):
        self.loaded = loaded
        self.model = loaded.model
        self.config = loaded.config
        self.class_names = list(class_names)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def segment(
        self, frames: Any, audio: Any, sample_rate: int, *, batch_size: int | None = None
    ) -> Segmentation:
        """Segment the sounding objects of frames, each with the audio heard with it.

        Args:
            frames: one image or a batch. An image is a uint8 RGB numpy array `[H, W, 3]` (or
                `[H, W]` grey), a PIL image, an image file's path, or a tensor `[3, H, W]` /
                `[H, W, 3]` (uint8, or float in [0, 1]). A batch is a list of images (sizes may differ) or one array/tensor
                `[N, H, W, 3]` / `[N, 3, H, W]`.
            audio: per frame, the waveform starting at the frame (the model hears
                `data.clip_seconds`, 1 s; shorter clips are repeated, longer ones cut): 1-D mono,
                or 2-D with channels on the shorter axis (`[samples, channels]` as soundfile reads,
                `[channels, samples]` as torchaudio loads). For a batch: a list of those, or one
                array `[N, samples]` / `[N, samples, channels]`. Floats in [-1, 1]; int16 is scaled.
            sample_rate: the audio's rate in Hz (resampled to the model's, soxr HQ).
            batch_size: frames per forward pass (default: `predict.batch_size`).
        Returns:
            a `Segmentation`: one mask per frame at the frame's size, the class names.
        Raises:
            `DDESegError` for frames or audio of an unusable shape, or counts that differ.
        """
        images, batched = _images(frames)
        waves = _waveforms(audio, batched, len(images))
        frontend = self.config.model.frontend
        clip = int(round(self.config.data.clip_seconds * frontend.sample_rate))
        sampled = [
            SampledFrame(i, 0.0, 0.0, image, fit_length(resample(wave, int(sample_rate), frontend.sample_rate), clip), IN_MEMORY)
            for i, (image, wave) in enumerate(zip(images, waves, strict=True))
        ]
        predictions = list(
            predict_frames(sampled, self.model, self.config, self.class_names, batch_size=batch_size or self.config.predict.batch_size)
        )
        return Segmentation(
            masks=[p.mask for p in predictions], class_names=self.class_names, present=[p.classes for p in predictions]
        )

    def segment_video(
        self, path: str | Path, *, frames_per_second: float | None = None, allow_no_audio: bool | None = None
    ) -> Iterator[FramePrediction]:
        """Segment a video file as `ddeseg predict` does (one frame per second by default, with
        the second of audio that starts at it), yielding a `FramePrediction` per sampled frame
        (`.image`, `.mask`, `.classes`, `.time_s`); frames are decoded as they are used."""
        settings = self.config.predict
        yield from predict_video(
            path,
            self.model,
            self.config,
            self.class_names,
            frames_per_second=frames_per_second or settings.frames_per_second,
            batch_size=settings.batch_size,
            allow_no_audio=settings.allow_no_audio if allow_no_audio is None else allow_no_audio,
        )


def load(
    checkpoint: str | Path,
    *,
    memory_bank: str | Path | None = None,
    device: str | torch.device | None = None,
    config: str | Path | None = None,
    classes: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> Segmenter:
    """Load a checkpoint for segmentation.

    Args:
        checkpoint: `best.pt`/`last.pt` from `ddeseg train`, or an official DDESeg checkpoint
            (then `config` and `memory_bank` too).
        memory_bank: a `bank.npy` of `ddeseg build-memory-bank`; replaces the checkpoint's.
        device: "cpu", "cuda", "cuda:1"; default: the local GPU when there is one.
        config: a config YAML or bundled name (`v2`): required for official checkpoints.
        classes: `classes.json` of `ddeseg prepare` (or a JSON list of names), for checkpoints
            without a class list.
        overrides: `section.key=value` strings, e.g. `predict.batch_size=16`.
    Returns:
        a `Segmenter`.
    Raises:
        `DDESegError` (or `CheckpointError`, `DataError`), one line naming the file.
    """
    from ddeseg.distributed import resolve_device

    loaded = load_for_inference(checkpoint, config, overrides, memory_bank, device=resolve_device(device))
    names = resolve_class_names(loaded.config, loaded.classes, Path(classes) if classes is not None else None)
    return Segmenter(loaded, names)


# --------------------------------------------------------------------------------------------
# Inputs to uint8 images and mono float32 waveforms
# --------------------------------------------------------------------------------------------


def _images(frames: Any) -> tuple[list[np.ndarray], bool]:
    """(uint8 RGB `[H, W, 3]` images, whether `frames` was a batch)."""
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise DDESegError("frames: an empty batch")
        return [_image(frame, f"frames[{i}]") for i, frame in enumerate(frames)], True
    array = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else frames
    if isinstance(array, np.ndarray) and array.ndim == 4:
        return [_image(frame, f"frames[{i}]") for i, frame in enumerate(array)], True
    return [_image(frames, "frames")], False


def _image(frame: Any, where: str) -> np.ndarray:
    if isinstance(frame, (str, Path)):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(frame) as opened:
                return np.asarray(opened.convert("RGB"))
        except (OSError, UnidentifiedImageError) as error:
            raise DDESegError(f"{where}: cannot read image {frame}: {error}") from None
    if hasattr(frame, "convert") and hasattr(frame, "size"):  # a PIL image
        return np.asarray(frame.convert("RGB"))
    array = frame.detach().cpu().numpy() if isinstance(frame, torch.Tensor) else np.asarray(frame)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[2] not in (3, 4):
        array = array.transpose(1, 2, 0)  # channels first (a torchvision tensor)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise DDESegError(f"{where}: an image must be [H, W, 3], [3, H, W] or [H, W], got shape {array.shape}")
    array = array[:, :, :3]  # drop an alpha channel
    if np.issubdtype(array.dtype, np.floating):
        if array.size and (array.min() < 0 or array.max() > 1):
            raise DDESegError(f"{where}: a float image must hold values in [0, 1] (uint8 images: 0-255)")
        array = np.rint(array * 255)
    elif array.dtype != np.uint8 and array.size and (array.min() < 0 or array.max() > 255):
        raise DDESegError(f"{where}: integer image values must be 0-255, got {array.min()}..{array.max()}")
    return np.ascontiguousarray(array, dtype=np.uint8)


def _waveforms(audio: Any, batched: bool, count: int) -> list[np.ndarray]:
    """One mono float32 waveform per frame."""
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu().numpy()
    if batched:
        if isinstance(audio, np.ndarray) and audio.ndim in (2, 3):
            items = list(audio)
        elif isinstance(audio, (list, tuple)):
            items = list(audio)
        else:
            raise DDESegError(f"audio: {count} frames need one waveform each (a list, or an array [N, samples])")
        if len(items) != count:
            raise DDESegError(f"audio: {len(items)} waveforms for {count} frames")
        return [_mono(item, f"audio[{i}]") for i, item in enumerate(items)]
    return [_mono(audio, "audio")]


def _mono(wave: Any, where: str) -> np.ndarray:
    array = wave.detach().cpu().numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave)
    if array.ndim == 2 and array.shape[0] < array.shape[1]:
        array = array.T  # [channels, samples] (torchaudio) -> [samples, channels]
    if array.ndim not in (1, 2) or array.shape[0] == 0:
        raise DDESegError(f"{where}: a waveform must be [samples] or [samples, channels], got shape {array.shape}")
    if array.dtype == np.int16:
        array = array.astype(np.float32) / 32768.0  # as soundfile reads int16
    elif not np.issubdtype(array.dtype, np.floating):
        raise DDESegError(f"{where}: audio must be float (in [-1, 1]) or int16, got {array.dtype}")
    return mix_to_mono(array.astype(np.float32, copy=False))
