"""The reference fixture's weight recipe (../shared/reference/README.md), for tests and benchmarks.

The official model was run with weights drawn by this recipe; filling our model the same way and
comparing activations with `tiny_forward.npz` proves both compute the same function.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

# Tolerances stated with the fixture (float32, CPU): every array, and the log-mel in dB.
ATOL = RTOL = 1e-4
LOGMEL_ATOL = 1e-3
# The weight scale of `tiny_forward.npz`, and of `tiny_large_forward*.npz` / `train_step.npz`
# (large enough that the aligners' clustering and scoring change the output).
SCALE = 0.02
LARGE_SCALE = 0.1


def fill_reference_weights(model: nn.Module, scale: float = SCALE) -> None:
    """Overwrite every floating-point state entry (except the STFT kernels and the mel
    filterbank, which are DSP constants) with deterministic values seeded by the CRC32 of its
    key, load strictly, and put the model in eval mode. Call it before `set_memory_bank`: the
    official state dict has no bank. `scale` multiplies the draws of every entry that is not a
    BatchNorm statistic or a norm scale (`SCALE` or `LARGE_SCALE`, see the fixture README)."""
    filled = {}
    for key, tensor in model.state_dict().items():
        if not tensor.is_floating_point() or "spectrogram_extractor" in key or "logmel_extractor" in key:
            filled[key] = tensor
            continue
        generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        r = torch.randn(tensor.shape, generator=generator, dtype=torch.float64).float()
        if key.endswith("running_var"):
            filled[key] = 1.0 + 0.1 * r.abs()
        elif key.endswith("running_mean"):
            filled[key] = 0.1 * r
        elif tensor.ndim == 1 and key.endswith(".weight"):  # norm scales
            filled[key] = 1.0 + 0.02 * r
        else:
            filled[key] = scale * r
    model.load_state_dict(filled, strict=True)
    model.eval()
