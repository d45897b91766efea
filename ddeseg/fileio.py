"""Writing a folder so that a failure never leaves half of it under its final name."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def building_directory(final: Path, suffix: str = ".partial") -> Iterator[Path]:
    """Yield a fresh, empty temporary sibling of `final` to write into. When the block succeeds
    the temporary folder replaces `final` (an existing `final` is removed first); when it raises,
    the temporary folder is deleted and `final` is left as it was."""
    final = Path(final)
    temporary = final.parent / f".{final.name}{suffix}"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    temporary.rename(final)
