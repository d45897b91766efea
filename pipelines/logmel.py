"""Batched log-mel precompute with the model's own front end.

There is exactly one log-mel implementation in ddeseg, `ddeseg.models.frontend.LogMelFrontend`
(the model runs it on raw waveforms); prepare runs the same module on batches of clips, on the
GPU when there is one, and stores the result as float16 `[frames, mel_bins]` per sample.
"""

from __future__ import annotations

import numpy as np
import torch

from ddeseg.config import FrontendConfig


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class LogMelBatcher:
    """`batcher(audio float32 [N, samples]) -> float16 [N, frames, mel_bins]`, `batch_size` at a time."""

    def __init__(self, frontend: FrontendConfig, device: str | None = None, batch_size: int | None = None):
        from ddeseg.models.frontend import LogMelFrontend

        self.device = torch.device(device or default_device())
        self.batch_size = batch_size or (256 if self.device.type == "cuda" else 64)
        self.module = LogMelFrontend(frontend).to(self.device).eval()

    @torch.inference_mode()
    def __call__(self, audio: np.ndarray) -> np.ndarray:
        if audio.ndim != 2:
            raise ValueError(f"audio must be [N, samples], got {audio.shape}")
        outputs = []
        for start in range(0, audio.shape[0], self.batch_size):
            batch = torch.from_numpy(
                np.ascontiguousarray(audio[start : start + self.batch_size], dtype=np.float32)
            )
            logmel = self.module(batch.to(self.device))
            outputs.append(logmel.float().cpu().numpy().astype(np.float16))
        return np.concatenate(outputs, axis=0)
