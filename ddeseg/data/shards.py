"""The one reader of a prepared shard folder (what `ddeseg prepare` wrote), and the task protocol.

    SHARDS_DIR/manifest.parquet       one row per sample (key, task, split, ..., shard)
    SHARDS_DIR/classes.json           the unified class list (index = class id, 0 = background)
                                      and, per task, its protocol (binary, num_classes, reads, ids)
    SHARDS_DIR/prepare.json           the run's report; `frontend` names the log-mels' filterbank
    SHARDS_DIR/rejects.jsonl          one line per rejected raw frame
    SHARDS_DIR/{task}/{split}/shard-*.tar

Every consumer (train and eval loaders, pretrain-audio, the memory bank, evaluate, inspect,
predict's `--classes`) reads these files through `ShardIndex` or the functions below; the tars
themselves are read by one path, `ddeseg.data.stream.read_shard_samples`. A missing, empty or
truncated file is one `DataError` naming it and what to do.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ddeseg.data.schema import (
    CLASSES_FILE,
    IGNORE_INDEX,
    MANIFEST_FILE,
    PREPARE_FILE,
    REJECTS_FILE,
)
from ddeseg.errors import DataError, DDESegError

REPREPARE = "re-run `ddeseg prepare` for this folder"


# --------------------------------------------------------------------------------------------
# classes.json: parsing and the task protocol
# --------------------------------------------------------------------------------------------


def read_classes_file(path: str | Path, allow_name_list: bool = False) -> dict[str, Any] | list[str]:
    """Parse a `classes.json`: `{"names": [...], "tasks": {task: protocol}, ...}`.

    A plain JSON list of names (an early prepare's form, or predict's `--classes names.json`)
    becomes `{"names": list}`, or stays a list when `allow_name_list` (predict reads it as the
    model's own class names). Raises `DataError` naming the file when it is missing, not JSON
    (e.g. cut short), or of another shape.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DataError(f"{path} is missing; {REPREPARE} (or pass the folder it wrote)") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path} cannot be read ({error}); {REPREPARE}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno} column {error.colno}): "
            f"it is empty or was cut short; {REPREPARE}"
        ) from None
    if isinstance(data, list) and all(isinstance(name, str) for name in data):
        return list(data) if allow_name_list else {"names": list(data)}
    names = data.get("names") if isinstance(data, dict) else None
    tasks = data.get("tasks", {}) if isinstance(data, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not isinstance(tasks, dict):
        raise DataError(
            f"{path} is not a class list of `ddeseg prepare` (expected an object with a \"names\" list"
            f" and a \"tasks\" object{' or a JSON list of names' if allow_name_list else ''}); {REPREPARE}"
        )
    return data


def task_protocol(classes_doc: Mapping[str, Any], task: str, where: str = CLASSES_FILE) -> dict[str, Any]:
    """`classes.json`'s entry for `task`: `binary`, `num_classes`, `reads`, `ids`."""
    protocols = classes_doc.get("tasks") or {}
    if task not in protocols:
        raise DataError(f"task {task!r} is not in {where} (tasks: {sorted(protocols) or 'none'})")
    return dict(protocols[task])


def task_class_names(classes_doc: Mapping[str, Any], task: str) -> list[str]:
    """Names of `task`'s classes by task id, from `classes.json` (binary: background, foreground)."""
    protocol = task_protocol(classes_doc, task)
    if protocol["binary"]:
        return [classes_doc["names"][0], "foreground"]
    return [classes_doc["names"][unified] for unified in protocol["ids"]]


def task_label_lut(classes_doc: Mapping[str, Any], task: str) -> np.ndarray:
    """uint8 `[256]` lookup from unified mask ids (`classes.json`) to the training ids of `task`.

    Binary tasks (v1s, v1m): background 0, every class 1. Multi-class tasks: position in
    `classes["tasks"][task]["ids"]`. `IGNORE_INDEX` stays `IGNORE_INDEX`; a unified id that the
    task does not have also maps to `IGNORE_INDEX`. Use as `lut[mask]`.
    """
    protocol = task_protocol(classes_doc, task)
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    if protocol["binary"]:
        lut[: len(classes_doc["names"])] = 1
        lut[0] = 0
    else:
        for local_id, unified_id in enumerate(protocol["ids"]):
            lut[unified_id] = local_id
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut


def model_label_lut(lut: np.ndarray, num_classes: int) -> np.ndarray:
    """`lut` for a model with `num_classes` outputs: one output (v1s/v1m) maps every class to 1."""
    if num_classes == 1:
        lut = np.where((lut == 0) | (lut == IGNORE_INDEX), lut, 1).astype(np.uint8)
    return lut


def bank_class_ids(classes_doc: Mapping[str, Any], task: str) -> list[int]:
    """Unified class ids of the bank rows of `task` (background first), from `classes.json`."""
    ids = task_protocol(classes_doc, task).get("ids")
    if ids is not None:
        return [int(i) for i in ids]
    # Binary protocols (v1s, v1m) have no ids: their bank is the AVSS one, like the official
    # `1s_k5_feabank.npy` of shape [71, 5, 768].
    return list(range(int(classes_doc.get("avss_classes", len(classes_doc["names"])))))


def read_prepare_report(shards_dir: str | Path) -> dict[str, Any]:
    """`prepare.json` of a prepared folder; `{}` when it is missing or unreadable (older folders
    and bare shard folders have none; what it records is optional to every reader)."""
    try:
        report = json.loads((Path(shards_dir) / PREPARE_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return report if isinstance(report, dict) else {}


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
    recorded = read_prepare_report(root).get("frontend")
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
    """A prepared folder: its manifest, class list, task protocols, shard lists and samples.

    Construction reads and checks `manifest.parquet` (unless `need_manifest=False`, for bare
    shard folders such as the memory bank accepts), `classes.json` is read at the first question
    about classes or tasks; either way a missing or broken file is one `DataError` naming it,
    raised before the stage reads any sample.
    """

    def __init__(self, shards_dir: str | Path, need_manifest: bool = True) -> None:
        self.root = Path(shards_dir)
        self._manifest: pa.Table | None = None
        if need_manifest:
            self._manifest = self._read_manifest()

    @cached_property
    def classes(self) -> dict[str, Any]:
        """`classes.json`, parsed and checked (`read_classes_file`) on first use."""
        return read_classes_file(self.root / CLASSES_FILE)  # type: ignore[return-value]

    # -- manifest ---------------------------------------------------------------------------

    def _read_manifest(self) -> pa.Table:
        path = self.root / MANIFEST_FILE
        if not path.is_file():
            raise DataError(
                f"{self.root} is not a prepared shard directory (no {MANIFEST_FILE}); run `ddeseg prepare` first"
            )
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise DataError(f"{path} cannot be read as Parquet ({reason}): it is empty or was cut short; {REPREPARE}") from None
        missing = [column for column in ("task", "split") if column not in table.column_names]
        if missing:
            raise DataError(f"{path} has no column(s) {missing}: not a manifest of `ddeseg prepare`; {REPREPARE}")
        return table

    @property
    def has_manifest(self) -> bool:
        return self._manifest is not None or (self.root / MANIFEST_FILE).is_file()

    @property
    def manifest(self) -> pa.Table:
        """The manifest as a pyarrow Table."""
        if self._manifest is None:
            self._manifest = self._read_manifest()
        return self._manifest

    def manifest_rows(self, columns: list[str]) -> list[dict[str, Any]]:
        """The manifest's `columns` as one dict per row."""
        return self.manifest.select(columns).to_pylist()

    # -- classes and protocols ---------------------------------------------------------------

    def class_names(self) -> list[str]:
        """The unified class names by unified id."""
        return list(self.classes["names"])

    def protocol(self, task: str) -> dict:
        """`classes.json`'s entry for a task: `binary`, `num_classes`, `reads`, `ids`."""
        if task not in (self.classes.get("tasks") or {}):
            prepared = self.tasks() if self._manifest is not None else sorted(self.classes.get("tasks") or {})
            raise DataError(f"task {task!r} was not prepared in {self.root} (tasks: {prepared})")
        return task_protocol(self.classes, task)

    def reads(self, task: str) -> list[str]:
        """The shard folders a task's protocol reads (`v2` reads `v1s`, `v1m` and `v2`)."""
        return list(self.protocol(task).get("reads") or [task])

    def num_outputs(self, task: str) -> int:
        """Output classes of a model for `task`: 1 for a binary task, else its class count."""
        protocol = self.protocol(task)
        return 1 if protocol["binary"] else int(protocol["num_classes"])

    def task_class_names(self, task: str) -> list[str]:
        """Names by task id (binary: background, foreground)."""
        self.protocol(task)
        return task_class_names(self.classes, task)

    def label_lut(self, task: str, num_classes: int | None = None) -> np.ndarray:
        """uint8 `[256]` map from the stored (unified) mask ids to `task`'s ids; with
        `num_classes == 1` every class maps to 1 (see `task_label_lut`, `model_label_lut`)."""
        self.protocol(task)
        lut = task_label_lut(self.classes, task)
        return lut if num_classes is None else model_label_lut(lut, num_classes)

    def bank_class_ids(self, task: str) -> list[int]:
        """Unified class ids of the memory bank rows of `task` (see `bank_class_ids`)."""
        self.protocol(task)
        return bank_class_ids(self.classes, task)

    # -- shard lists -------------------------------------------------------------------------

    def tasks(self) -> list[str]:
        return sorted(set(self.manifest.column("task").to_pylist()))

    def splits(self, task: str) -> list[str]:
        import pyarrow.compute as pc

        rows = self.manifest.filter(pc.equal(self.manifest.column("task"), task))
        return sorted(set(rows.column("split").to_pylist()))

    def has_split(self, task: str, split: str) -> bool:
        return any(any((self.root / folder / split).glob("shard-*.tar")) for folder in self.reads(task))

    def shards(self, task: str, split: str, by_folder: bool = False) -> list[str]:
        """Sorted shard paths of one task and split (over every folder the task reads); a clear
        error when there are none. `by_folder`: each folder's sorted shards in the order of the
        protocol's `reads` (the order the memory bank's embeddings cache records)."""
        folders = [sorted(str(p) for p in (self.root / folder / split).glob("shard-*.tar")) for folder in self.reads(task)]
        paths = [path for folder in folders for path in folder] if by_folder else sorted(sum(folders, []))
        if not paths:
            if self._manifest is None:
                looked = ", ".join(str(self.root / folder / split) for folder in self.reads(task))
                raise DataError(f"no shards (shard-*.tar) for task {task!r} split {split!r} in {looked}")
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

    # -- samples and reports -----------------------------------------------------------------

    def shard_of(self, key: str) -> str:
        """The shard (relative to the folder) that holds sample `key`, from the manifest (the
        sample itself: `ddeseg.data.stream.find_sample`)."""
        import pyarrow.compute as pc

        rows = self.manifest.filter(pc.equal(self.manifest.column("key"), key)).select(["shard"]).to_pylist()
        if not rows:
            raise DataError(f"no sample {key!r} in {self.root / MANIFEST_FILE}")
        return rows[0]["shard"]

    def prepare_report(self) -> dict[str, Any]:
        """`prepare.json` (`{}` when absent), see `read_prepare_report`."""
        return read_prepare_report(self.root)

    def sample_rate(self, default: int = 22050) -> int:
        """The audio rate of the stored `audio.npy`, from `prepare.json`'s config."""
        frontend = self.prepare_report().get("config", {}).get("model", {}).get("frontend", {})
        return int(frontend.get("sample_rate", default))

    def rejects(self) -> list[dict[str, Any]]:
        """The lines of `rejects.jsonl` (none when it is absent)."""
        path = self.root / REJECTS_FILE
        if not path.is_file():
            return []
        records = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{path}: line {number} is not JSON; {REPREPARE}") from None
        return records

    def check_frontend(self, model: Any, checkpoint: str | Path | None = None) -> None:
        """`check_frontend(self.root, model, checkpoint)`: see that function."""
        check_frontend(self.root, model, checkpoint)
