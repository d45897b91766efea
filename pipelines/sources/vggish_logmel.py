"""VGGish log-mel examples, as the AVSBench release stores them in `audio_log_mel/*.pkl`.

Only `ddeseg synth --layout avsbench` uses this: it writes the `.pkl` files so that the official
S4/MS3 loaders (which `pickle.load` them) read our synthetic roots. `ddeseg prepare` never reads
them (it never unpickles anything): it computes its own features from the wav.

The parameters are VGGish's (`vggish_params.py` of the TensorFlow models repository, which the
AVSBench preprocessing calls through `vggish_input.wavfile_to_examples`); the code is ours:

- 16 kHz mono; frames of 400 samples (25 ms) every 160 samples (10 ms), no padding, each
  multiplied by a periodic Hann window and zero-padded to a 512-point FFT;
- magnitude (not power) spectrum, 257 bins from 0 Hz to 8 kHz;
- 64 mel bands between 125 and 7500 Hz on the HTK mel scale (`1127 ln(1 + f / 700)`), each a
  triangle that is linear in mel (its three corners are consecutive points of 66 evenly spaced
  mel values), unnormalised; the 0 Hz bin gets no weight;
- `log(mel + 0.01)`;
- examples of 96 frames (0.96 s) every 96 frames, float32 `[examples, 96, 64]`.

AVSBench keeps 5 examples per 5 s clip (`[5, 1, 96, 64]` once a channel axis is added); a
clip that gives fewer repeats its last example.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np

SAMPLE_RATE_HZ = 16_000
WINDOW_SAMPLES = 400
HOP_SAMPLES = 160
FFT_SIZE = 512
MEL_BANDS = 64
MEL_LOW_HZ = 125.0
MEL_HIGH_HZ = 7500.0
LOG_OFFSET = 0.01
EXAMPLE_FRAMES = 96
AVSBENCH_EXAMPLES = 5


def hz_to_mel(frequency_hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale."""
    return 1127.0 * np.log1p(np.asarray(frequency_hz, dtype=np.float64) / 700.0)


def mel_weights() -> np.ndarray:
    """float64 `[257, 64]`: spectrum bin -> mel band weights (triangles linear in mel)."""
    bins = FFT_SIZE // 2 + 1
    bin_mel = hz_to_mel(np.linspace(0.0, SAMPLE_RATE_HZ / 2, bins))
    corners = np.linspace(hz_to_mel(MEL_LOW_HZ), hz_to_mel(MEL_HIGH_HZ), MEL_BANDS + 2)
    lower, centre, upper = corners[:-2], corners[1:-1], corners[2:]
    rising = (bin_mel[:, None] - lower) / (centre - lower)
    falling = (upper - bin_mel[:, None]) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights[0, :] = 0.0  # the DC bin, whose mel value (0) can fall inside no band anyway
    return weights


def log_mel_frames(wave: np.ndarray) -> np.ndarray:
    """Mono float `[samples]` at 16 kHz -> float64 `[frames, 64]` log-mel (no padding)."""
    wave = np.asarray(wave, dtype=np.float64)
    if wave.shape[0] < WINDOW_SAMPLES:
        return np.zeros((0, MEL_BANDS))
    count = 1 + (wave.shape[0] - WINDOW_SAMPLES) // HOP_SAMPLES
    starts = np.arange(count)[:, None] * HOP_SAMPLES
    frames = wave[starts + np.arange(WINDOW_SAMPLES)]
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(WINDOW_SAMPLES) / WINDOW_SAMPLES)  # periodic
    magnitude = np.abs(np.fft.rfft(frames * window, n=FFT_SIZE, axis=1))
    return np.log(magnitude @ mel_weights() + LOG_OFFSET)


def avsbench_examples(wave: np.ndarray, examples: int = AVSBENCH_EXAMPLES) -> np.ndarray:
    """float32 `[examples, 1, 96, 64]`: the first `examples` 0.96 s examples of a 16 kHz clip,
    the last repeated when the clip gives fewer (a silent example when it gives none)."""
    frames = log_mel_frames(wave)
    available = 0 if frames.shape[0] < EXAMPLE_FRAMES else 1 + (frames.shape[0] - EXAMPLE_FRAMES) // EXAMPLE_FRAMES
    if available == 0:
        blocks = [np.full((EXAMPLE_FRAMES, MEL_BANDS), np.log(LOG_OFFSET))]
    else:
        blocks = [frames[i * EXAMPLE_FRAMES : (i + 1) * EXAMPLE_FRAMES] for i in range(min(available, examples))]
    blocks += [blocks[-1]] * (examples - len(blocks))
    return np.stack(blocks)[:, None].astype(np.float32)


class _TensorFromArray:
    """Pickles as `torch.from_numpy(array)`: `pickle.load` gives the float32 tensor the release
    holds, and the bytes depend only on the values (a pickled torch tensor carries torch's
    random serialization id, so the same dataset would not give the same bytes)."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __reduce__(self) -> tuple[Any, tuple[np.ndarray]]:
        import torch

        return torch.from_numpy, (self.array,)


def pickled_tensor(array: np.ndarray) -> bytes:
    """A pickle that loads as `array` made a torch tensor (the release's `.pkl` form)."""
    buffer = io.BytesIO()
    pickle.dump(_TensorFromArray(np.ascontiguousarray(array)), buffer, protocol=4)
    return buffer.getvalue()
