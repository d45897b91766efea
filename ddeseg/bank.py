"""Reading an audio memory bank (`bank.npy` of `ddeseg build-memory-bank`): the one reader.

The writer is `ddeseg.pipelines.build_memory_bank`; train, evaluate and predict all read through
`read_memory_bank`, so a bank that does not fit the task or the model fails the same way
everywhere: one line naming the file and what to do, before any work starts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ddeseg.errors import DataError

NPY_MAGIC = b"\x93NUMPY"
BUILD_HINT = "build one with `ddeseg build-memory-bank --shards SHARDS_DIR --task TASK --out BANK_DIR`"


def read_memory_bank(
    path: str | Path,
    *,
    classes: int | None = None,
    embed_dim: int | None = None,
    task: str | None = None,
) -> np.ndarray:
    """Read and check `bank.npy`: float32 `[classes, k, embed_dim]` with `k >= 1`, finite values.

    Args:
        path: the `.npy` file.
        classes: rows the task needs (its bank classes, background included); None = not checked.
        embed_dim: the model's audio embedding size; None = not checked.
        task: named in the message when `classes` does not match.

    Raises `DataError` (one line, naming the file) for a missing, unreadable, pickled,
    non-float, empty or mis-shaped bank.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"memory bank not found: {path} ({BUILD_HINT})")
    with path.open("rb") as file:
        magic = file.read(len(NPY_MAGIC))
    if magic != NPY_MAGIC:
        # numpy would otherwise call any non-.npy file "pickled data", which misleads.
        raise DataError(f"{path}: not a readable .npy file (no .npy header); {BUILD_HINT}")
    try:
        bank = np.load(path, allow_pickle=False)
    except ValueError as error:
        if "allow_pickle" in str(error):  # an object array: its pickles are never loaded
            raise DataError(f"{path}: not a memory bank (an object/pickled .npy, never loaded); {BUILD_HINT}") from error
        raise DataError(f"{path}: not a readable .npy file ({error}); {BUILD_HINT}") from error
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: not a readable .npy file ({error}); {BUILD_HINT}") from error
    if not np.issubdtype(bank.dtype, np.floating):
        raise DataError(f"{path}: memory bank has dtype {bank.dtype}, expected float32; {BUILD_HINT}")
    if bank.ndim != 3 or 0 in bank.shape:
        raise DataError(f"{path}: memory bank has shape {bank.shape}, expected [classes, k >= 1, dim]; {BUILD_HINT}")
    if classes is not None and bank.shape[0] != classes:
        for_task = f" task {task}" if task else " the task"
        raise DataError(
            f"{path}: memory bank has {bank.shape[0]} classes, but{for_task} needs {classes}; {BUILD_HINT}"
        )
    if embed_dim is not None and bank.shape[2] != embed_dim:
        raise DataError(
            f"{path}: memory bank embeddings have {bank.shape[2]} dims, the model's audio embedding has {embed_dim};"
            f" {BUILD_HINT} with this model's audio backbone"
        )
    if not np.isfinite(bank).all():
        raise DataError(f"{path}: memory bank contains NaN or infinite values; {BUILD_HINT}")
    return bank.astype(np.float32, copy=False)
