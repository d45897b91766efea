"""WebDataset shards: planning, deterministic writing and resume state (`ddeseg inspect` reads
them back: `ddeseg.pipelines.inspect`).

Reading a prepared folder back goes through `ddeseg.data.shards.ShardIndex` (files) and
`ddeseg.data.stream.read_shard_samples` (tars).

Layout of a prepared directory (see ../shared/CLI.md and `ddeseg.data.schema`):

    SHARDS_DIR/{task}/{split}/shard-000000.tar   samples (members in `ddeseg.data.schema`)
    SHARDS_DIR/.prepare/{task}/{split}/shard-000000.json
        resume state of that shard: the fingerprint of its inputs, the tar's size and sha256,
        its manifest rows and its rejects. A shard counts as finished only when this file
        matches the tar on disk and the fingerprint of the planned inputs.

Planning is what makes the output independent of the number of workers: the frames of each
task and split are sorted by (video, frame) and cut into consecutive chunks of
`samples_per_shard`; each chunk is one shard, written by one job. A chunk whose frames are
rejected simply holds fewer samples (a chunk with none writes no tar).

Tars are written with fixed headers (mtime 0, owner `ddeseg`, mode 0444) so the same samples give
the same bytes, to a hidden temporary name that is renamed when complete: an interrupted run
leaves no half shard.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ddeseg.data.schema import SHARD_NAME
from ddeseg.fileio import atomic_file, write_bytes_atomic
from ddeseg.pipelines.records import FrameRef

STATE_DIR = ".prepare"
TAR_OWNER = "ddeseg"
TAR_MTIME = 0


@dataclass
class ShardJob:
    task: str
    split: str
    index: int
    refs: list[FrameRef]

    @property
    def name(self) -> str:
        """Path of the tar relative to the output directory."""
        return f"{self.task}/{self.split}/{SHARD_NAME.format(index=self.index)}"

    @property
    def state_name(self) -> str:
        return f"{STATE_DIR}/{self.name[: -len('.tar')]}.json"


def plan_shards(refs: list[FrameRef], samples_per_shard: int) -> list[ShardJob]:
    """Group by (task, split), sort by (video, frame), cut into shards of `samples_per_shard`."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    groups: dict[tuple[str, str], list[FrameRef]] = {}
    for ref in refs:
        groups.setdefault((ref.task, ref.split), []).append(ref)
    jobs = []
    for (task, split), members in sorted(groups.items()):
        members.sort(key=lambda ref: ref.sort_key)
        for index, start in enumerate(range(0, len(members), samples_per_shard)):
            jobs.append(ShardJob(task, split, index, members[start : start + samples_per_shard]))
    return jobs


def _file_stat(root: Path, relative_path: str) -> list[int] | None:
    try:
        stat = (root / relative_path).stat()
    except (OSError, ValueError):
        return None
    return [stat.st_size, stat.st_mtime_ns]


def fingerprint(job: ShardJob, root: Path, settings: dict[str, Any]) -> str:
    """sha256 of everything a shard's bytes depend on: the settings, each frame's reference and
    the size and mtime of every file it reads (so an edited raw file rebuilds its shard)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for ref in job.refs:
        stats = {path: _file_stat(root, path) for path in ref.paths()}
        digest.update(json.dumps([asdict(ref), stats], sort_keys=True).encode())
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_tar(path: Path, samples: list[dict[str, Any]]) -> tuple[str, int]:
    """Write samples (`{"__key__": key, member: bytes, ...}`) to `path` atomically.

    Returns the tar's sha256 and size in bytes."""
    from webdataset import TarWriter  # imports torch: only the writing (main) process needs it

    with atomic_file(path) as handle:
        writer = TarWriter(handle, user=TAR_OWNER, group=TAR_OWNER, mode=0o444, encoder=False, mtime=TAR_MTIME)
        for sample in samples:
            writer.write(sample)
        writer.close()
    return sha256_file(path), path.stat().st_size


def load_state(out: Path, job: ShardJob) -> dict[str, Any] | None:
    path = out / job.state_name
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def save_state(out: Path, job: ShardJob, state: dict[str, Any]) -> None:
    write_bytes_atomic(out / job.state_name, json.dumps(state, sort_keys=True).encode())


def is_finished(out: Path, job: ShardJob, job_fingerprint: str) -> dict[str, Any] | None:
    """The shard's state when its tar is complete and was made from the same inputs, else None."""
    state = load_state(out, job)
    if state is None or state.get("fingerprint") != job_fingerprint:
        return None
    tar_path = out / job.name
    if state.get("tar") is None:
        return None if tar_path.exists() else state
    if not tar_path.is_file() or tar_path.stat().st_size != state.get("size"):
        return None
    if sha256_file(tar_path) != state.get("sha256"):
        return None
    return state


def remove_stale(out: Path, jobs: list[ShardJob], task_dirs: tuple[str, ...], splits: tuple[str, ...]) -> int:
    """Delete shards, states and temporary files of ours that the plan does not contain."""
    planned = {job.name for job in jobs} | {job.state_name for job in jobs}
    removed = 0
    for base in (out, out / STATE_DIR):
        for task in task_dirs:
            for split in splits:
                folder = base / task / split
                if not folder.is_dir():
                    continue
                for path in sorted(folder.iterdir()):
                    name = path.relative_to(out).as_posix()
                    ours = path.name.startswith("shard-") and path.suffix in (".tar", ".json")
                    temporary = path.name.startswith(".shard-") and path.name.endswith(".tmp")  # fileio.atomic_file's
                    if temporary or (ours and name not in planned):
                        path.unlink()
                        removed += 1
    return removed
