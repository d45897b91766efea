"""The `prepare` stage: a raw dataset layout on disk -> unified WebDataset shards on disk.

    SHARDS_DIR/{task}/{split}/shard-%06d.tar   samples (`ddeseg.data.schema`)
    SHARDS_DIR/manifest.parquet                 one row per sample
    SHARDS_DIR/classes.json                     unified class list + task protocols
    SHARDS_DIR/prepare.json                     resolved config, front end, counts, rejects, versions, time
    SHARDS_DIR/rejects.jsonl                    one line per rejected frame or row (empty if none)
    SHARDS_DIR/config.yaml                      the resolved config of the last run (`ddeseg.stage`)
    SHARDS_DIR/bbox/*_bbox_orisize.json         with `export_bbox_json` (the official form)

Steps: scan the metadata into frame references (main process) -> drop duplicate keys -> plan
shards (sorted, fixed-size chunks per task/split) -> for each unfinished shard: load and check
every frame (worker processes), compute the log-mel of the whole shard in batches with the
model's front end (main process, GPU when present), write the tar -> assemble the manifest.

The log-mel filterbank: the config's (`model.frontend`), or with `audio_checkpoint` (`ddeseg prepare
--audio-checkpoint CKPT`) the `logmel_extractor.melW` (and STFT kernels) stored in an HTS-AT or full
DDESeg checkpoint. That option exists because the official DDESeg model does not use its config's
filterbank (its yaml's `fmax: 50` gives NaNs, see "the fmax note" in configs/README.md): loading the
HTS-AT checkpoint replaces it (`load_checkpoint`), so shards for a model initialised from that
checkpoint (`ddeseg train --init`, `build-memory-bank --audio-checkpoint`) must be made with the
checkpoint's filterbank, or the model sees log-mels of another filterbank. `prepare.json` records the
one used under `frontend` (`source`, `filterbank_sha256` = `filterbank_fingerprint(melW)`, ...), and
`ShardIndex.check_frontend(model)` compares it with a model's before it reads the log-mels. Our own
`pretrain-audio` checkpoints carry the config's filterbank: no option needed for them.

Idempotent: a re-run keeps every shard whose tar and inputs are unchanged (verified by its
sha256 and input fingerprint, which covers the filterbank: another one rebuilds every shard) and
writes the rest; `overwrite` starts from scratch. The output bytes do not depend on `workers`.

A folder can hold several runs' tasks: a run replaces only the tasks it prepares (their shards
that the plan no longer has, e.g. an older shard size, are deleted) and ADDS to the others,
whose shards, manifest rows and keyed rejects stay. It refuses (DataError, before writing
anything) when the kept shards would not fit: another class list (the shorter must be the
start of the longer, so that no id changes), another audio front end or clip length, or an
earlier run it cannot read. `overwrite` replaces everything.

Every input is checked before any output is written: a failed run (bad input) leaves no output
folder behind when it created it.

Rejects (`rejects.jsonl`, one json object per line: `key` (null for a metadata row), `path`
relative to the raw root (`file.csv:LINE` for a row), `reason`): a missing, unreadable or
corrupt image / mask / audio file, a mask whose size differs from its frame, an unknown class
colour or id, empty or NaN audio, digital silence under a sounding mask, a path that leaves the
root, an unusable or duplicate metadata row, a duplicate sample key.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import platform
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ddeseg.classes import ALL_TASKS, SPLITS
from ddeseg.config import CONFIG_FILE, Config, to_dict
from ddeseg.data import schema
from ddeseg.data.boxes import sounding_boxes
from ddeseg.data.schema import SampleMeta, encode_array, encode_mask, sample_key
from ddeseg.data.shards import read_classes_file
from ddeseg.errors import DataError, DDESegError
from ddeseg.fileio import atomic_file, reporting_disk_full, write_bytes_atomic
from ddeseg.pipelines.bboxes import export_bbox_json
from ddeseg.pipelines.records import FrameRef, RecordError, Reject
from ddeseg.pipelines.shard_writer import (
    STATE_DIR,
    ShardJob,
    fingerprint,
    is_finished,
    plan_shards,
    remove_stale,
    save_state,
    write_tar,
)
from ddeseg.pipelines.sources.common import Source, open_source
from ddeseg.runlock import writer_lock
from ddeseg.stage import RunOptions, write_stage_config

if TYPE_CHECKING:  # the main process imports torch only when it makes log-mels
    import torch

FORMAT_VERSION = 1  # bump when the bytes of a sample change for the same inputs
VERSIONED_PACKAGES = ("ddeseg", "numpy", "torch", "soundfile", "soxr", "pillow", "webdataset", "pyarrow")

MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("task", pa.string()),
        ("subset", pa.string()),
        ("split", pa.string()),
        ("video", pa.string()),
        ("frame", pa.int32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("annotated", pa.bool_()),
        ("silent", pa.bool_()),
        ("classes", pa.list_(pa.int32())),
        ("union_box", pa.list_(pa.float64())),
        ("class_boxes", pa.map_(pa.int32(), pa.list_(pa.float64()))),
        ("shard", pa.string()),
        ("image_ext", pa.string()),
        ("source_image", pa.string()),
        ("source_mask", pa.string()),
        ("source_audio", pa.string()),
    ]
)


@dataclass
class PreparePaths:
    """What `prepare` reads and writes (its settings are `config.prepare`, `model.frontend`, `data.*`)."""

    layout: str  # how `root` is laid out: avsbench | ddeseg | vpo
    root: Path
    out: Path
    tasks: list[str] | None = None  # None: every task the root has
    audio_checkpoint: Path | None = None  # HTS-AT / full checkpoint whose filterbank makes the log-mels


@dataclass
class PrepareResult:
    out: Path
    counts: dict[str, dict[str, int]]  # task -> split -> samples
    unannotated: int
    rejects: list[Reject]
    shards_written: int
    shards_kept: int
    elapsed_s: float
    kept_tasks: dict[str, int] = field(default_factory=dict)  # other tasks kept from earlier runs -> samples
    uid_forms: dict[str, int] | None = None  # ddeseg VPO uids by form, when read


@dataclass
class EarlierRun:
    """What an earlier prepare left in the output folder for the tasks this run does not prepare."""

    rows: list[dict[str, Any]]  # their manifest rows
    rejects: list[Reject]  # their keyed rejects
    names: list[str]  # the class list of its classes.json


# --------------------------------------------------------------------------------------------
# Per-shard work (worker processes)
# --------------------------------------------------------------------------------------------

_WORKER_SOURCE: Source | None = None


def _init_worker(source: Source) -> None:
    global _WORKER_SOURCE
    _WORKER_SOURCE = source


@dataclass
class LoadedSample:
    meta: SampleMeta
    image: bytes
    mask_png: bytes | None
    audio: np.ndarray


def load_sample(source: Source, ref: FrameRef) -> LoadedSample:
    """Read one frame and derive its meta (classes, boxes, flags); RecordError when unusable."""
    record = source.load(ref)
    classes, union_box, class_boxes = sounding_boxes(record.mask)
    if ref.silent_hint is not None:
        silent = ref.silent_hint
    elif record.annotated:
        silent = not classes
    else:
        silent = not np.any(record.audio)
    meta = SampleMeta(
        key=ref.key,
        task=ref.task,
        subset=ref.subset,
        split=ref.split,
        video=ref.video,
        frame=ref.frame,
        height=record.height,
        width=record.width,
        annotated=record.annotated,
        silent=bool(silent),
        classes=classes,
        union_box=union_box,
        class_boxes=class_boxes,
        image_ext=record.image_ext,
        source=record.source,
    )
    mask_png = encode_mask(record.mask) if record.mask is not None else None
    return LoadedSample(meta, record.image_bytes, mask_png, record.audio)


def load_shard(
    job: ShardJob, source: Source | None = None, on_sample: Callable[[], None] | None = None
) -> tuple[ShardJob, list[LoadedSample], list[Reject]]:
    source = source or _WORKER_SOURCE
    assert source is not None, "worker not initialised"
    samples, rejects = [], []
    for ref in job.refs:
        try:
            samples.append(load_sample(source, ref))
        except RecordError as error:
            rejects.append(Reject(error.path, error.reason, ref.key))
        if on_sample is not None:
            on_sample()
    return job, samples, rejects


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def manifest_row(meta: SampleMeta, shard: str) -> dict[str, Any]:
    return {
        "key": meta.key,
        "task": meta.task,
        "subset": meta.subset,
        "split": meta.split,
        "video": meta.video,
        "frame": meta.frame,
        "height": meta.height,
        "width": meta.width,
        "annotated": meta.annotated,
        "silent": meta.silent,
        "classes": meta.classes,
        "union_box": meta.union_box,
        "class_boxes": dict(meta.class_boxes),  # str keys (json state); ints in the parquet
        "shard": shard,
        "image_ext": meta.image_ext,
        "source_image": meta.source.get("image"),
        "source_mask": meta.source.get("mask"),
        "source_audio": meta.source.get("audio"),
    }


def _fail_or_record(reject: Reject, on_error: str, root: Path) -> Reject:
    if on_error == "fail":
        sample = f"sample {reject.key}, " if reject.key else ""
        raise DataError(
            f"{reject.path}: {reject.reason} ({sample}paths relative to {root}; --on-error skip lists all)"
        )
    return reject


def _front_end_settings(report: dict[str, Any]) -> dict[str, Any]:
    """What decides a shard's log-mels and audio, from a prepare.json (written by this or an
    older version of prepare)."""
    config = report.get("config") or {}
    frontend = report.get("frontend") or {}
    return {
        "model.frontend": (config.get("model") or {}).get("frontend"),
        "data.clip_seconds": (config.get("data") or {}).get("clip_seconds"),
        "data.vpo_audio": (config.get("data") or {}).get("vpo_audio"),
        "filterbank_sha256": frontend.get("filterbank_sha256"),
        "stft_sha256": frontend.get("stft_sha256"),
    }


def _key_prefix(task: str) -> str:
    """The start of every sample key of `task` (`sample_key` puts the cleaned task first)."""
    return sample_key(task, "x", 0).removesuffix("x-000")


def _read_earlier_run(out: Path, tasks: list[str]) -> EarlierRun | None:
    """The outputs of an earlier run in `out` for tasks other than `tasks`; None when it has
    none. A DataError (naming the file) when they exist but cannot be read."""
    manifest = out / schema.MANIFEST_FILE
    if not manifest.is_file():
        return None
    again = "; prepare into a new folder, or use --overwrite to replace it"
    try:
        table = pq.read_table(manifest)
        earlier_rows = table.to_pylist()
    except (OSError, pa.ArrowException) as error:
        raise DataError(f"{manifest}: unreadable manifest of an earlier run ({error}){again}") from None
    rows = []
    for row in earlier_rows:
        if row.get("task") in tasks:
            continue
        boxes = row.get("class_boxes") or []
        rows.append(dict(row, class_boxes={str(k): v for k, v in (boxes.items() if isinstance(boxes, dict) else boxes)}))
    try:
        names = list(read_classes_file(out / schema.CLASSES_FILE)["names"])
    except DataError as error:
        if not rows:
            return None
        raise DataError(f"unreadable class list of an earlier run: {error}{again}") from None
    rejects = []
    try:
        for line in (out / schema.REJECTS_FILE).read_text().splitlines():
            recorded = json.loads(line)
            key = recorded.get("key")
            if key and not any(key.startswith(_key_prefix(task)) for task in tasks):
                rejects.append(Reject(recorded["path"], recorded["reason"], key))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        rejects = []  # a lost rejects list loses no sample: the shards and rows stay
    return EarlierRun(rows=rows, rejects=rejects, names=names)


def _check_earlier_run(
    out: Path, earlier: EarlierRun, class_names: list[str], settings: dict[str, Any]
) -> list[str]:
    """The class list of the merged folder; a DataError when the kept tasks' shards would not
    fit this run's (another class list or audio front end)."""
    kept = sorted({row["task"] for row in earlier.rows}, key=ALL_TASKS.index)
    advice = (
        f"prepare into another folder, prepare {','.join(kept)} in the same run, "
        f"or use --overwrite to replace them"
    )
    longer, shorter = (earlier.names, class_names) if len(earlier.names) >= len(class_names) else (class_names, earlier.names)
    if longer[: len(shorter)] != shorter:
        first = next(i for i, (a, b) in enumerate(zip(longer, shorter, strict=False)) if a != b)
        raise DataError(
            f"{out / schema.CLASSES_FILE}: the shards of {', '.join(kept)} there use another class list "
            f"(id {first}: {earlier.names[first]!r} there, {class_names[first]!r} in this run); {advice}"
        )
    try:
        report = json.loads((out / schema.PREPARE_FILE).read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"{out / schema.PREPARE_FILE}: unreadable record of the earlier run ({error}); {advice}") from None
    before = _front_end_settings(report)
    different = [name for name, value in settings.items() if before.get(name) != value]
    if different:
        raise DataError(
            f"{out / schema.PREPARE_FILE}: the shards of {', '.join(kept)} there were made with another "
            f"{', '.join(different)}; {advice}"
        )
    return list(longer)


def _remove_if_empty(folder: Path) -> None:
    """Remove `folder` when it holds no file at all (only empty folders): a failed run's leftovers."""
    if folder.is_dir() and not any(path.is_file() or path.is_symlink() for path in folder.rglob("*")):
        shutil.rmtree(folder)


def _clear_outputs(out: Path) -> None:
    """`overwrite`: remove what a previous prepare wrote (only our own files and folders)."""
    for name in (schema.MANIFEST_FILE, schema.CLASSES_FILE, schema.PREPARE_FILE, schema.REJECTS_FILE, CONFIG_FILE):
        (out / name).unlink(missing_ok=True)
    for folder in [out / STATE_DIR, out / "bbox"] + [out / task for task in ALL_TASKS]:
        if folder.is_dir():
            shutil.rmtree(folder)


class _Stage:
    """Progress bars (rich, on stderr) for the stages of one run; silent when disabled."""

    def __init__(self, enabled: bool):
        from ddeseg.progress import stage_progress

        self.progress = stage_progress("samples", enabled=enabled)

    def __enter__(self) -> _Stage:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def bar(self, description: str, total: int | None) -> Callable[[int], None]:
        task_id = self.progress.add_task(description, total=total)
        return lambda advance=1: self.progress.advance(task_id, advance)

    def close(self, description: str) -> None:
        """Stop the clock of an open-ended bar (its total becomes what it counted)."""
        for task in self.progress.tasks:
            if task.description == description:
                self.progress.update(task.id, total=task.completed)

    def finish(self, description: str, total: int) -> None:
        self.progress.add_task(description, total=total, completed=total)


def _scan(
    source: Source, on_error: str, advance: Callable[[int], None]
) -> tuple[list[FrameRef], list[Reject]]:
    refs: list[FrameRef] = []
    rejects: list[Reject] = []
    first_of: dict[str, FrameRef] = {}
    for item in source.scan():
        if isinstance(item, Reject):
            rejects.append(_fail_or_record(item, on_error, source.root))
            continue
        advance(1)
        earlier = first_of.get(item.key)
        if earlier is not None:
            reason = f"duplicate sample key {item.key} (already given by {earlier.image})"
            rejects.append(_fail_or_record(Reject(item.image, reason, item.key), on_error, source.root))
            continue
        first_of[item.key] = item
        refs.append(item)
    return refs, rejects


def _run_jobs(
    jobs: list[ShardJob], source: Source, workers: int, advance: Callable[[int], None]
) -> Iterator[tuple[ShardJob, list[LoadedSample], list[Reject]]]:
    """Load the shards, in order when `workers == 1`, else as worker processes finish them."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield load_shard(job, source, on_sample=lambda: advance(1))
        return
    context = multiprocessing.get_context("spawn")  # never fork a process that holds torch/CUDA
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_init_worker, initargs=(source,)
    ) as pool:
        pending: set[concurrent.futures.Future] = set()
        queue = iter(jobs)
        try:
            while True:
                while len(pending) < 2 * workers:  # bounded: memory stays flat
                    job = next(queue, None)
                    if job is None:
                        break
                    pending.add(pool.submit(load_shard, job))
                if not pending:
                    return
                done, pending = concurrent.futures.wait(
                    pending, return_when=concurrent.futures.FIRST_COMPLETED
                )
                for future in sorted(done, key=lambda f: f.result()[0].name):
                    job, samples, rejects = future.result()
                    advance(len(job.refs))
                    yield job, samples, rejects
        finally:
            for future in pending:
                future.cancel()


def _write_shard(
    out: Path,
    job: ShardJob,
    samples: list[LoadedSample],
    rejects: list[Reject],
    logmel: Callable[[np.ndarray], np.ndarray],
    job_fingerprint: str,
) -> dict[str, Any]:
    state: dict[str, Any] = {"fingerprint": job_fingerprint, "tar": None, "sha256": None, "size": 0}
    if samples:
        features = logmel(np.stack([sample.audio for sample in samples]))
        members = []
        for sample, feature in zip(samples, features, strict=True):
            member = {
                "__key__": sample.meta.key,
                f"image.{sample.meta.image_ext}": sample.image,
                schema.AUDIO: encode_array(sample.audio.astype(np.float32)),
                schema.LOGMEL: encode_array(feature.astype(np.float16)),
                schema.META: sample.meta.to_json(),
            }
            if sample.mask_png is not None:
                member[schema.MASK] = sample.mask_png
            members.append(member)
        sha256, size = write_tar(out / job.name, members)
        state.update(tar=job.name, sha256=sha256, size=size)
    else:
        (out / job.name).unlink(missing_ok=True)  # every frame rejected: no tar (an older one goes)
    state["rows"] = [manifest_row(sample.meta, job.name) for sample in samples]
    state["rejects"] = [json.loads(reject.to_json()) for reject in rejects]
    save_state(out, job, state)
    return state


def _write_manifest(out: Path, rows: list[dict[str, Any]]) -> None:
    rows = [dict(row, class_boxes={int(k): v for k, v in row["class_boxes"].items()}) for row in rows]
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    with atomic_file(out / schema.MANIFEST_FILE) as handle:
        pq.write_table(table, handle)


def _shard_settings(
    config: Config, paths: PreparePaths, source: Source, frontend: dict[str, Any]
) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "layout": paths.layout,
        "frontend": to_dict(config.model.frontend),
        # what the log-mels are made with, not where it came from: a moved checkpoint keeps shards
        "filterbank_sha256": frontend["filterbank_sha256"],
        "stft_sha256": frontend["stft_sha256"],
        "clip_seconds": config.data.clip_seconds,
        "vpo_audio": config.data.vpo_audio,
        "classes": source.classes.names,
    }


def prepare(config: Config, paths: PreparePaths, run: RunOptions = RunOptions()) -> PrepareResult:
    """Run the stage (see the module docstring) with the settings of `config.prepare` (workers,
    on_error, export_bbox_json, avsbench_part), the front end `config.model.frontend` and
    `config.data` (clip_seconds, samples_per_shard, vpo_audio); `run.device` makes the log-mels,
    `run.overwrite` replaces an earlier run's outputs. Writes `out/config.yaml` last but one
    (before prepare.json). Raises `DataError` for unusable input, and for the first rejected frame
    when `config.prepare.on_error == "fail"`; `CheckpointError` for an `audio_checkpoint` without
    a usable filterbank (none, NaN, or not the config's shape)."""
    started = time.perf_counter()
    settings = config.prepare  # its ranges and choices are checked once, by the config
    out = Path(paths.out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a directory; give a folder path")
    source_options = {"part": settings.avsbench_part} if paths.layout == "avsbench" else {}
    source = open_source(paths.layout, paths.root, paths.tasks, config, source_options)
    if out.resolve() == source.root or source.root.is_relative_to(out.resolve()):
        raise DataError(f"output {out} must not contain the dataset root {source.root}")
    from ddeseg.audio import prepare_frontend  # builds torch modules: main process only
    from ddeseg.distributed import resolve_device

    device = resolve_device(run.device)  # once, for the stage; a bad --device fails here, not after the scan

    frontend, frontend_entry = prepare_frontend(config.model.frontend, paths.audio_checkpoint)
    created = not out.exists()
    try:
        # One writer per shards folder; a full disk is one line (the finished shards stay and a
        # re-run keeps them).
        with writer_lock(out, "ddeseg prepare"), reporting_disk_full(out, "shards"):
            return _run(config, paths, run, source, out, (frontend, frontend_entry, device), started)
    except DDESegError:
        if created:
            _remove_if_empty(out)  # bad input: no empty output folder is left behind
        raise


def _run(
    config: Config,
    paths: PreparePaths,
    run: RunOptions,
    source: Source,
    out: Path,
    logmels: tuple[Any, dict[str, Any], torch.device],
    started: float,
) -> PrepareResult:
    """The stage after its argument checks: scan, check the folder, write (see `prepare`).
    `logmels`: the front end, its prepare.json entry and the device that runs it."""
    tasks = list(source.tasks)
    on_error = config.prepare.on_error
    with _Stage(run.progress) as stage:
        # everything that can refuse the run comes before the first write
        refs, rejects = _scan(source, on_error, stage.bar("scan", None))
        stage.close("scan")
        earlier = None if run.overwrite else _read_earlier_run(out, tasks)
        class_names = list(source.classes.names)
        if earlier is not None and earlier.rows:
            settings = _front_end_settings({"config": to_dict(config), "frontend": logmels[1]})
            class_names = _check_earlier_run(out, earlier, class_names, settings)
        jobs = plan_shards(refs, config.data.samples_per_shard)
        out.mkdir(parents=True, exist_ok=True)
        if run.overwrite:
            _clear_outputs(out)
        remove_stale(out, jobs, tuple(tasks), SPLITS)  # this run's tasks only: the others are kept
        written = _write_shards(config, paths, source, out, jobs, logmels, stage.bar, len(refs))
        rows, rejects, tasks, kept_tasks = _all_rows(jobs, written.states, rejects, earlier, tasks, on_error, source.root)
        _write_manifest(out, rows)
        stage.finish("manifest", len(rows))

    classes_json = source.classes.to_json(tasks)
    classes_json["names"] = class_names  # a longer list of the kept tasks keeps its extra names
    write_bytes_atomic(out / schema.CLASSES_FILE, json.dumps(classes_json, indent=1).encode())
    write_bytes_atomic(out / schema.REJECTS_FILE, "".join(reject.to_json() + "\n" for reject in rejects).encode())
    if config.prepare.export_bbox_json:
        export_bbox_json(rows, out / "bbox")
    return _report(config, paths, source, out, jobs, written, rows, rejects, tasks, kept_tasks, logmels[1], started)


@dataclass
class _Written:
    """What `_write_shards` did: each job's state (its rows, rejects and tar), how many shards an
    earlier run had already written, and the device that made the log-mels (None: none made)."""

    states: dict[str, dict[str, Any]]
    kept: int
    logmel_device: str | None


def _write_shards(
    config: Config,
    paths: PreparePaths,
    source: Source,
    out: Path,
    jobs: list[ShardJob],
    logmels: tuple[Any, dict[str, Any], torch.device],
    bar: Callable[[str, int | None], Callable[[int], None]],
    total: int,
) -> _Written:
    """Every job's shard: kept when an earlier run wrote it from the same files and settings (its
    state file says so), else written by the workers. The front end moves to its device only
    when a shard is written."""
    from ddeseg.audio import LogMelBatcher  # torch: main process only

    frontend, frontend_entry, device = logmels
    settings = _shard_settings(config, paths, source, frontend_entry)
    fingerprints = {job.name: fingerprint(job, source.root, settings) for job in jobs}
    states: dict[str, dict[str, Any]] = {}
    todo = []
    for job in jobs:
        state = is_finished(out, job, fingerprints[job.name])
        if state is None:
            todo.append(job)
        else:
            states[job.name] = state
    kept = len(states)
    advance = bar(f"shards ({kept} kept)" if kept else "shards", total)
    advance(sum(len(job.refs) for job in jobs if job.name in states))
    logmel: LogMelBatcher | None = None
    for job, samples, shard_rejects in _run_jobs(todo, source, config.prepare.workers, advance):
        for reject in shard_rejects:
            _fail_or_record(reject, config.prepare.on_error, source.root)
        if logmel is None and samples:
            logmel = LogMelBatcher(frontend, device)
        states[job.name] = _write_shard(out, job, samples, shard_rejects, logmel, fingerprints[job.name])  # type: ignore[arg-type]
    return _Written(states, kept, str(logmel.device) if logmel is not None else None)


def _all_rows(
    jobs: list[ShardJob],
    states: dict[str, dict[str, Any]],
    rejects: list[Reject],
    earlier: Any,
    tasks: list[str],
    on_error: str,
    root: Path,
) -> tuple[list[dict[str, Any]], list[Reject], list[str], dict[str, int]]:
    """The manifest's rows and every reject: this run's shards (a kept shard's rejects count, and
    fail, as new ones), then an earlier run's other tasks; the tasks the folder holds now, and the
    kept tasks' row counts."""
    rows: list[dict[str, Any]] = []
    for job in jobs:
        state = states[job.name]
        rows.extend(state["rows"])
        for recorded in state["rejects"]:
            reject = Reject(recorded["path"], recorded["reason"], recorded.get("key"))
            rejects.append(_fail_or_record(reject, on_error, root))
    kept_tasks: dict[str, int] = {}
    if earlier is not None and earlier.rows:
        kept_tasks = dict(Counter(row["task"] for row in earlier.rows))
        # the order of one run over all the tasks: by task and split, shard order within
        rows = sorted(rows + earlier.rows, key=lambda row: (row["task"], row["split"]))
        rejects = rejects + earlier.rejects
        tasks = [task for task in ALL_TASKS if task in set(tasks) | set(kept_tasks)]
    return rows, rejects, tasks, kept_tasks


def _report(
    config: Config,
    paths: PreparePaths,
    source: Source,
    out: Path,
    jobs: list[ShardJob],
    written: _Written,
    rows: list[dict[str, Any]],
    rejects: list[Reject],
    tasks: list[str],
    kept_tasks: dict[str, int],
    frontend_entry: dict[str, Any],
    started: float,
) -> PrepareResult:
    """Write `config.yaml` and `prepare.json` (what was prepared, from where, with what); the
    stage's result."""
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        counts.setdefault(row["task"], {}).setdefault(row["split"], 0)
        counts[row["task"]][row["split"]] += 1
    elapsed = time.perf_counter() - started
    described = source.describe()
    result = PrepareResult(
        out=out,
        counts=counts,
        unannotated=sum(not row["annotated"] for row in rows),
        rejects=rejects,
        shards_written=len(jobs) - written.kept,
        shards_kept=written.kept,
        elapsed_s=elapsed,
        kept_tasks=kept_tasks,
        uid_forms=described.get("uid_forms"),
    )
    report = {
        "layout": paths.layout,
        "root": str(source.root),
        "tasks": tasks,
        "prepared_tasks": list(source.tasks),
        "kept_tasks": kept_tasks,
        "source": described,
        "config": to_dict(config),
        "frontend": frontend_entry,
        "counts": counts,
        "samples": len(rows),
        "unannotated": result.unannotated,
        "rejects": len(rejects),
        "rejects_by_reason": dict(Counter(_reason_kind(reject.reason) for reject in rejects).most_common()),
        "shards": {
            "total": sum(1 for job in jobs if written.states[job.name]["tar"])
            + len({row["shard"] for row in rows if row["task"] in kept_tasks}),
            "written": result.shards_written,
            "kept": written.kept,
        },
        "workers": config.prepare.workers,
        "on_error": config.prepare.on_error,
        "logmel_device": written.logmel_device,
        "versions": package_versions(),
        "elapsed_s": round(elapsed, 3),
        "samples_per_s": round(len(rows) / elapsed, 2) if elapsed > 0 else None,
    }
    write_stage_config(config, out)
    write_bytes_atomic(out / schema.PREPARE_FILE, json.dumps(report, indent=1, sort_keys=True).encode())
    return result


def _reason_kind(reason: str) -> str:
    """A reject reason without its specifics (numbers, names), for the summary counts."""
    return reason.split(" (")[0].split(":")[0]


def summary_table(result: PrepareResult):
    """A rich renderable: samples per task and split, then one line on rejects and shards."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"prepared {result.out}")
    table.add_column("task")
    for split in SPLITS:
        table.add_column(split, justify="right")
    table.add_column("total", justify="right")
    for task in sorted(result.counts, key=ALL_TASKS.index):
        per_split = result.counts[task]
        table.add_row(task, *[str(per_split.get(split, 0)) for split in SPLITS], str(sum(per_split.values())))
    total = sum(sum(per_split.values()) for per_split in result.counts.values())
    table.add_row("all", *["" for _ in SPLITS], str(total), style="bold")
    line = Text(
        f"{len(result.rejects)} rejected (see {result.out / schema.REJECTS_FILE}), "
        f"{result.unannotated} unannotated frames kept; shards: {result.shards_written} written, "
        f"{result.shards_kept} kept; {result.elapsed_s:.1f} s"
    )
    lines = [table, line]
    if result.kept_tasks:
        kept = ", ".join(f"{task} ({count})" for task, count in result.kept_tasks.items())
        lines.append(Text(f"kept from an earlier run in this folder: {kept} samples (--overwrite replaces them)"))
    if result.uid_forms:
        forms = ", ".join(f"{count} {form}" for form, count in result.uid_forms.items())
        lines.append(Text(f"VPO uids resolved: {forms}"))
    return Group(*lines)
