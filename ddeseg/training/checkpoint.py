"""The training checkpoint format, and the only module that knows its keys: building the
payload (`training_payload`), writing it (`save_training_checkpoint`: atomic, mode 0644, every
rank's RNG state), reading it (`load_training_checkpoint`, `torch.load(weights_only=True)`),
recognising it (`is_training_checkpoint`) and restoring a run from it (`restore_training_state`).

A ddeseg training checkpoint is a superset of the official one, so the official code's
`checkpoint['model']` still finds the weights:

    {'format': 'ddeseg-train-1', 'model': state_dict (memory bank included), 'optimizer',
     'lr_scheduler', 'scaler', 'step', 'epoch', 'miou', 'fscore', 'config': plain dict,
     'classes': [names], 'rng': {...}, 'best': {...}, 'batch_plan': {...}}

`best.pt` (`WEIGHTS_ONLY`) is written without `RESUME_STATE` (what only `--resume` from last.pt
needs). Everything in it is a tensor or a plain Python container, so it loads with
`weights_only=True` (no pickled objects; a checkpoint from someone else cannot run code).
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddeseg.distributed import DistributedContext
from ddeseg.errors import CheckpointError, DDESegError
from ddeseg.fileio import write_bytes_atomic

FORMAT = "ddeseg-train-1"


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states as weights-only-loadable values."""
    numpy_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": numpy_state[0],
            "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "pos": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    python_state = state["python"]
    # weights_only loading turns the inner tuple into a list; random.setstate wants tuples.
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["name"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(payload: dict[str, Any], path: str | Path) -> Path:
    """Write `payload` to `path` through a temporary file in the same folder, flushed to the disk,
    and rename it: a crash, SIGKILL or Ctrl-C never leaves a truncated checkpoint under the final
    name, and a reader (`evaluate` on a run being trained) always loads a complete one.

    The payload is serialised in memory first: `torch.save` writing to a file turns a full disk
    into an opaque RuntimeError ("unexpected pos"), whereas the plain write reports ENOSPC, which
    becomes `DiskFullError` naming the folder and the bytes needed; the earlier file is intact."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes_atomic(path, buffer.getbuffer())
    return path


def load_training_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a ddeseg training checkpoint through the one safe loader
    (`ddeseg.models.weights.read_checkpoint_file`, weights only). Raises `CheckpointError`."""
    from ddeseg.models.weights import read_checkpoint_file

    path = Path(path)
    payload = read_checkpoint_file(path, map_location=map_location)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a ddeseg training checkpoint (format {payload.get('format') if isinstance(payload, dict) else type(payload).__name__!r});"
            " to start from official or backbone weights use the model loader instead"
        )
    return payload


RESUME_STATE = ("optimizer", "lr_scheduler", "scaler", "rng")
WEIGHTS_ONLY = ("best.pt",)
CHECKPOINT_MODE = 0o644  # readable by the group and others, as other outputs (mkstemp makes 0600)


def save_training_checkpoint(path: Path, payload: dict[str, Any], context: DistributedContext | None = None) -> None:
    """Write `payload` plus `rng` atomically to `path` (the main rank writes), mode 0644.

    Every rank's RNG state is gathered (a collective: call it on every rank) so that a resumed
    multi-rank run continues each rank's stream; `rng` is that list under torchrun and the one
    state otherwise. A file named in `WEIGHTS_ONLY` (best.pt) is written without `RESUME_STATE`.
    """
    context = context or DistributedContext()
    rng_states = _gather_objects(capture_rng_state(), context)
    if context.is_main:
        payload = {**payload, "rng": rng_states if context.is_distributed else rng_states[0]}
        if Path(path).name in WEIGHTS_ONLY:
            payload = {key: value for key, value in payload.items() if key not in RESUME_STATE}
        atomic_torch_save(payload, path)
        os.chmod(path, CHECKPOINT_MODE)


def _gather_objects(value: Any, context: DistributedContext) -> list[Any]:
    if not context.is_distributed:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def training_payload(
    *,
    model: dict[str, Any],
    optimizer: dict[str, Any],
    lr_scheduler: dict[str, Any],
    scaler: dict[str, Any],
    step: int,
    epoch: int,
    best: dict[str, Any],
    config: dict[str, Any],
    classes: list[str],
    batch_plan: dict[str, Any],
) -> dict[str, Any]:
    """A training checkpoint's payload (the RNG state is added by `save_training_checkpoint`):
    state dicts, the step and epoch, the best validation result (also as the official top-level
    `miou`/`fscore`), the resolved config as a plain dict, the class names and the batch plan
    (micro-batch, accumulation, ranks: `--resume` keeps them)."""
    return {
        "format": FORMAT,
        "model": model,
        "optimizer": optimizer,
        "lr_scheduler": lr_scheduler,
        "scaler": scaler,
        "step": step,
        "epoch": epoch,
        "miou": best["miou"],
        "fscore": best["fscore"],
        "best": best,
        "config": config,
        "classes": classes,
        "batch_plan": batch_plan,
    }


def is_training_checkpoint(payload: Any) -> bool:
    """A payload of ours (`FORMAT`), as opposed to an official or backbone checkpoint."""
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def check_resumable(payload: dict[str, Any], path: str | Path) -> None:
    """`--resume` needs the optimizer state, which `best.pt` does not keep."""
    if any(key not in payload for key in RESUME_STATE):
        raise DDESegError(
            f"--resume {path}: holds the weights only (best.pt is written without the optimizer"
            " state); resume from last.pt (--resume latest), or start from these weights with --init"
        )


def restore_training_state(
    payload: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    scaler: Any,
    rank: int,
) -> tuple[int, dict[str, Any]]:
    """Load weights, optimizer, schedule and scaler state, and this rank's RNG state, from a
    training checkpoint; returns its step and best validation result."""
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    lr_scheduler.load_state_dict(payload["lr_scheduler"])
    scaler.load_state_dict(payload["scaler"])
    rng = payload["rng"]
    restore_rng_state(rng[rank] if isinstance(rng, list) else rng)
    return int(payload["step"]), dict(payload["best"])


def stored_config(payload: dict[str, Any]) -> dict[str, Any]:
    """The resolved config a training checkpoint stores (a plain dict; empty if none)."""
    return payload.get("config") or {}


def stored_batch_plan(payload: dict[str, Any]) -> dict[str, Any] | None:
    """The batch plan a training checkpoint stores (None before batch plans)."""
    return payload.get("batch_plan")
