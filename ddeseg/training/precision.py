"""The precision a run trains in and its autocast context (`train.precision`, `train.cpu_autocast`;
the names are the config's `PRECISIONS`)."""

from __future__ import annotations

import contextlib

import torch

from ddeseg.config import PRECISIONS, Config
from ddeseg.errors import DDESegError


def run_precision(config: Config, device: torch.device) -> str:
    """The precision a run trains in on `device`: `train.precision` on CUDA. Elsewhere float32
    (the CPU default: CPU autocast is slower, and the demo's and the tests' numbers are float32),
    unless `train.cpu_autocast` asks for bf16 on the CPU. Raises `DDESegError` for fp16 there."""
    precision = config.train.precision
    if device.type == "cuda" or precision == "fp32":
        return precision
    if not config.train.cpu_autocast or device.type != "cpu":
        return "fp32"
    if precision == "fp16":
        raise DDESegError(
            "train.precision fp16 needs a CUDA device (train.cpu_autocast applies to bf16): set train.precision=bf16 or fp32"
        )
    return precision


def autocast(device_type: str, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of a precision: `fp32` none; `bf16` on CUDA and on the CPU (what the
    CPU tests use); `fp16` on CUDA only (pair it with a GradScaler). The model keeps its frozen
    audio backbone in float32 inside it (`DDESeg.forward_intermediates`); feed the loss
    `logits.float()`."""
    if precision not in PRECISIONS:
        raise DDESegError(f"train.precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device_type != "cuda":
        raise DDESegError("train.precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device_type, dtype=dtype)
