"""What makes a run folder self-describing, and a rerun from it possible.

- `apply_input_options`, `train_inputs`: the shards, memory bank and `--init` checkpoints of
  `ddeseg train`, from its options or else from the paths a config records (`inputs.*`: a rerun
  with `--config RUN_DIR/config.yaml`). Warns (does not fail) when a recorded `--init` file is
  gone (the rerun then starts without it) or a recorded file changed since (fingerprint).
- `record_inputs`: `inputs.*` absolute, and `inputs.fingerprints`, one per input (sha256, or
  size and mtime for files over `HASH_LIMIT`), before RUN_DIR/config.yaml is written.
- `write_run_info`: `RUN_DIR/run.json`, one entry per start (a `--resume` adds one): the command
  line, ddeseg version, git commit of the checkout ddeseg runs from (null when installed from a
  wheel), Python and torch versions, and the start-up table as text.
- `ConsoleCopy`: a plain-text copy of what the run prints (`RUN_DIR/train.log`).
- `check_run_dir`, `clear_run_outputs`: the run folder checks made before any work (not a file;
  an existing run is only continued with `--resume` or replaced with `--overwrite`).
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from rich.console import Console

from ddeseg.config import Config
from ddeseg.errors import DDESegError
from ddeseg.fileio import write_bytes_atomic

HASH_LIMIT = 1 << 30  # files up to 1 GiB are hashed (a MiT-B5 or HTS-AT file: about a second)
RUN_INFO_FILE = "run.json"
LOG_FILE = "train.log"
MANIFEST = "manifest.parquet"  # a shard folder's fingerprint is its manifest's (every sample listed)


def fingerprint(path: str | Path) -> str:
    """"sha256:HEX" of a file up to `HASH_LIMIT` (of `manifest.parquet` for a shard folder),
    "size=BYTES mtime=ISO" of a larger file, "missing" when there is nothing at `path`."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        return "missing"
    stat = path.stat()
    if stat.st_size > HASH_LIMIT:
        mtime = datetime.datetime.fromtimestamp(stat.st_mtime, datetime.timezone.utc).isoformat(timespec="seconds")
        return f"size={stat.st_size} mtime={mtime}"
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def apply_input_options(
    config: Config, shards: Path | None, memory_bank: Path | None, init: Sequence[Path]
) -> list[str]:
    """Each option given replaces the input the config records (`inputs.*`, set absolute); a
    recorded input stays otherwise (a rerun from RUN_DIR/config.yaml). Returns warnings: a
    recorded `--init` file that is gone (left out: the run starts without it), a recorded file
    whose fingerprint changed since."""
    inputs = config.inputs
    warnings: list[str] = []
    if shards is not None:
        inputs.shards = str(Path(shards).resolve())
    if memory_bank is not None:
        inputs.memory_bank = str(Path(memory_bank).resolve())
    if init:
        inputs.init = tuple(str(Path(p).resolve()) for p in init)
    else:
        kept = []
        for stored in inputs.init:
            if Path(stored).is_file():
                kept.append(stored)
            else:
                warnings.append(
                    f"inputs.init {stored} (recorded in the config) is missing: this run starts without it;"
                    " pass --init to give it"
                )
        inputs.init = tuple(kept)
    for path in (inputs.shards, inputs.memory_bank, *inputs.init):
        before = inputs.fingerprints.get(path) if path else None
        if before is not None and before != "missing" and Path(path).exists() and fingerprint(path) != before:
            warnings.append(f"{path} changed since the config recorded it ({before}): this run reads other data")
    return warnings


def train_inputs(config: Config) -> tuple[Path, Path, tuple[Path, ...]]:
    """(shards, memory bank, init checkpoints) of `config.inputs`; `DDESegError` when shards or the
    bank are not named (neither option nor record) or a recorded one does not exist."""
    inputs = config.inputs
    found = []
    for key, option in (("shards", "--shards"), ("memory_bank", "--memory-bank")):
        stored = getattr(inputs, key)
        if stored is None:
            raise DDESegError(f"{option} is required (the config records no inputs.{key})")
        if not Path(stored).exists():
            raise DDESegError(f"inputs.{key} {stored} (recorded in the config) does not exist: pass {option}")
        found.append(Path(stored))
    return found[0], found[1], tuple(Path(p) for p in inputs.init)


def record_inputs(config: Config, shards: Path, memory_bank: Path, init: Sequence[Path]) -> None:
    """`config.inputs`: the run's inputs, absolute, and a fingerprint of each (replacing earlier ones)."""
    inputs = config.inputs
    inputs.shards = str(Path(shards).resolve())
    inputs.memory_bank = str(Path(memory_bank).resolve())
    inputs.init = tuple(str(Path(p).resolve()) for p in init)
    inputs.fingerprints = {path: fingerprint(path) for path in (inputs.shards, inputs.memory_bank, *inputs.init)}


def git_commit(where: Path | None = None) -> str | None:
    """HEAD of the git checkout holding ddeseg's source (`+dirty` with uncommitted changes to
    tracked files); None when ddeseg is not run from a checkout or git is not installed."""
    where = where or Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def write_run_info(out_dir: Path, startup_text: str, resume: bool, argv: Sequence[str] | None = None) -> Path:
    """Add this start to `out_dir/run.json` (a new run starts the list; `--resume` appends)."""
    import torch

    import ddeseg

    path = out_dir / RUN_INFO_FILE
    starts: list[dict[str, Any]] = []
    if resume and path.is_file():
        try:
            starts = list(json.loads(path.read_text()).get("starts", []))
        except (ValueError, AttributeError):
            starts = []  # an unreadable earlier record is not a reason to stop training
    argv = list(sys.argv if argv is None else argv)
    starts.append(
        {
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": [Path(argv[0]).name, *argv[1:]] if argv else [],
            "cwd": str(Path.cwd()),
            "ddeseg_version": ddeseg.__version__,
            "git_commit": git_commit(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "resume": resume,
            "startup_table": startup_text,
        }
    )
    write_bytes_atomic(path, (json.dumps({"starts": starts}, indent=1) + "\n").encode())
    return path


class ConsoleCopy:
    """While active, everything printed on `console` (`ddeseg.progress.console`) is also appended,
    as plain text, to `path`; `text` holds what was copied. Progress-bar refreshes are not prints:
    the copy holds the start-up table, warnings, an interruption and the end summary.

    One copy is active at a time: starting one stops the previous (a run that died of an
    exception before `stop` does not keep copying into its folder)."""

    active: ClassVar[ConsoleCopy | None] = None

    def __init__(self, path: Path, console: Console, width: int = 120) -> None:
        if ConsoleCopy.active is not None:
            ConsoleCopy.active.stop()
        self.path = path
        self.console = console
        self._buffer = io.StringIO()
        self._plain = Console(file=io.StringIO(), width=width, color_system=None, highlight=False, emoji=False, soft_wrap=True)
        self._original = console.print
        console.print = self._print  # type: ignore[method-assign]
        ConsoleCopy.active = self

    @property
    def text(self) -> str:
        return self._buffer.getvalue()

    def _print(self, *objects: Any, **kwargs: Any) -> None:
        self._original(*objects, **kwargs)
        rendered = io.StringIO()
        self._plain.file = rendered
        self._plain.print(*objects, **kwargs)
        self._buffer.write(rendered.getvalue())
        with self.path.open("a") as handle:
            handle.write(rendered.getvalue())

    def stop(self) -> None:
        if self.console.__dict__.get("print") == self._print:
            del self.console.print  # back to the class's method
        if ConsoleCopy.active is self:
            ConsoleCopy.active = None


def check_run_dir(
    out_dir: Path,
    *,
    outputs: Sequence[str] = (),
    resume: bool = False,
    overwrite: bool = False,
) -> None:
    """Refuse, before any work, an `--out` that is a file, and a run folder that already holds
    one of `outputs` unless the user asked to continue (`resume`) or replace (`overwrite`) it."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DDESegError(f"--out {out_dir} is a file, not a run directory: choose a folder path")
    if resume and overwrite:
        raise DDESegError("--resume and --overwrite contradict each other: continue the run or replace it, not both")
    if resume or overwrite:
        return
    found = [name for name in outputs if (out_dir / name).exists()]
    if found:
        raise DDESegError(
            f"--out {out_dir} already holds a run ({', '.join(found)}): continue it with --resume latest,"
            " replace it with --overwrite, or choose another --out"
        )


def clear_run_outputs(out_dir: Path, outputs: Sequence[str]) -> None:
    """Remove a previous run's `outputs` (files or folders) from `out_dir` (`--overwrite`), so
    nothing of it (a stale best.pt, its skipped-sample reports) is mistaken for the new run's."""
    for name in outputs:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


# What only resuming needs. `best.pt` is for evaluating, predicting and `--init`: it is written
# without them (AdamW's two moments are twice the weights: 60 MB -> about 20 MB for the demo
# model); `last.pt` keeps them for `--resume`.
