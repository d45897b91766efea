"""Reader-side view of a prepared shard directory (what `ddeseg prepare` wrote).

    SHARDS_DIR/manifest.parquet       one row per sample (key, task, split, ..., shard)
    SHARDS_DIR/classes.json           the unified class list (index = class id, 0 = background)
    SHARDS_DIR/prepare.json           the run's report; `frontend` names the log-mels' filterbank
    SHARDS_DIR/{task}/{split}/shard-*.tar
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ddeseg.data.schema import PREPARE_FILE
from ddeseg.errors import DataError, DDESegError


def bank_class_ids(classes_doc: Mapping[str, Any], task: str) -> list[int]:
    """Unified class ids of the bank rows of `task` (background first), from `classes.json`."""
    protocols = classes_doc.get("tasks") or {}
    if task not in protocols:
        raise DataError(f"task {task!r} is not in classes.json (tasks: {sorted(protocols) or 'none'})")
    ids = protocols[task].get("ids")
    if ids is not None:
        return [int(i) for i in ids]
    # Binary protocols (v1s, v1m) have no ids: their bank is the AVSS one, like the official
    # `1s_k5_feabank.npy` of shape [71, 5, 768].
    return list(range(int(classes_doc.get("avss_classes", len(classes_doc["names"])))))


def check_frontend(shards_dir: str | Path, model: Any, checkpoint: str | Path | None = None) -> None:
    """Raise `DDESegError` when the model's mel filterbank is not the one the stored log-mels
    were made with (`prepare.json`'s `frontend.filterbank_sha256`).

    Call it after every checkpoint is loaded into the model and before it reads a log-mel:
    loading an HTS-AT or full checkpoint replaces the filterbank (`load_checkpoint`). Needs only
    `prepare.json` (no manifest), so stages that read bare shard folders can call it too.

    Args:
        shards_dir: a folder written by `ddeseg prepare`.
        model: a `DDESeg` (its `audio_model.logmel_extractor.melW` is compared), or its audio
            backbone alone.
        checkpoint: the checkpoint the model was initialised from, named in the message.
    Shards prepared before `prepare.json` recorded the front end (or without one) only get a warning.
    """
    from ddeseg.models.frontend import filterbank_fingerprint

    root = Path(shards_dir)
    try:
        report = json.loads((root / PREPARE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        report = {}
    recorded = report.get("frontend") if isinstance(report, dict) else None
    if not isinstance(recorded, dict) or "filterbank_sha256" not in recorded:
        warnings.warn(
            f"{root / PREPARE_FILE} does not record the mel filterbank of its log-mels (prepared by an "
            "older ddeseg): if the model loads an HTS-AT or official checkpoint, re-run `ddeseg prepare "
            "--audio-checkpoint` with it, or the model may see log-mels of another filterbank",
            stacklevel=2,
        )
        return
    audio_model = getattr(model, "audio_model", model)
    actual = filterbank_fingerprint(audio_model.logmel_extractor.melW)
    expected = recorded["filterbank_sha256"]
    if actual == expected:
        return
    source = recorded.get("source", "config")
    made_with = "the config's filterbank" if source == "config" else f"the filterbank of {source}"
    if checkpoint is not None:
        fix = (
            f"re-run `ddeseg prepare ... --audio-checkpoint {checkpoint}` (it rebuilds the shards), "
            f"or do not initialise the model from {checkpoint}"
        )
    elif source != "config":
        fix = (
            f"initialise the model from {source} (e.g. `--init {source}`) "
            "or re-run `ddeseg prepare` without --audio-checkpoint"
        )
    else:
        fix = (
            "re-run `ddeseg prepare` with the model's config, and `--audio-checkpoint CKPT` when the model "
            "loads an HTS-AT or official checkpoint CKPT"
        )
    raise DDESegError(
        f"{root}: its log-mels were made with {made_with} (sha256 {expected[:12]}) but the model's mel "
        f"filterbank differs (sha256 {actual[:12]}), so it would read log-mels of another filterbank; {fix}"
    )


class ShardIndex:
    def __init__(self, shards_dir: str | Path) -> None:
        self.root = Path(shards_dir)
        if not (self.root / "manifest.parquet").is_file():
            raise DataError(
                f"{self.root} is not a prepared shard directory (no manifest.parquet); run `ddeseg prepare` first"
            )

    @cached_property
    def manifest(self):
        """The manifest as a pyarrow Table."""
        return pq.read_table(self.root / "manifest.parquet")

    @cached_property
    def _classes(self) -> dict:
        path = self.root / "classes.json"
        if not path.is_file():
            raise DataError(f"{path} is missing; re-run `ddeseg prepare`")
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {"names": data}

    def check_frontend(self, model: Any, checkpoint: str | Path | None = None) -> None:
        """`check_frontend(self.root, model, checkpoint)`: see that function."""
        check_frontend(self.root, model, checkpoint)

    def bank_class_ids(self, task: str) -> list[int]:
        """Unified class ids of the memory bank rows of `task` (see `bank_class_ids`)."""
        return bank_class_ids(self._classes, task)

    def class_names(self) -> list[str]:
        return list(self._classes["names"])

    def tasks(self) -> list[str]:
        return sorted(set(self.manifest.column("task").to_pylist()))

    def splits(self, task: str) -> list[str]:
        rows = self.manifest.filter(self._task_mask(task))
        return sorted(set(rows.column("split").to_pylist()))

    def reads(self, task: str) -> list[str]:
        """The shard folders a task's protocol reads (`v2` reads `v1s`, `v1m` and `v2`)."""
        protocol = self._classes.get("tasks", {}).get(task)
        if protocol is None:
            raise DataError(f"task {task!r} was not prepared in {self.root} (tasks: {self.tasks()})")
        return list(protocol.get("reads") or [task])

    def protocol(self, task: str) -> dict:
        """`classes.json`'s entry for a task: `binary`, `num_classes`, `reads`, `ids`."""
        self.reads(task)
        return dict(self._classes["tasks"][task])

    def has_split(self, task: str, split: str) -> bool:
        return any(any((self.root / folder / split).glob("shard-*.tar")) for folder in self.reads(task))

    def shards(self, task: str, split: str) -> list[str]:
        """Sorted shard paths of one task and split (over every folder the task reads); a clear
        error when there are none."""
        paths = sorted(
            str(p) for folder in self.reads(task) for p in (self.root / folder / split).glob("shard-*.tar")
        )
        if not paths:
            available = ", ".join(f"{t}/{s}" for t in self.tasks() for s in self.splits(t)) or "none"
            raise DataError(f"no shards for task {task!r} split {split!r} in {self.root} (available: {available})")
        return paths

    def count(self, task: str, split: str, annotated_only: bool = False) -> int:
        import pyarrow.compute as pc

        mask = pc.and_(
            pc.is_in(self.manifest.column("task"), value_set=pa.array(self.reads(task))),
            pc.equal(self.manifest.column("split"), split),
        )
        if annotated_only and "annotated" in self.manifest.column_names:
            mask = pc.and_(mask, self.manifest.column("annotated"))
        return int(pc.sum(mask.cast("int64")).as_py() or 0)

    def _task_mask(self, task: str):
        import pyarrow.compute as pc

        return pc.equal(self.manifest.column("task"), task)
