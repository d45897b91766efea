"""Audio DSP shared by `prepare`, the model's front end and `predict`: mono mix, resampling,
fixed-length clips, and the batched log-mel of the model's own front end.

There is exactly one log-mel implementation in ddeseg, `ddeseg.models.frontend.LogMelFrontend`
(the model runs it on raw waveforms); `LogMelBatcher` runs the same module on batches of clips,
on the GPU when there is one, and returns float16 `[frames, mel_bins]` per clip, the form
`prepare` stores and `predict` feeds the model.

Its mel filterbank is the config's (`model.frontend`), or the one stored in an audio checkpoint
(`prepare_frontend(cfg, audio_checkpoint)`): the official model gets its filterbank from the
HTS-AT checkpoint it loads, so shards it reads must be made with that filterbank.

torch is imported inside the functions that need it: `prepare`'s reader workers import this
module for the waveform functions and must not pay for torch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import soxr

if TYPE_CHECKING:
    import torch

    from ddeseg.config import FrontendConfig
    from ddeseg.models.frontend import LogMelFrontend


def mix_to_mono(data: np.ndarray) -> np.ndarray:
    """`[samples]` (already mono, as soundfile reads a mono file) or `[samples, channels]` ->
    float32 `[samples]`, the mean of the channels. Raises `ValueError` for other shapes."""
    data = np.asarray(data)
    if data.ndim == 1:
        return data.astype(np.float32, copy=False)
    if data.ndim != 2:
        raise ValueError(f"audio must be [samples] or [samples, channels], got shape {data.shape}")
    if data.shape[1] == 1:
        return data[:, 0].astype(np.float32, copy=False)
    return data.mean(axis=1, dtype=np.float64).astype(np.float32)


def resample(wave: np.ndarray, rate: int, sample_rate: int) -> np.ndarray:
    """Mono float32 `[samples]` from `rate` to `sample_rate` Hz with soxr's HQ filter (as is when equal)."""
    if rate == sample_rate:
        return wave
    return soxr.resample(wave, rate, sample_rate, quality="HQ").astype(np.float32)


def fit_length(wave: np.ndarray, samples: int) -> np.ndarray:
    """Repeat a short clip end to end and cut to `samples` (the official `_wav_repeat`)."""
    if wave.shape[0] < samples:
        wave = np.tile(wave, math.ceil(samples / wave.shape[0]))
    return np.ascontiguousarray(wave[:samples], dtype=np.float32)


def prepare_frontend(
    cfg: FrontendConfig, audio_checkpoint: str | Path | None = None
) -> tuple[LogMelFrontend, dict[str, Any]]:
    """The front end `prepare` computes log-mels with, and its `prepare.json` entry.

    Args:
        cfg: the config's front end (STFT size, hop, mel bins, and the filterbank when no
            checkpoint is given).
        audio_checkpoint: an HTS-AT or full DDESeg checkpoint whose `logmel_extractor.melW` (and
            STFT kernels, where present) replace the config's, as `load_checkpoint` does for the
            model. Its filterbank must have the config's shape `[n_fft/2+1, mel_bins]`.
    Returns:
        `(frontend, entry)`: entry holds `source` ("config" or the checkpoint's absolute path),
        `filterbank_sha256` (`filterbank_fingerprint` of the melW used), `stft` ("config" or
        "checkpoint") and `stft_sha256` (the same hash over the real then imaginary kernels).
        Raises `CheckpointError` for a checkpoint without a filterbank or of another shape.
    """
    import torch

    from ddeseg.errors import CheckpointError
    from ddeseg.models.frontend import LogMelFrontend, filterbank_fingerprint
    from ddeseg.models.weights import frontend_state_from_checkpoint

    frontend = LogMelFrontend(cfg)
    stft_from = "config"
    if audio_checkpoint is not None:
        stored = frontend_state_from_checkpoint(audio_checkpoint)
        own = frontend.state_dict()
        for key, value in stored.items():
            if key not in own:
                continue
            if tuple(value.shape) != tuple(own[key].shape):
                raise CheckpointError(
                    f"{audio_checkpoint}: {key} has shape {list(value.shape)} but the config's front end "
                    f"(n_fft {cfg.n_fft}, mel_bins {cfg.mel_bins}) needs {list(own[key].shape)}; "
                    "set model.frontend.n_fft / mel_bins to the checkpoint's"
                )
            if not bool(torch.isfinite(value).all()):
                raise CheckpointError(
                    f"{audio_checkpoint}: {key} holds NaN or infinite values (see the fmax note in "
                    "configs/README.md); use the HTS-AT checkpoint the model loads"
                )
            with torch.no_grad():
                own[key].copy_(value.to(own[key].dtype))
            if key.startswith("spectrogram_extractor."):
                stft_from = "checkpoint"
    stft = frontend.spectrogram_extractor.stft
    entry = {
        "source": "config" if audio_checkpoint is None else str(Path(audio_checkpoint).resolve()),
        "filterbank_sha256": filterbank_fingerprint(frontend.logmel_extractor.melW),
        "stft": stft_from,
        "stft_sha256": filterbank_fingerprint(torch.cat([stft.conv_real.weight, stft.conv_imag.weight])),
    }
    return frontend, entry


class LogMelBatcher:
    """`batcher(audio float32 [N, samples]) -> float16 [N, frames, mel_bins]`, `batch_size` at a time.

    `frontend`: a front end config (its filterbank is built) or a ready `LogMelFrontend` (e.g.
    from `prepare_frontend`), which is moved to `device`: the stage's, resolved once by it
    (`ddeseg.distributed.resolve_device`).
    """

    def __init__(
        self,
        frontend: FrontendConfig | LogMelFrontend,
        device: torch.device,
        batch_size: int | None = None,
    ):
        from ddeseg.models.frontend import LogMelFrontend

        self.device = device
        self.batch_size = batch_size or (256 if self.device.type == "cuda" else 64)
        module = frontend if isinstance(frontend, LogMelFrontend) else LogMelFrontend(frontend)
        self.module = module.to(self.device).eval()

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        import torch

        if audio.ndim != 2:
            raise ValueError(f"audio must be [N, samples], got {audio.shape}")
        outputs = []
        with torch.inference_mode():
            for start in range(0, audio.shape[0], self.batch_size):
                batch = torch.from_numpy(
                    np.ascontiguousarray(audio[start : start + self.batch_size], dtype=np.float32)
                )
                logmel = self.module(batch.to(self.device))
                outputs.append(logmel.float().cpu().numpy().astype(np.float16))
        return np.concatenate(outputs, axis=0)
