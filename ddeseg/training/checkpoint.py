"""Training checkpoints: atomic writes, and loading with `torch.load(weights_only=True)`.

A ddeseg training checkpoint is a superset of the official one, so the official code's
`checkpoint['model']` still finds the weights:

    {'format': 'ddeseg-train-1', 'model': state_dict (memory bank included), 'optimizer',
     'lr_scheduler', 'scaler', 'step', 'epoch', 'miou', 'fscore', 'config': plain dict,
     'classes': [names], 'rng': {...}, 'best': {...}}

Everything in it is a tensor or a plain Python container, so it loads with
`weights_only=True` (no pickled objects; a checkpoint from someone else cannot run code).
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddeseg.errors import CheckpointError
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
