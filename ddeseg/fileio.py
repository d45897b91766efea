"""Writing files and folders so that a failure (a crash, a signal, a full disk) never leaves half
of one under its final name, and a full disk is one clear line, not a traceback."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from ddeseg.errors import DDESegError

# errno values that mean "no room left": the disk (ENOSPC) or the user's quota (EDQUOT).
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


class DiskFullError(DDESegError):
    """A write ran out of disk space; the files written before it are intact."""


def free_bytes(folder: Path) -> int | None:
    """Free bytes on the file system of `folder` (or of its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def human_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024  # type: ignore[assignment]
    return f"{count} B"


def disk_full_error(folder: Path, needed_bytes: int | None = None, what: str = "") -> DiskFullError:
    """The one-line error for a full disk: the folder, the bytes needed (when known) and free."""
    free = free_bytes(folder)
    parts = [f"disk full writing {what + ' in ' if what else ''}{folder}"]
    if needed_bytes is not None:
        parts.append(f"needs {human_bytes(needed_bytes)}")
    if free is not None:
        parts.append(f"{human_bytes(free)} free")
    return DiskFullError(
        ", ".join(parts) + "; the files written before are intact: free space and run the same command again"
        " (a training run continues with --resume latest)"
    )


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS


@contextmanager
def reporting_disk_full(folder: Path, what: str = "") -> Iterator[None]:
    """Turn an `OSError` for a full disk raised in the block into a `DiskFullError` (one line,
    exit status 2) naming the folder written to. Other errors pass unchanged."""
    try:
        yield
    except OSError as error:
        if not is_disk_full(error):
            raise
        where = Path(error.filename).parent if isinstance(error.filename, str) else Path(folder)
        raise disk_full_error(where, what=what) from None


@contextmanager
def atomic_file(path: Path, needed_bytes: int | None = None) -> Iterator[BinaryIO]:
    """A hidden temporary file beside `path` to write into; when the block ends it is flushed to
    the disk and renamed over `path`: a reader (or a crash, SIGKILL included) sees the old file
    or the new one, never part of one. When the block fails the temporary file is removed (a full
    disk is not left fuller) and `path` is untouched; a full disk raises `DiskFullError` naming
    the folder (and `needed_bytes`, when known)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if is_disk_full(error):
            raise disk_full_error(path.parent, needed_bytes, what=path.name) from None
        raise


def write_bytes_atomic(path: Path, data: bytes | memoryview) -> None:
    """`data` into `path` through `atomic_file`."""
    with atomic_file(path, len(data)) as handle:
        handle.write(data)


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
