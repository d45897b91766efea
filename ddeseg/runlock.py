"""One writer per output folder: `prepare`, `build-memory-bank` and `train` hold a lock file in
the folder they write, so a second command started into it refuses at once instead of
interleaving its files with the first one's.

    FOLDER/.ddeseg.lock    {"pid", "host", "started" (UTC), "command", "process_start"}

The lock is created with O_CREAT|O_EXCL (atomic on local file systems and NFSv3+). A lock whose
holder is gone (same host, and its pid no longer runs, or runs another program: the pid's start
time differs) is taken over with a warning: a SIGKILLed run leaves its lock behind, and the next
run must not need a manual clean-up. A lock held from another host cannot be checked from here:
it is refused, and the message says which file to delete if that run is known to be dead.
Readers (`evaluate`, `inspect`) take no lock: checkpoints and shards are replaced atomically, so
they always read a complete file.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ddeseg.errors import DDESegError

LOCK_FILE = ".ddeseg.lock"


class FolderLockedError(DDESegError):
    """Another live process writes into the folder."""


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux), or None if unknown:
    with it a pid reused by another program after the holder died is not taken for the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    return stat.rsplit(")", 1)[1].split()[19]


def _is_running(pid: int, process_start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    if process_start is None:
        return True
    now = _process_start(pid)
    return now is None or now == process_start


def describe_holder(holder: dict[str, Any]) -> str:
    return (
        f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
        f" ({holder.get('command') or 'unknown command'})"
    )


def read_lock(folder: Path) -> dict[str, Any] | None:
    """The holder recorded in `folder`'s lock, None when there is no lock."""
    try:
        text = (Path(folder) / LOCK_FILE).read_text()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        holder = {}
    return holder if isinstance(holder, dict) else {}


def _try_create(path: Path, record: dict[str, Any]) -> bool:
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w") as handle:
        json.dump(record, handle)
        handle.flush()
        os.fsync(handle.fileno())
    return True


def acquire(folder: Path, command: str) -> dict[str, Any]:
    """Take `folder`'s lock for this process (creating the folder); returns the lock record.
    Raises `FolderLockedError` naming the holder when a live process holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    pid = os.getpid()
    record = {
        "pid": pid,
        "host": socket.gethostname(),
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": command,
        "process_start": _process_start(pid),
    }
    for _attempt in range(5):
        if _try_create(path, record):
            return record
        holder = read_lock(folder)
        if holder is None:
            continue  # released between our two calls: try again
        if not holder:
            # created but not yet written by its holder (the write follows the create at once)
            time.sleep(0.2)
            holder = read_lock(folder)
            if holder is None:
                continue
            if not holder:
                raise FolderLockedError(f"{folder} is locked by {path} (unreadable): if no ddeseg command writes there, delete {path}")
        if holder.get("host") != record["host"]:
            raise FolderLockedError(
                f"{folder} is being written by {describe_holder(holder)}: wait for it, or choose another output folder"
                f" (if that run is dead, delete {path})"
            )
        if holder.get("pid") == pid or _is_running(int(holder.get("pid", -1)), holder.get("process_start")):
            raise FolderLockedError(
                f"{folder} is being written by {describe_holder(holder)}: wait for it to finish, stop it,"
                " or choose another output folder"
            )
        # The holder is dead (SIGKILL, a crash, a lost node): take its lock over. Renaming it away
        # first means that of two processes taking over at once only one removes it.
        stale = path.with_name(f"{LOCK_FILE}.stale-{pid}")
        try:
            os.rename(path, stale)
        except FileNotFoundError:
            continue
        stale.unlink(missing_ok=True)
        print(
            f"warning: {folder}: taking over the lock of a process that is gone ({describe_holder(holder)});"
            " its partial outputs are replaced or resumed as usual",
            file=sys.stderr,
        )
    raise FolderLockedError(f"{folder}: could not take the lock {path} (other processes keep taking it); try again")


def release(folder: Path, record: dict[str, Any]) -> None:
    """Remove `folder`'s lock if it is still `record`'s (never another process's)."""
    holder = read_lock(folder)
    if holder and holder.get("pid") == record["pid"] and holder.get("started") == record["started"]:
        (Path(folder) / LOCK_FILE).unlink(missing_ok=True)


@contextmanager
def writer_lock(folder: Path, command: str, enabled: bool = True) -> Iterator[None]:
    """Hold `folder`'s lock for the block (`enabled` False: a no-op, e.g. on ranks other than
    0). A folder the lock had to create and that is still empty afterwards is removed again, so a
    run refused on bad input leaves nothing behind."""
    if not enabled:
        yield
        return
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        yield  # not a folder: the stage's own check refuses it, with its own message
        return
    created = not folder.exists()
    record = acquire(folder, command)
    try:
        yield
    finally:
        release(folder, record)
        if created:
            try:
                folder.rmdir()  # only when empty
            except OSError:
                pass
