"""Where the tests find the official reference fixtures (`../shared/reference/` of the repository).

`DDESEG_REFERENCE_DIR` overrides the location (e.g. a git worktree whose parent has no `shared/`).
A clone without the fixtures skips the tests that need them, naming the missing file; the
project's CI has them, so there they always run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REFERENCE = Path(
    os.environ.get("DDESEG_REFERENCE_DIR") or Path(__file__).resolve().parents[2] / "shared" / "reference"
)


def reference_file(name: str) -> Path:
    """The path of fixture `name`; skips the calling test when it is absent."""
    path = REFERENCE / name
    if not path.is_file():
        pytest.skip(
            f"reference fixture {path} is absent (the official fixtures live in ../shared/reference/ "
            "of the repository; set DDESEG_REFERENCE_DIR to their folder)"
        )
    return path
