"""The `build-memory-bank` stage: training shards -> per-class K-Means audio memory bank.

    BANK_DIR/bank.npy            float32 `[classes, k, dim]`: row r holds the k centroids of
                                 bank class r (`bank.json["classes"][r]`); np.save, no pickle,
                                 loadable by our model and by the official code
    BANK_DIR/bank.json           classes (row, id, name), points and effective k per class, the
                                 embedding model's fingerprint, FAISS version and device, settings,
                                 sample counts, time
    BANK_DIR/embeddings.parquet  the embeddings cache: one row per embedded sample (`key`,
                                 `classes` list<int32>, `silent` bool, `embedding`
                                 fixed_size_list<float32>[dim]); schema metadata records the task,
                                 shards and model fingerprint it was made from
    BANK_DIR/config.yaml         the resolved config (`config.memory_bank` holds the settings)

Steps: read the training shards of the task (every task its protocol `reads`, e.g. `v2` reads the
`v1s`, `v1m` and `v2` directories, as DDESeg trains on every AVSS subset) -> embed each
annotated sample's precomputed log-mel with the frozen audio backbone, in batches -> write the
cache -> assign embeddings to classes -> cluster each class with FAISS K-Means -> write
`bank.npy` then `bank.json` (each through a temporary name and a rename; `bank.json` is written
last, so its presence means the bank is complete).

The cache stores every annotated sample once with all its classes, so the assignment options
(`include_multi_source`, `silence_row`) and the clustering options (`k`, `niter`, `seed`, ...)
can all change on a `reuse_embeddings` run without embedding again.

Bank rows (`bank_class_ids`): the task's class ids from `classes.json`, background included, in
the task's order: the 71 AVSS ids for `v1s`, `v1m` and `v2` (the official `1s_k5_feabank.npy`
is `[71, 5, 768]` for the binary task too), the 22 VPO ids for `VPO-*`. The model only compares
an audio latent with the row means (`bank.mean(1)`) and gathers rows, so the row order is ours
to choose; we keep the class order so that a row can be read.

Assignment (`assign_to_classes`): a sample is *single-source* when its mask holds exactly one
class. By default only single-source samples are used; `include_multi_source` adds every
multi-source sample to each of its classes. A *silent* sample (annotated, empty mask) goes to
the background row when `silence_row` is set, and is left out otherwise. Unannotated frames are
skipped (their classes are unknown); classes that are not bank rows are counted and left out.

Fill rules (documented contract, `cluster_class_embeddings`):
- `n >= k` points: FAISS K-Means on all `n` points (no subsampling), k centroids.
- `1 <= n < k` points (warning naming the class): the row is the `n` points themselves (each is
  its own optimal centroid), in cache order (sorted by sample key), followed by `k - n` copies
  of the class mean. The row mean is then exactly the class mean, which is what the model
  compares against. `effective_k = n`.
- no points: an error, unless the class is optional (the background row when `silence_row` is
  off) or `allow_missing` is set (warning naming the class): the row is `k` copies of the
  global mean of every clustered point (`missing_fill="global_mean"`, default) or zeros
  (`missing_fill="zeros"`); `bank.json` marks it `"missing": true`. `effective_k = 0`.
- `spherical`: points are L2-normalised before clustering (cosine K-Means), centroids are unit
  vectors, and the filled class mean / global mean are normalised too.

Determinism: the same embeddings and settings give the same `bank.npy` bytes on the CPU
(FAISS's random initialisation is seeded by `seed`, the same seed for every class). FAISS on a
GPU is not bitwise reproducible.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ddeseg.config import STAGE_KEY_CHOICES, Config
from ddeseg.data import schema
from ddeseg.data.schema import SampleMeta, decode_array, encode_array
from ddeseg.data.shards import ShardIndex
from ddeseg.data.stream import read_shard_samples
from ddeseg.distributed import resolve_device
from ddeseg.errors import DataError, DDESegError
from ddeseg.fileio import atomic_file, reporting_disk_full, write_bytes_atomic
from ddeseg.progress import stage_progress
from ddeseg.runlock import writer_lock
from ddeseg.stage import RunOptions, write_stage_config

BANK_FILE = "bank.npy"
BANK_JSON = "bank.json"
CACHE_FILE = "embeddings.parquet"
BANK_FORMAT = "ddeseg-memory-bank-1"
CACHE_FORMAT = "ddeseg-embeddings-1"
CACHE_METADATA_KEY = b"ddeseg"
TRAIN_SPLIT = "train"
MISSING_FILLS = STAGE_KEY_CHOICES["memory_bank.missing_fill"]

EmbedFn = Callable[[torch.Tensor], torch.Tensor]  # log-mel [B, frames, mel_bins] -> [B, dim]


class MemoryBankWarning(UserWarning):
    """A class with fewer than k points, or none (filled by the documented rules)."""


# --------------------------------------------------------------------------------------------
# Clustering core
# --------------------------------------------------------------------------------------------


@dataclass
class ClassStats:
    """One bank row. `fill`: `kmeans` | `points+class_mean` | `global_mean` | `zeros`."""

    row: int
    class_id: int
    name: str
    points: int  # embeddings clustered for this row
    effective_k: int  # distinct centroids: min(points, k); 0 when missing
    fill: str
    missing: bool = False
    inertia: float | None = None  # sum of squared L2 distances of the points to their nearest centroid
    iterations: int = 0  # K-Means iterations run (all restarts); fewer than niter * nredo: converged
    seconds: float = 0.0


def resolve_faiss_device(device: torch.device, explicit: bool = True) -> int | None:
    """The FAISS GPU index of the stage's torch device (`ddeseg.distributed.resolve_device`), or
    None for the CPU. A CUDA device FAISS cannot see is an error when the user named it
    (`explicit`); for `--device auto` it clusters on the CPU, with a warning."""
    if device.type != "cuda":
        return None
    import faiss

    gpus = faiss.get_num_gpus()
    index = device.index or 0
    if index < gpus:
        return index
    reason = f"FAISS sees {gpus} GPU(s) (faiss.get_num_gpus()), not {device}"
    if explicit:
        raise DDESegError(f"--device {device}: {reason}; use --device cpu, or a faiss-gpu build that matches this machine's CUDA driver")
    warnings.warn(f"{reason}: clustering on the CPU", MemoryBankWarning, stacklevel=2)
    return None


def kmeans_faiss(
    points: np.ndarray,
    k: int,
    niter: int = 25,
    seed: int = 0,
    spherical: bool = False,
    nredo: int = 1,
    gpu: int | None = None,
    init_centroids: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """FAISS K-Means (Lloyd) of float32 `points [n, dim]` (n >= k) -> (centroids `[k, dim]`,
    iterations run over all restarts). FAISS stops a restart early when the objective stops
    changing.

    Every point is used: FAISS otherwise trains on a random subsample of `k * 256` points.
    `init_centroids [k, dim]` replaces FAISS's random initialisation (then `nredo` must be 1).
    `spherical`: centroids are renormalised after each update and points are assigned by inner
    product (the caller normalises the points)."""
    import faiss

    n, dim = points.shape
    if n < k:
        raise ValueError(f"K-Means needs at least k={k} points, got {n}")
    params = faiss.ClusteringParameters()
    params.niter = niter
    params.nredo = nredo
    params.seed = seed
    params.spherical = spherical
    params.verbose = False
    params.max_points_per_centroid = max(1, math.ceil(n / k))  # FAISS subsamples above k * this
    params.min_points_per_centroid = 1  # small classes are expected; no FAISS warning
    clustering = faiss.Clustering(dim, k, params)
    if init_centroids is not None:
        if nredo != 1:
            raise ValueError("init_centroids needs nredo == 1")
        faiss.copy_array_to_vector(
            np.ascontiguousarray(init_centroids, dtype=np.float32).ravel(), clustering.centroids
        )
    index = faiss.IndexFlatIP(dim) if spherical else faiss.IndexFlatL2(dim)
    if gpu is not None:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, gpu, index)
    clustering.train(np.ascontiguousarray(points, dtype=np.float32), index)
    centroids = faiss.vector_to_array(clustering.centroids).reshape(k, dim).astype(np.float32, copy=False)
    return centroids, int(clustering.iteration_stats.size())


def faiss_inertia(points: np.ndarray, centroids: np.ndarray) -> float:
    """Sum over points of the squared L2 distance to the nearest centroid (FAISS, float32
    distances, float64 sum)."""
    import faiss

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    distances, _ = index.search(np.ascontiguousarray(points, dtype=np.float32), 1)
    return float(np.maximum(distances, 0.0).astype(np.float64).sum())


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def cluster_class_embeddings(
    embeddings_by_class: Mapping[int, np.ndarray],
    k: int,
    niter: int = 25,
    seed: int = 0,
    spherical: bool = False,
    gpu: int | None = None,
    *,
    nredo: int = 1,
    class_ids: Sequence[int] | None = None,
    class_names: Mapping[int, str] | None = None,
    allow_missing: bool = False,
    optional_classes: Collection[int] = (),
    missing_fill: str = "global_mean",
    progress: bool = False,
) -> tuple[np.ndarray, list[ClassStats]]:
    """K centroids per class: the memory bank.

    Args:
        embeddings_by_class: class id -> float `[n, dim]` embeddings (n may be 0; the order of
            the rows only matters for the fill of classes with fewer than k points).
        k: centroids per class. niter, nredo, seed: FAISS K-Means iterations, restarts (the best
            is kept) and random seed. spherical: cosine K-Means (see the module docstring).
        gpu: FAISS GPU index (`resolve_faiss_device`); None clusters on the CPU.
        class_ids: the bank rows, in order; default: the sorted keys of `embeddings_by_class`.
            A listed class without points is missing. class_names: for messages and stats.
        allow_missing: fill a missing class instead of raising. optional_classes: classes that
            may be missing without `allow_missing` and without a warning (the background row).
        missing_fill: `global_mean` or `zeros`.

    Returns:
        bank float32 `[len(class_ids), k, dim]` and one `ClassStats` per row (fill rules: above).
    """
    if k < 1 or niter < 1 or nredo < 1:
        raise DDESegError(f"k, niter and nredo must be >= 1 (got k={k}, niter={niter}, nredo={nredo})")
    if missing_fill not in MISSING_FILLS:
        raise DDESegError(f"missing_fill {missing_fill!r}: expected one of {MISSING_FILLS}")
    rows = list(class_ids) if class_ids is not None else sorted(embeddings_by_class)
    if len(set(rows)) != len(rows):
        raise ValueError(f"class_ids has duplicates: {rows}")
    names = dict(class_names or {})

    def describe(class_id: int) -> str:
        return f"class {class_id} ({names[class_id]!r})" if class_id in names else f"class {class_id}"

    prepared, dim = _checked_points(embeddings_by_class, rows, spherical, describe)
    required_missing = [c for c in rows if c not in prepared and c not in optional_classes]
    if required_missing and not allow_missing:
        listed = ", ".join(describe(c) for c in required_missing)
        raise DDESegError(
            f"{len(required_missing)} class(es) without any embedding: {listed}; "
            "use --allow-missing-classes to fill them (see bank.json), or add data for them"
        )
    global_mean = _global_mean(prepared, spherical)

    bank = np.zeros((len(rows), k, dim), dtype=np.float32)
    stats: list[ClassStats] = []
    with stage_progress(unit="classes", enabled=progress) as bar:
        task = bar.add_task("clustering", total=len(rows))
        for row, class_id in enumerate(rows):
            started = time.perf_counter()
            name = names.get(class_id, str(class_id))
            points = prepared.get(class_id)
            if points is None:
                if class_id not in optional_classes:
                    warnings.warn(
                        f"{describe(class_id)} has no embedding: its row is filled with {missing_fill}",
                        MemoryBankWarning,
                        stacklevel=2,
                    )
                if missing_fill == "global_mean":
                    bank[row] = global_mean
                entry = ClassStats(row, class_id, name, 0, 0, missing_fill, missing=True)
            else:
                entry = _cluster_row(bank, row, class_id, name, points, k, describe, spherical,
                                     niter=niter, seed=seed, nredo=nredo, gpu=gpu)
            entry.seconds = round(time.perf_counter() - started, 4)
            stats.append(entry)
            bar.advance(task)
    return bank, stats


def _checked_points(
    embeddings_by_class: Mapping[int, np.ndarray], rows: Sequence[int], spherical: bool, describe: Callable[[int], str]
) -> tuple[dict[int, np.ndarray], int]:
    """The non-empty classes' points as float32 `[n, dim]` (unit length when `spherical`) and
    `dim`; raises naming the class for a wrong shape, a NaN/inf or when no class has a point."""
    prepared: dict[int, np.ndarray] = {}
    dim = None
    for class_id in rows:
        points = np.asarray(embeddings_by_class.get(class_id, np.zeros((0, 0))), dtype=np.float32)
        if points.size == 0:
            continue
        if points.ndim != 2 or (dim is not None and points.shape[1] != dim):
            raise DDESegError(
                f"{describe(class_id)}: embeddings of shape {points.shape}, expected [n, {dim or 'dim'}]"
            )
        if not np.isfinite(points).all():
            raise DDESegError(f"{describe(class_id)}: embeddings contain NaN or inf")
        dim = points.shape[1]
        prepared[class_id] = _normalise(points) if spherical else np.ascontiguousarray(points)
    if dim is None:
        raise DDESegError("no embeddings for any class: nothing to cluster")
    return prepared, dim


def _global_mean(prepared: Mapping[int, np.ndarray], spherical: bool) -> np.ndarray:
    """The mean of every class's points (float64 sums), unit length when `spherical`: the fill
    of a class without any point (`missing_fill: global_mean`)."""
    total_points = sum(len(points) for points in prepared.values())
    global_sum = sum(points.sum(0, dtype=np.float64) for points in prepared.values())
    global_mean = (global_sum / total_points).astype(np.float32)
    return _normalise(global_mean) if spherical else global_mean


def _cluster_row(
    bank: np.ndarray, row: int, class_id: int, name: str, points: np.ndarray, k: int,
    describe: Callable[[int], str], spherical: bool, *, niter: int, seed: int, nredo: int, gpu: int | None,
) -> ClassStats:
    """Fill `bank[row]` from a class's points: K-Means, or with fewer than k points the points
    followed by copies of the class mean (see the module docstring)."""
    if len(points) < k:
        warnings.warn(
            f"{describe(class_id)} has {len(points)} point(s) < k={k}: its row is the points "
            f"followed by {k - len(points)} copies of the class mean",
            MemoryBankWarning,
            stacklevel=3,
        )
        class_mean = points.astype(np.float64).mean(0).astype(np.float32)
        bank[row, : len(points)] = points
        bank[row, len(points) :] = _normalise(class_mean) if spherical else class_mean
        return ClassStats(row, class_id, name, len(points), len(points), "points+class_mean", inertia=0.0)
    centroids, iterations = kmeans_faiss(points, k, niter=niter, seed=seed, spherical=spherical, nredo=nredo, gpu=gpu)
    bank[row] = centroids
    return ClassStats(
        row, class_id, name, len(points), k, "kmeans", inertia=faiss_inertia(points, centroids), iterations=iterations
    )


# --------------------------------------------------------------------------------------------
# Embeddings: the table, its Parquet cache, the embedding pass
# --------------------------------------------------------------------------------------------


@dataclass
class EmbeddingTable:
    """Every embedded sample once, sorted by key. `embeddings` float32 `[n, dim]`."""

    keys: list[str]
    classes: list[list[int]]  # class ids in the mask (no background, no ignore)
    silent: np.ndarray  # bool [n]
    embeddings: np.ndarray
    unannotated: int = 0  # samples read but skipped (no mask)

    def __len__(self) -> int:
        return len(self.keys)

    def sorted_by_key(self) -> EmbeddingTable:
        order = sorted(range(len(self.keys)), key=self.keys.__getitem__)
        return EmbeddingTable(
            [self.keys[i] for i in order],
            [self.classes[i] for i in order],
            self.silent[order],
            self.embeddings[order],
            self.unannotated,
        )


def write_embeddings_cache(path: str | Path, table: EmbeddingTable, metadata: dict[str, Any]) -> Path:
    """Write `table` as Parquet (`key`, `classes`, `silent`, `embedding` fixed-size list) with
    `metadata` (JSON) in the schema metadata, through a temporary name."""
    path = Path(path)
    dim = table.embeddings.shape[1]
    flat = pa.array(np.ascontiguousarray(table.embeddings, dtype=np.float32).reshape(-1), type=pa.float32())
    arrow = pa.table(
        {
            "key": pa.array(table.keys, type=pa.string()),
            "classes": pa.array(table.classes, type=pa.list_(pa.int32())),
            "silent": pa.array(np.asarray(table.silent, dtype=bool), type=pa.bool_()),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
        }
    )
    document = {"format": CACHE_FORMAT, "dim": dim, "unannotated": table.unannotated, **metadata}
    arrow = arrow.replace_schema_metadata({CACHE_METADATA_KEY: json.dumps(document, sort_keys=True).encode()})
    with atomic_file(path) as handle:
        pq.write_table(arrow, handle)
    return path


def read_embeddings_cache(path: str | Path) -> tuple[EmbeddingTable, dict[str, Any]]:
    """Read a cache written by `write_embeddings_cache` -> (table, its metadata)."""
    path = Path(path)
    if not path.is_file():
        raise DDESegError(f"no embeddings cache at {path}: run once without --reuse-embeddings to make it")
    arrow = pq.read_table(path)
    raw = (arrow.schema.metadata or {}).get(CACHE_METADATA_KEY)
    document = json.loads(raw) if raw else {}
    if document.get("format") != CACHE_FORMAT:
        raise DDESegError(f"{path} is not a ddeseg embeddings cache (format {document.get('format')!r})")
    dim = int(document["dim"])
    embedding = arrow.column("embedding").combine_chunks()
    embeddings = embedding.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    table = EmbeddingTable(
        keys=arrow.column("key").to_pylist(),
        classes=arrow.column("classes").to_pylist(),
        silent=np.asarray(arrow.column("silent").to_pylist(), dtype=bool),
        embeddings=embeddings,
        unannotated=int(document.get("unannotated", 0)),
    )
    return table, document


def _sample_classes(meta: SampleMeta) -> list[int]:
    return sorted({int(c) for c in meta.classes if c not in (0, schema.IGNORE_INDEX)})


def _embed_batch(embed_fn: EmbedFn, batch: list[np.ndarray], first: str, device: str | torch.device) -> np.ndarray:
    """`embed_fn` on one stacked batch of log-mels, checked: float32 `[len(batch), dim]`, finite
    (`first` names the batch's first sample in the error)."""
    inputs = torch.from_numpy(np.stack(batch)).to(device)
    with torch.inference_mode():
        embedded = embed_fn(inputs)
    if embedded.ndim != 2 or embedded.shape[0] != len(batch):
        raise DDESegError(f"embed_fn returned shape {tuple(embedded.shape)} for a batch of {len(batch)} (from {first})")
    array = embedded.detach().float().cpu().numpy()
    if not np.isfinite(array).all():
        raise DDESegError(f"embed_fn returned NaN or inf for the batch starting at {first}")
    return array


def embed_shards(
    shard_paths: Sequence[str | Path],
    embed_fn: EmbedFn,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = True,
    total: int | None = None,
) -> EmbeddingTable:
    """Embed the log-mel of every annotated sample of `shard_paths`.

    Samples are decoded with `ddeseg.data.schema` (`meta.json`, `logmel.npy` float16
    `[frames, mel_bins]`), stacked into float32 batches `[B, frames, mel_bins]` on `device`, and
    passed to `embed_fn`, which returns `[B, dim]`. Unannotated samples are counted and skipped.
    `total`: samples expected (for the progress bar's ETA), when known.
    """
    keys: list[str] = []
    classes: list[list[int]] = []
    silent: list[bool] = []
    outputs: list[np.ndarray] = []
    batch: list[np.ndarray] = []
    batch_where: list[str] = []
    unannotated = 0
    frame_shape: tuple[int, ...] | None = None

    def flush() -> None:
        outputs.append(_embed_batch(embed_fn, batch, batch_where[0], device))
        batch.clear()
        batch_where.clear()

    with stage_progress(unit="clips", enabled=progress) as bar:
        task = bar.add_task("embedding", total=total)
        for sample in read_shard_samples(list(shard_paths)):  # a corrupt shard stops the run, naming it
            key = sample["__key__"]
            where = f"{sample['__url__']}: sample {key!r}"
            if schema.META not in sample:
                raise DataError(f"{where} has no {schema.META}; re-run `ddeseg prepare`")
            meta = SampleMeta.from_json(sample[schema.META])
            bar.advance(task)
            if not meta.annotated:
                unannotated += 1
                continue
            if schema.LOGMEL not in sample:
                raise DataError(f"{where} has no {schema.LOGMEL}; re-run `ddeseg prepare`")
            logmel = decode_array(sample[schema.LOGMEL]).astype(np.float32)
            if logmel.ndim != 2 or (frame_shape is not None and logmel.shape != frame_shape):
                raise DataError(
                    f"{where}: logmel.npy has shape {logmel.shape}, expected [frames, mel_bins]"
                    + (f" = {list(frame_shape)} like the samples before it" if frame_shape else "")
                )
            frame_shape = logmel.shape
            keys.append(key)
            sample_classes = _sample_classes(meta)
            classes.append(sample_classes)
            silent.append(bool(meta.silent) or not sample_classes)
            batch.append(logmel)
            batch_where.append(where)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    duplicates = [key for key, count in Counter(keys).items() if count > 1]
    if duplicates:
        raise DataError(
            f"sample key(s) found in more than one shard: {duplicates[:5]}; re-run `ddeseg prepare`"
        )
    if not keys:
        raise DataError(f"no annotated sample in {len(shard_paths)} shard(s) ({unannotated} unannotated)")
    table = EmbeddingTable(
        keys, classes, np.asarray(silent, dtype=bool), np.concatenate(outputs), unannotated
    )
    return table.sorted_by_key()


# --------------------------------------------------------------------------------------------
# Classes: bank rows and assignment
# --------------------------------------------------------------------------------------------


@dataclass
class Assignment:
    """Embeddings per bank class and what happened to every sample."""

    by_class: dict[int, np.ndarray]
    counts: dict[str, int]  # samples, single_source, multi_source, silent and *_used, outside_bank
    present: dict[int, int]  # class id -> samples whose mask has it (used or not)
    outside_bank: dict[int, int]  # class id not in the bank -> samples


def assign_to_classes(
    table: EmbeddingTable,
    bank_ids: Sequence[int],
    include_multi_source: bool = False,
    silence_row: bool = False,
    background_id: int = 0,
) -> Assignment:
    """Group the embeddings of `table` by bank class (rules in the module docstring). The order
    within a class is the table's (sorted by key)."""
    bank_set = set(bank_ids)
    members: dict[int, list[int]] = {class_id: [] for class_id in bank_ids}
    counts = Counter(samples=len(table))
    present: Counter[int] = Counter()
    outside: Counter[int] = Counter()
    for index, (sample_classes, silent) in enumerate(zip(table.classes, table.silent, strict=True)):
        present.update(sample_classes)
        if silent or not sample_classes:
            counts["silent"] += 1
            if silence_row and background_id in bank_set:
                members[background_id].append(index)
                counts["silent_used"] += 1
            continue
        kind = "single_source" if len(sample_classes) == 1 else "multi_source"
        counts[kind] += 1
        if kind == "multi_source" and not include_multi_source:
            continue
        used = False
        for class_id in sample_classes:
            if class_id in bank_set:
                members[class_id].append(index)
                used = True
            else:
                outside[class_id] += 1
        counts[f"{kind}_used"] += int(used)
        counts["outside_bank"] += int(not used)
    for key in (
        "single_source",
        "multi_source",
        "silent",
        "single_source_used",
        "multi_source_used",
        "silent_used",
    ):
        counts.setdefault(key, 0)
    counts.setdefault("outside_bank", 0)
    by_class = {c: table.embeddings[rows] for c, rows in members.items() if rows}
    return Assignment(by_class, dict(counts), dict(present), dict(outside))


# --------------------------------------------------------------------------------------------
# The production embedder (the frozen audio backbone of a DDESeg model)
# --------------------------------------------------------------------------------------------


def state_dict_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the sorted names, dtypes, shapes and bytes of a state dict."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class AudioEmbedder:
    embed_fn: EmbedFn
    fingerprint: str
    fingerprint_of: str  # which weights the fingerprint covers
    checkpoint: str | None = None


# The audio backbone's attribute on the model, first match; the whole model's weights are
# fingerprinted when none exists.
_AUDIO_MODULE_NAMES = ("audio_backbone", "audio_model", "audio")


def load_audio_embedder(
    config: Config,
    audio_checkpoint: str | Path | None,
    device: str | torch.device,
    shards_dir: str | Path | None = None,
) -> AudioEmbedder:
    """Build the model of `config`, load `audio_checkpoint`, freeze it: `model.embed_audio`.
    With `shards_dir`, refuse shards whose log-mels were made with another filterbank."""
    from ddeseg.data.shards import check_frontend
    from ddeseg.models import build_model, load_checkpoint

    model = build_model(config.model)
    if audio_checkpoint is not None:
        load_checkpoint(model, audio_checkpoint)
    else:
        warnings.warn(
            "no audio checkpoint: the audio backbone keeps its initial weights, so the bank only "
            "suits smoke tests; pass --audio-checkpoint (e.g. RUN_DIR/last.pt of `ddeseg pretrain-audio`)",
            MemoryBankWarning,
            stacklevel=2,
        )
    if shards_dir is not None:
        check_frontend(shards_dir, model, checkpoint=audio_checkpoint)
    model.eval().requires_grad_(False).to(device)
    audio, name = model, "model"
    for candidate in _AUDIO_MODULE_NAMES:
        if isinstance(getattr(model, candidate, None), torch.nn.Module):
            audio, name = getattr(model, candidate), candidate
            break
    return AudioEmbedder(
        embed_fn=model.embed_audio,
        fingerprint=state_dict_fingerprint(audio.state_dict()),
        fingerprint_of=f"{name}.state_dict()",
        checkpoint=str(audio_checkpoint) if audio_checkpoint is not None else None,
    )


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


@dataclass
class MemoryBankResult:
    out_dir: Path
    bank_path: Path
    json_path: Path
    cache_path: Path
    shape: tuple[int, int, int]
    stats: list[ClassStats]
    counts: dict[str, int]
    reused_embeddings: bool
    report: dict[str, Any] = field(default_factory=dict)  # the content of bank.json


@dataclass
class MemoryBankPaths:
    """What `build_memory_bank` reads and writes (its settings are `config.memory_bank`)."""

    shards: Path  # a prepared directory (`classes.json`, `{task}/train/shard-*.tar`)
    out: Path  # BANK_DIR
    audio_checkpoint: Path | None = None  # weights of the audio backbone (`ddeseg.models.load_checkpoint`)
    # read BANK_DIR/embeddings.parquet of an earlier run instead of embedding the shards again
    reuse_embeddings: bool = False


def build_memory_bank(
    config: Config,
    paths: MemoryBankPaths,
    run: RunOptions = RunOptions(),
    *,
    embed_fn: EmbedFn | None = None,
    embed_fingerprint: str | None = None,
) -> MemoryBankResult:
    """Training shards of `config.task` -> `out/bank.npy`, `bank.json`, `embeddings.parquet`,
    `config.yaml`.

    Args:
        config: `config.memory_bank` holds the settings (k, niter, nredo, seed, spherical: the
            K-Means; include_multi_source, silence_row, allow_missing_classes, missing_fill: see
            the module docstring; batch_size: clips per embedding batch; their ranges are the
            config's to check); `config.model` builds the embedder; `config.task` is the task
            whose training shards are read.
        paths: the shards, BANK_DIR, the audio checkpoint; with `reuse_embeddings` the cache
            `out/embeddings.parquet` is read instead of embedding: it must come from the same task
            and the same shard files (names and sizes), and from the same model when
            `audio_checkpoint` or `embed_fingerprint` is given.
        run: `device` (resolved once here) is the torch device for embedding, and FAISS clusters
            on the same GPU (`resolve_faiss_device`); `progress` the bars.
        embed_fn, embed_fingerprint: a replacement embedder `[B, frames, mel] -> [B, dim]` and
            its fingerprint (tests, other backbones); default: the frozen model's `embed_audio`.
    """
    # One writer of BANK_DIR (`ddeseg.runlock`); a full disk is one line naming it (the earlier
    # bank stays: every file is renamed into place).
    with writer_lock(Path(paths.out), "ddeseg build-memory-bank"), reporting_disk_full(Path(paths.out), "the memory bank"):
        started = time.perf_counter()
        out_dir, settings, task = Path(paths.out), config.memory_bank, config.task
        if out_dir.exists() and not out_dir.is_dir():  # before the embedding pass, not after it
            raise DDESegError(f"--out {out_dir} exists and is not a directory; give a folder path")
        index = ShardIndex(Path(paths.shards), need_manifest=False)  # bare shard folders are fine here
        device = resolve_device(run.device)
        faiss_gpu = resolve_faiss_device(device, explicit=run.device not in (None, "auto"))  # before embedding

        embed_started = time.perf_counter()
        table, embedding = _embedding_table(config, paths, run, index, device, embed_fn, embed_fingerprint)
        seconds = {"embed": round(time.perf_counter() - embed_started, 3)}

        names, bank_ids = index.class_names(), index.bank_class_ids(task)
        background = int(index.classes.get("background", 0))
        assignment = assign_to_classes(table, bank_ids, settings.include_multi_source, settings.silence_row, background)
        cluster_started = time.perf_counter()
        bank, stats = cluster_class_embeddings(
            assignment.by_class,
            settings.k,
            niter=settings.niter,
            seed=settings.seed,
            spherical=settings.spherical,
            gpu=faiss_gpu,
            nredo=settings.nredo,
            class_ids=bank_ids,
            class_names={i: names[i] if i < len(names) else str(i) for i in bank_ids},
            allow_missing=settings.allow_missing_classes,
            optional_classes=() if settings.silence_row else (background,),
            missing_fill=settings.missing_fill,
            progress=run.progress,
        )
        seconds["cluster"] = round(time.perf_counter() - cluster_started, 3)
        seconds["total"] = round(time.perf_counter() - started, 3)
        report = _bank_report(config, index, bank, stats, assignment, table, embedding, faiss_gpu, seconds)
        bank_path, json_path = out_dir / BANK_FILE, out_dir / BANK_JSON
        write_stage_config(config, out_dir)
        write_bytes_atomic(bank_path, encode_array(bank))
        write_bytes_atomic(json_path, (json.dumps(report, indent=1) + "\n").encode())
        return MemoryBankResult(
            out_dir, bank_path, json_path, out_dir / CACHE_FILE, tuple(bank.shape), stats, report["samples"],
            paths.reuse_embeddings, report,
        )


def _shard_list(index: ShardIndex, task: str) -> tuple[list[Path], list[list[Any]]]:
    """The task's training shards, and their names (relative to the folder) and sizes: what an
    embeddings cache must have been made from."""
    shard_paths = index.shards(task, TRAIN_SPLIT, by_folder=True)
    return shard_paths, [[str(Path(p).relative_to(index.root)), Path(p).stat().st_size] for p in shard_paths]


def _embedding_table(
    config: Config,
    paths: MemoryBankPaths,
    run: RunOptions,
    index: ShardIndex,
    device: torch.device,
    embed_fn: EmbedFn | None,
    embed_fingerprint: str | None,
) -> tuple[EmbeddingTable, dict[str, Any]]:
    """The embeddings of the task's training clips, embedded on `device` (and cached in
    BANK_DIR) or, with `paths.reuse_embeddings`, read from the cache after checking that it
    comes from the same task, shards and model; and the embedding's entry of bank.json."""
    task, audio_checkpoint, cache_path = config.task, paths.audio_checkpoint, Path(paths.out) / CACHE_FILE
    shard_paths, shard_list = _shard_list(index, task)
    if paths.reuse_embeddings:
        table, cached = read_embeddings_cache(cache_path)
        if cached.get("task") != task or cached.get("shards") != shard_list:
            raise DDESegError(
                f"{cache_path} was made from task {cached.get('task')!r} and {len(cached.get('shards') or [])} "
                f"shard(s) that differ from task {task!r} in {index.root} now; run without --reuse-embeddings"
            )
        expected = embed_fingerprint
        if expected is None and embed_fn is None and audio_checkpoint is not None:
            expected = load_audio_embedder(config, audio_checkpoint, device, index.root).fingerprint
        if expected is not None and expected != cached.get("fingerprint"):
            raise DDESegError(
                f"{cache_path} was embedded by model {cached.get('fingerprint')!r}, not the requested "
                f"{expected!r}; run without --reuse-embeddings"
            )
        info = {key: cached.get(key) for key in ("fingerprint", "fingerprint_of", "audio_checkpoint")}
        return table, {**info, "shards": shard_list, "reused": True, "device": None}
    if embed_fn is not None:
        embedder = AudioEmbedder(embed_fn, embed_fingerprint or "unknown (embed_fn given)", "embed_fn")
    else:
        embedder = load_audio_embedder(config, audio_checkpoint, device, index.root)
    table = embed_shards(
        shard_paths,
        embedder.embed_fn,
        batch_size=config.memory_bank.batch_size,
        device=device,
        progress=run.progress,
        total=index.count(task, TRAIN_SPLIT) if index.has_manifest else None,  # for the ETA only
    )
    info = {"fingerprint": embedder.fingerprint, "fingerprint_of": embedder.fingerprint_of, "audio_checkpoint": embedder.checkpoint}
    write_embeddings_cache(
        cache_path, table, {"task": task, "reads": index.reads(task), "split": TRAIN_SPLIT, "shards": shard_list, **info}
    )
    return table, {**info, "shards": shard_list, "reused": False, "device": str(device)}


def _bank_report(
    config: Config,
    index: ShardIndex,
    bank: np.ndarray,
    stats: list[ClassStats],
    assignment: Assignment,
    table: EmbeddingTable,
    embedding: dict[str, Any],
    faiss_gpu: int | None,
    seconds: dict[str, float],
) -> dict[str, Any]:
    """bank.json: the bank's shape and rows, the settings that decide it, what was embedded and
    clustered where, the shards it came from, and the time taken."""
    import faiss

    settings, names = config.memory_bank, index.class_names()
    return {
        "format": BANK_FORMAT,
        "bank_file": BANK_FILE,
        "shape": list(bank.shape),
        "dtype": "float32",
        "task": config.task,
        "reads": index.reads(config.task),
        "split": TRAIN_SPLIT,
        "classes": [
            {**asdict(entry), "present_in": assignment.present.get(entry.class_id, 0)} for entry in stats
        ],
        # the keys of config.memory_bank that decide the bank (batch_size does not)
        "settings": {key: value for key, value in asdict(settings).items() if key != "batch_size"},
        "samples": {**assignment.counts, "embedded": len(table), "unannotated_skipped": table.unannotated},
        "outside_bank": {
            names[c] if c < len(names) else str(c): n for c, n in sorted(assignment.outside_bank.items())
        },
        "embedding": {
            **{key: embedding[key] for key in ("fingerprint", "fingerprint_of", "audio_checkpoint")},
            "dim": int(bank.shape[2]),
            "cache": CACHE_FILE,
            "reused": embedding["reused"],
            "device": embedding["device"],
        },
        "faiss": {
            "version": faiss.__version__,
            "device": "cpu" if faiss_gpu is None else f"cuda:{faiss_gpu}",
        },
        "shards": embedding["shards"],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": seconds,
    }


def summary_table(result: MemoryBankResult):
    """A rich renderable: points, effective k and fill per class, then one line of totals."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"memory bank {result.bank_path} {list(result.shape)}")
    for column, justify in (
        ("row", "right"),
        ("id", "right"),
        ("class", "left"),
        ("points", "right"),
        ("in masks", "right"),
        ("k", "right"),
        ("fill", "left"),
    ):
        table.add_column(column, justify=justify)
    for entry in result.report["classes"]:
        style = "yellow" if entry["fill"] != "kmeans" else None
        table.add_row(
            str(entry["row"]),
            str(entry["class_id"]),
            entry["name"],
            str(entry["points"]),
            str(entry["present_in"]),
            str(entry["effective_k"]),
            entry["fill"],
            style=style,
        )
    counts = result.counts
    line = Text(
        f"{counts['embedded']} samples embedded{' (cache reused)' if result.reused_embeddings else ''}, "
        f"{counts['unannotated_skipped']} unannotated skipped; single-source {counts['single_source']} "
        f"(used {counts['single_source_used']}), multi-source {counts['multi_source']} (used "
        f"{counts['multi_source_used']}), silent {counts['silent']} (used {counts['silent_used']}), "
        f"outside the bank's classes {counts['outside_bank']}; {result.report['seconds']['total']:.1f} s"
    )
    return Group(table, line)
