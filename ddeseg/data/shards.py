"""Reader-side view of a prepared shard directory (what `ddeseg prepare` wrote).

    SHARDS_DIR/manifest.parquet       one row per sample (key, task, split, ..., shard)
    SHARDS_DIR/classes.json           the unified class list (index = class id, 0 = background)
    SHARDS_DIR/{task}/{split}/shard-*.tar
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ddeseg.errors import DataError


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
