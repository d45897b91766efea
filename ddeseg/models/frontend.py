"""The audio front end: waveform -> power spectrogram -> log-mel, the one implementation in ddeseg.

The model's HTS-AT backbone holds a `Spectrogram` as `spectrogram_extractor` and a
`LogMelFilterBank` as `logmel_extractor` (the official state-dict names), and the data pipeline
runs `LogMelFrontend`, which is the same two modules in a row, so precomputed and on-the-fly
log-mels are one computation.

What it computes (torchlibrosa's `Spectrogram` + `LogmelFilterBank`, as the official code):
- STFT as two frozen `Conv1d` kernels (`stft.conv_real`, `stft.conv_imag`, `[n_fft/2+1, 1, n_fft]`):
  periodic Hann window of length `n_fft`, hop `hop_length`, centred with reflect padding of
  `n_fft // 2` on both sides; power spectrogram `real**2 + imag**2`;
- mel projection with a frozen `melW [n_fft/2+1, mel_bins]` (librosa slaney filters, `fmin`,
  `fmax`), then `10 * log10(max(mel, 1e-10))` (ref 1, no top-dB clipping).

The STFT kernels and `melW` are frozen `nn.Parameter`s, as in the official model: they are part of
its state dict and of its parameter count. Loading an HTS-AT or official DDESeg checkpoint
replaces `melW` with the checkpoint's filterbank (see `configs/README.md`, "the fmax note").
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddeseg.config import FrontendConfig

AMIN = 1e-10  # floor of the mel power before the log


def frames_for(cfg: FrontendConfig, num_samples: int) -> int:
    """Number of log-mel frames the front end makes from `num_samples` samples (centred STFT)."""
    return num_samples // cfg.hop_length + 1


def filterbank_fingerprint(melW: torch.Tensor) -> str:
    """sha256 (hex) of a mel filterbank `[n_fft/2+1, mel_bins]` as C-ordered float32 bytes.

    `prepare.json` records it for the filterbank its log-mels were made with, and readers
    compare it with the model's `logmel_extractor.melW` (`ShardIndex.check_frontend`).
    """
    array = melW.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    return hashlib.sha256(array.tobytes()).hexdigest()


def hann_dft_kernels(n_fft: int) -> tuple[np.ndarray, np.ndarray]:
    """Windowed DFT kernels `(real, imag)`, each float64 `[n_fft // 2 + 1, n_fft]`.

    Row k holds `w[n] * cos(2 pi k n / N)` and `-w[n] * sin(2 pi k n / N)`, w the periodic Hann
    window (librosa's `get_window('hann', N, fftbins=True)`). `k * n` is reduced modulo N before
    the angle is formed, so the kernels are exact to float64 rounding.
    """
    n = np.arange(n_fft)
    k = np.arange(n_fft // 2 + 1)
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / n_fft)
    angle = 2.0 * np.pi * (np.outer(k, n) % n_fft) / n_fft
    return np.cos(angle) * window, -np.sin(angle) * window


def mel_filterbank(cfg: FrontendConfig) -> np.ndarray:
    """librosa slaney mel filters as float32 `[n_fft // 2 + 1, mel_bins]` (the official `melW`)."""
    import librosa  # imported lazily: it takes a second and only construction needs it

    if not 0.0 <= cfg.fmin < cfg.fmax <= cfg.sample_rate / 2:
        raise ValueError(
            f"front end: need 0 <= fmin < fmax <= sample_rate / 2, got fmin {cfg.fmin}, fmax {cfg.fmax}, "
            f"sample_rate {cfg.sample_rate} (the official yaml's `fmax: 50` builds an all-NaN filterbank; "
            "use the Nyquist frequency)"
        )
    filters = librosa.filters.mel(
        sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.mel_bins, fmin=cfg.fmin, fmax=cfg.fmax
    )
    return np.ascontiguousarray(filters.T, dtype=np.float32)


class STFT(nn.Module):
    """Centred STFT as strided convolutions; returns `(real, imag)`, each `[B, 1, frames, n_fft/2+1]`."""

    def __init__(self, n_fft: int = 1024, hop_length: int = 256):
        super().__init__()
        self.n_fft = n_fft
        self.hop_length = hop_length
        freq_bins = n_fft // 2 + 1
        self.conv_real = nn.Conv1d(1, freq_bins, n_fft, stride=hop_length, bias=False)
        self.conv_imag = nn.Conv1d(1, freq_bins, n_fft, stride=hop_length, bias=False)
        real, imag = hann_dft_kernels(n_fft)
        with torch.no_grad():
            self.conv_real.weight.copy_(torch.from_numpy(real).float().unsqueeze(1))
            self.conv_imag.weight.copy_(torch.from_numpy(imag).float().unsqueeze(1))
        self.requires_grad_(False)

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if waveform.shape[-1] <= self.n_fft // 2:
            raise ValueError(
                f"waveform of {waveform.shape[-1]} samples is too short for reflect padding of {self.n_fft // 2}"
            )
        x = F.pad(waveform[:, None, :], (self.n_fft // 2, self.n_fft // 2), mode="reflect")
        # [B, freq, frames] -> [B, 1, frames, freq]
        real = self.conv_real(x).transpose(1, 2)[:, None]
        imag = self.conv_imag(x).transpose(1, 2)[:, None]
        return real, imag


class Spectrogram(nn.Module):
    """Power spectrogram: waveform `[B, samples]` -> `[B, 1, frames, n_fft/2+1]`."""

    def __init__(self, n_fft: int = 1024, hop_length: int = 256):
        super().__init__()
        self.stft = STFT(n_fft, hop_length)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        real, imag = self.stft(waveform)
        return real**2 + imag**2


class LogMelFilterBank(nn.Module):
    """Power spectrogram `[..., n_fft/2+1]` -> log-mel in dB `[..., mel_bins]`."""

    def __init__(self, filterbank: np.ndarray | torch.Tensor):
        super().__init__()
        self.melW = nn.Parameter(torch.as_tensor(filterbank, dtype=torch.float32).clone(), requires_grad=False)

    def forward(self, power: torch.Tensor) -> torch.Tensor:
        mel = torch.matmul(power, self.melW)
        return 10.0 * torch.log10(torch.clamp(mel, min=AMIN))


class LogMelFrontend(nn.Module):
    """Waveform float32 `[B, samples]` -> log-mel float32 `[B, frames, mel_bins]` (no channel dim).

    `frames = samples // hop_length + 1`; this is the fixture's `logmel` (before `bn0`) with its
    channel dim squeezed. Frozen and deterministic; the data pipeline and the model share it.
    Built from a `FrontendConfig`, or around existing extractors (`from_modules`) so that a
    filterbank loaded from a checkpoint is used as is.
    """

    def __init__(self, cfg: FrontendConfig | None = None):
        super().__init__()
        cfg = cfg or FrontendConfig()
        self.spectrogram_extractor = Spectrogram(cfg.n_fft, cfg.hop_length)
        self.logmel_extractor = LogMelFilterBank(mel_filterbank(cfg))

    @classmethod
    def from_modules(cls, spectrogram_extractor: Spectrogram, logmel_extractor: LogMelFilterBank) -> LogMelFrontend:
        """A front end sharing (not copying) the given extractors, e.g. a model's."""
        frontend = cls.__new__(cls)
        nn.Module.__init__(frontend)
        frontend.spectrogram_extractor = spectrogram_extractor
        frontend.logmel_extractor = logmel_extractor
        return frontend

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if waveform.ndim != 2:
            raise ValueError(f"waveform must be [B, samples], got shape {tuple(waveform.shape)}")
        return self.logmel_extractor(self.spectrogram_extractor(waveform)).squeeze(1)


def spec_augment(
    logmel: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    time_drop_width: int = 64,
    time_stripes: int = 2,
    freq_drop_width: int = 8,
    freq_stripes: int = 2,
    fill: float = 0.0,
) -> torch.Tensor:
    """SpecAugment (torchlibrosa's `SpecAugmentation`): masked time and mel stripes.

    Args:
        logmel: `[frames, mel_bins]` (one clip) or `[N, ..., frames, mel_bins]` (a batch; each
            of the N items gets its own stripes, shared by its middle dims).
        generator: torch generator for the draws (None: the global one).
        time_drop_width / freq_drop_width: a stripe's width is drawn from `[0, width)`, its start
            uniformly among the positions where it fits.
        time_stripes / freq_stripes: stripes per axis.
        fill: value of masked cells. HTS-AT masks with 0 *after* `bn0` (which the model does in
            `official` audio mode); a loader working before `bn0` should pass bn0's running mean
            or the clip's mean instead.
    Returns:
        a new tensor, `logmel` unchanged. Defaults are the official HTS-AT ones.
    """
    out = logmel.clone()
    items = out.unsqueeze(0) if out.ndim == 2 else out
    frames, mel_bins = items.shape[-2], items.shape[-1]

    def draw(high: int) -> int:
        return int(torch.randint(0, max(1, high), (1,), generator=generator))

    # Index (a single view) rather than iterate (unbind: multiple views), so the in-place fill
    # stays differentiable when the audio backbone is trained (pretrain-audio).
    for index in range(items.shape[0]):
        item = items[index]
        for axis, total, width_max, stripes in (
            (-2, frames, time_drop_width, time_stripes),
            (-1, mel_bins, freq_drop_width, freq_stripes),
        ):
            for _ in range(stripes):
                width = draw(width_max)
                start = draw(total - width)
                item.narrow(axis, start, min(width, total - start)).fill_(fill)
    return out

