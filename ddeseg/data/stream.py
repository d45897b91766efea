"""Streaming loaders over the WebDataset shards: training (resampled, equal steps) and evaluation
(every sample exactly once, in order).

Training (`make_train_loader`), per rank and per loader worker:

    ResampledShards (seeded by seed, epoch, rank, worker)  -> tar -> samples
    -> parse meta.json, drop unannotated frames            (cheap, before the buffer)
    -> shuffle buffer (seeded)                              (before any image decode)
    -> decode + map to task ids + augment                   (in the worker)
    -> batched (full batches only)
    WebLoader(batch_size=None).with_epoch(num_batches)      (every rank takes the same steps)

Each rank and worker draws its own seeded random sequence of shards (with replacement), as
open_clip's resampled mode does, so no shard is split by node or worker and shards of unequal
sizes or fewer shards than ranks cost nothing; the stream never ends and `with_epoch` cuts every
rank at the same number of batches. The batches of epoch `e` are a pure function of
(seed, e, rank, worker, num_workers, shards): the shard draws, the shuffle buffer and every
sample's augmentation generator (`numpy` seeded by (seed, epoch, rank, worker, sample index))
are derived from them, and the DataLoader gets its own `torch.Generator` so building a loader
never consumes the training process's global RNG (which exact resume restores).

Evaluation (`make_eval_loader`): the shards are read in sorted order and sample `i` (counting
every sample of every shard) belongs to rank `i % world_size`; within a rank, batch `b` of that
rank's samples is built by worker `b % num_workers`, which is the order in which the DataLoader
collects batches from its workers. So for any number of shards, ranks and workers every sample
is produced exactly once, and each rank sees its samples in shard order. The price: every
worker of every rank reads (without decoding) all the split's tar bytes.

Bad data: a shard that cannot be opened or is truncated, or a sample that fails to decode (bad
JPEG/PNG, missing member, wrong shapes, class ids outside the task) is logged (key, shard,
reason) and skipped. With `errors_dir`, every (loader, rank, worker) appends JSON lines to its
own file `errors_dir/{train|eval}-rank{R}-worker{W}.jsonl`; `count_data_errors(errors_dir)`
sums them (distinct shard/key pairs) for the trainer's report. A training stream that goes
`MAX_FRUITLESS` samples/shards without producing a usable sample raises `DataError` instead of
spinning forever (all shards corrupt, or no annotated frame).

Decoding uses `ddeseg.data.schema`'s own decoders (never WebDataset's `pil`/`l8` or pickle
decoders).
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from webdataset import tariterators

from ddeseg.config import Config
from ddeseg.data import schema
from ddeseg.data.augment import augment_for_training, preprocess_for_model, resize_mask
from ddeseg.data.shards import REPREPARE, ShardIndex, model_label_lut
from ddeseg.errors import DataError

logger = logging.getLogger(__name__)

ERROR_FILE_GLOB = "*.jsonl"
TAR_BLOCK = 512
MAX_FRUITLESS = 10_000  # shards/samples in a row without a usable training sample -> DataError

# Seed "purposes", so the streams derived from one (seed, epoch, rank, worker) are independent.
_SHARDS, _SHUFFLE, _LOADER = 1, 2, 3


# --------------------------------------------------------------------------------------------
# Public helpers
# --------------------------------------------------------------------------------------------


def list_shards(shards: str | Path | Iterable[str | Path]) -> list[str]:
    """Shard paths from a list, one path, or a directory (its `*.tar`, else recursively)."""
    if isinstance(shards, (str, Path)):
        path = Path(shards)
        if path.is_dir():
            # Hidden names are unfinished writes (`prepare` renames a tar when it is complete).
            found = [p for p in sorted(path.glob("*.tar")) or sorted(path.rglob("*.tar")) if not _hidden(p, path)]
            urls = [str(p) for p in found]
        else:
            urls = [str(path)]
    else:
        urls = [str(p) for p in shards]
    if not urls:
        raise DataError(f"no shards (*.tar) found in {shards}; run `ddeseg prepare` first")
    return urls


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def identity_label_lut(cfg: Config) -> np.ndarray:
    """The label map of shards outside a prepared folder: the stored ids as they are (every
    class to 1 for a one-output model). A stage that reads a prepared folder passes its task's
    map (`ShardIndex.label_lut(task, num_classes)`) instead: the loader never guesses the folder."""
    return model_label_lut(np.arange(256, dtype=np.uint8), cfg.model.num_classes)


def read_shard_samples(
    shards: str | Path | Iterable[str | Path], errors: DataErrorLog | None = None
) -> Iterator[dict[str, Any]]:
    """Raw samples of shards, in order: `{"__key__", "__url__", member: bytes}` (no decoding,
    so no pickle; decode members with `ddeseg.data.schema`).

    The one tar-reading path of ddeseg (the loaders, pretrain-audio, the memory bank and
    `inspect` all read through it), with one corrupt-shard check: a shard that cannot be opened,
    breaks off, or lacks the end-of-archive marker is reported to `errors` (the loaders log and
    skip it); without `errors` it is a `DataError` naming the shard, for stages that must see
    every sample.
    """
    urls = list_shards(shards)
    log = DataErrorLog(None, "read", 0, urls, strict=True) if errors is None else errors
    return _TarSamples(log)({"url": url} for url in urls)


def read_data_errors(errors_dir: str | Path) -> list[dict[str, Any]]:
    """All records the loaders' workers wrote under `errors_dir` (unreadable lines skipped)."""
    records = []
    directory = Path(errors_dir)
    if not directory.is_dir():
        return records
    for path in sorted(directory.glob(ERROR_FILE_GLOB)):
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a killed worker
    return records


def count_data_errors(errors_dir: str | Path) -> int:
    """Number of distinct bad items (sample key, or shard tail for a truncated shard) logged."""
    return len({(r.get("shard"), r.get("key")) for r in read_data_errors(errors_dir)})


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


def make_train_loader(
    shards: str | Path | Iterable[str | Path],
    cfg: Config,
    *,
    seed: int,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_batches: int,
    errors_dir: str | Path | None = None,
    label_lut: np.ndarray | None = None,
    num_workers: int | None = None,
    batch_size: int | None = None,
) -> wds.WebLoader:
    """The training stream of one rank for one epoch: exactly `num_batches` batches.

    Args:
        shards: shard paths, or a directory of them.
        cfg: run config (`data.*`, `model.num_classes`, `model.frontend.mel_bins`, `task`).
        seed, epoch, rank: determine the stream (with the worker index); `world_size` is only
            checked (each rank draws its own shards, see the module docstring).
        num_batches: batches this loader yields (the same on every rank).
        errors_dir: where workers log skipped data (JSONL), see `count_data_errors`.
        label_lut: unified id -> task id map (`ShardIndex.label_lut(task, num_classes)`);
            default: the ids as they are (`identity_label_lut`).
        num_workers, batch_size: default `cfg.data.num_workers`, `cfg.data.batch_size`.
    Yields:
        dicts: `image` float32 `[B, 3, S, S]` (ImageNet-normalised), `mask` int64 `[B, S, S]`
        (task class ids; 255 = ignore), `logmel` float32 `[B, 1, frames, mel_bins]`, `key`
        list[str], `classes` list[list[int]] (task ids present), `orig_size` int64 `[B, 2]`
        (H, W before augmentation), `video` list[str] and `frame` int64 `[B]` (the raw ids of
        `meta.json`), `silent` bool `[B]`.
    """
    _check_rank(rank, world_size)
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed} epoch={epoch}")
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    urls = list_shards(shards)
    lut = identity_label_lut(cfg) if label_lut is None else label_lut
    batch_size = cfg.data.batch_size if batch_size is None else batch_size
    num_workers = cfg.data.num_workers if num_workers is None else num_workers
    shuffle_buffer = cfg.data.shuffle_buffer
    errors = DataErrorLog(
        errors_dir, "train", rank, urls, epoch=epoch, fruitless_limit=max(MAX_FRUITLESS, 10 * shuffle_buffer)
    )
    stream = _StreamSeeds(seed, epoch, rank)

    dataset = wds.DataPipeline(
        wds.ResampledShards(urls, seed=stream.base, worker_seed=stream.shard_seed, deterministic=True),
        _TarSamples(errors),
        _MetaStage(errors, annotated_only=True),
        _ShuffleStage(stream, shuffle_buffer),
        _TrainDecodeStage(cfg, lut, errors, stream),
        wds.batched(batch_size, collation_fn=collate_samples, partial=False),
    )
    return _web_loader(dataset, num_workers, stream.loader_seed()).with_epoch(num_batches)


def make_eval_loader(
    shards: str | Path | Iterable[str | Path],
    cfg: Config,
    rank: int = 0,
    world_size: int = 1,
    *,
    errors_dir: str | Path | None = None,
    label_lut: np.ndarray | None = None,
    num_workers: int | None = None,
    batch_size: int | None = None,
    annotated_only: bool = True,
) -> wds.WebLoader:
    """This rank's share of the split, every sample of the split once over all ranks, in order.

    Images go through `preprocess_for_model`; masks are resized (nearest) to `image_size`, as
    the official evaluation scores them. `annotated_only=False` also yields frames without a
    mask (their `mask` is all `IGNORE_INDEX`), for prediction. Batches hold up to
    `cfg.data.eval_batch_size` samples (fewer at the end, or when samples were skipped); keys
    and tensors as `make_train_loader`, plus `annotated` bool `[B]`.
    """
    _check_rank(rank, world_size)
    urls = list_shards(shards)
    lut = identity_label_lut(cfg) if label_lut is None else label_lut
    batch_size = cfg.data.eval_batch_size if batch_size is None else batch_size
    num_workers = cfg.data.num_workers if num_workers is None else num_workers
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    errors = DataErrorLog(errors_dir, "eval", rank, urls)

    dataset = wds.DataPipeline(
        wds.SimpleShardList(urls),  # every worker reads every shard; _EvalAssignStage splits
        _TarSamples(errors),
        _EvalAssignStage(rank, world_size, batch_size),
        _MetaStage(errors, annotated_only=annotated_only),
        _EvalDecodeStage(cfg, lut, errors),
        _group_batches,
    )
    return _web_loader(dataset, num_workers, seed=0)


def _web_loader(dataset: wds.DataPipeline, num_workers: int, seed: int) -> wds.WebLoader:
    return wds.WebLoader(
        dataset,
        batch_size=None,  # batched inside the dataset, in the workers
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        # The DataLoader draws its workers' base seed from this generator, not from the global
        # torch RNG, which a resumed run restores and must not see consumed by loader creation.
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_ignore_stop_signals if num_workers > 0 else None,
    )


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers ignore Ctrl-C and SIGTERM (a terminal or a scheduler sends them to the whole
    process group): the training process decides when to stop, at a step boundary, and a worker
    that died first would fail the batches of the step it finishes. Workers still exit with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


# --------------------------------------------------------------------------------------------
# Seeds and the error log
# --------------------------------------------------------------------------------------------


def derive_seed(*parts: int) -> int:
    """A 31-bit seed mixing non-negative integers (numpy SeedSequence, stable across runs)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


class _StreamSeeds:
    """Seeds of one (seed, epoch, rank) stream; the worker index is read where they are used."""

    def __init__(self, seed: int, epoch: int, rank: int) -> None:
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.base = derive_seed(seed, epoch, rank)

    def shard_seed(self) -> int:
        return derive_seed(self.seed, self.epoch, self.rank, _worker()[0], _SHARDS)

    def shuffle_seed(self) -> int:
        return derive_seed(self.seed, self.epoch, self.rank, _worker()[0], _SHUFFLE)

    def loader_seed(self) -> int:
        return derive_seed(self.seed, self.epoch, self.rank, _LOADER)

    def sample_rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, self.rank, _worker()[0], index])


class DataErrorLog:
    """Logs skipped data (key, shard, reason) and, with a directory, appends it as JSON lines.

    One instance is copied into every worker; each writes its own file, so no two processes
    share one. Each (shard, key) is written once per worker (a resampled bad shard comes back).
    """

    def __init__(
        self,
        directory: str | Path | None,
        stage: str,
        rank: int,
        urls: list[str],
        epoch: int | None = None,
        fruitless_limit: int | None = None,
        strict: bool = False,
    ) -> None:
        self.directory = None if directory is None else Path(directory)
        self.strict = strict  # raise DataError at the first problem instead of logging it
        self.stage, self.rank, self.epoch = stage, rank, epoch
        self.urls = sorted(urls, key=len, reverse=True)  # longest first: no prefix mis-match
        self.count = 0  # skips recorded by this process
        self.fruitless = 0  # items in a row that yielded no usable sample
        self.fruitless_limit = fruitless_limit  # None: never give up (finite evaluation streams)
        self._seen: set[tuple[str | None, str | None]] = set()

    def record(self, shard: str | None, key: str | None, reason: str) -> None:
        if self.strict:
            sample = f" (sample {key!r})" if key else ""
            raise DataError(f"{shard or 'a shard'}{sample}: {reason}; {REPREPARE}")
        self.count += 1
        self.note_fruitless()
        if (shard, key) in self._seen:
            return
        self._seen.add((shard, key))
        worker = _worker()[0]
        logger.warning("skipped %s data: key=%s shard=%s: %s", self.stage, key, shard, reason)
        if self.directory is None:
            return
        record = {
            "stage": self.stage,
            "rank": self.rank,
            "worker": worker,
            "epoch": self.epoch,
            "shard": shard,
            "key": key,
            "reason": reason,
        }
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{self.stage}-rank{self.rank:03d}-worker{worker:02d}.jsonl"
        with path.open("a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")

    def handler(self, exn: BaseException) -> bool:
        """WebDataset exception handler for shard/tar-level errors: record, then continue."""
        shard = self._shard_of(exn)
        reason = f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}"
        self.record(shard, None, reason)
        return True

    def note_fruitless(self) -> None:
        self.fruitless += 1
        if self.fruitless_limit is not None and self.fruitless > self.fruitless_limit:
            where = f"; see {self.directory}" if self.directory else ""
            raise DataError(
                f"the {self.stage} stream read {self.fruitless} samples/shards in a row without a usable"
                f" annotated sample ({self.count} skipped as corrupt){where}: check the shards"
            )

    def note_success(self) -> None:
        self.fruitless = 0

    def _shard_of(self, exn: BaseException) -> str | None:
        texts = [str(arg) for arg in getattr(exn, "args", ())]
        for url in self.urls:
            if any(url in text for text in texts):
                return url
        return None


# --------------------------------------------------------------------------------------------
# Pipeline stages (picklable callables: each runs inside a loader worker)
# --------------------------------------------------------------------------------------------


class _TarSamples:
    """`wds.tarfile_to_samples` with a check that each local shard ends like a complete tar.

    Python's `tarfile` reads a file cut inside a header block as a clean end of archive, so a
    truncated shard could silently lose its tail; a complete tar ends with two zero blocks and
    is a whole number of blocks long. A shard failing the check is logged, and its intact
    samples are still read (a member cut short raises and is logged by the handler).
    """

    def __init__(self, errors: DataErrorLog) -> None:
        self.errors = errors

    def __call__(self, shards: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        handler = self.errors.handler
        streams = self._check_tails(tariterators.url_opener(shards, handler=handler))
        return tariterators.group_by_keys(self._files(streams), handler=handler)

    def _files(self, streams: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for source in streams:
            yield from tariterators.tar_file_expander([source], handler=self.errors.handler)
            # End the shard's last sample even when its tar broke off (the expander then sends
            # no end marker): otherwise it would absorb the files of the next shard drawn.
            yield {}

    def _check_tails(self, streams: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for source in streams:
            reason = tar_tail_problem(source["url"])
            if reason is not None:
                self.errors.record(source["url"], None, reason)
            yield source


def tar_tail_problem(path: str) -> str | None:
    """Why the local tar at `path` is not complete (None: it is, or it is not a local file)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            handle.seek(max(0, size - 2 * TAR_BLOCK))
            tail = handle.read(2 * TAR_BLOCK)
    except OSError:
        return None  # a URL or pipe: the tar reader reports what it finds
    if size % TAR_BLOCK or size < 2 * TAR_BLOCK or tail.count(0) != len(tail):
        return f"truncated tar: {size} bytes, no end-of-archive marker"
    return None


class _MetaStage:
    """Parse `meta.json` into `sample["__meta__"]`; drop unannotated frames when asked."""

    def __init__(self, errors: DataErrorLog, annotated_only: bool) -> None:
        self.errors, self.annotated_only = errors, annotated_only

    def __call__(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in samples:
            key, shard = sample.get("__key__"), sample.get("__url__")
            try:
                if schema.META not in sample:
                    raise ValueError(f"no {schema.META} member (members: {_members(sample)})")
                meta = schema.SampleMeta.from_json(sample[schema.META])
            except Exception as error:  # noqa: BLE001 - any bad sample is skipped, not fatal
                self.errors.record(shard, key, f"meta: {type(error).__name__}: {error}")
                continue
            if self.annotated_only and not meta.annotated:
                self.errors.note_fruitless()
                continue
            sample["__meta__"] = meta
            yield sample


class _ShuffleStage:
    def __init__(self, seeds: _StreamSeeds, buffer: int) -> None:
        self.seeds, self.buffer = seeds, buffer

    def __call__(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        if self.buffer < 2:
            yield from samples
            return
        initial = max(1, self.buffer // 10)
        yield from wds.shuffle(self.buffer, initial=initial, seed=self.seeds.shuffle_seed())(samples)


class _DecodeBase:
    """Shared decoding of one shard sample into arrays, with the checks a batch relies on."""

    def __init__(self, cfg: Config, lut: np.ndarray, errors: DataErrorLog) -> None:
        if lut.shape != (256,) or lut.dtype != np.uint8:
            raise ValueError(f"label lut must be uint8 [256], got {lut.dtype} {lut.shape}")
        self.cfg, self.lut, self.errors = cfg, lut, errors
        # Which mapped ids a mask may hold: the model's classes and the ignore label.
        self.allowed = np.zeros(256, dtype=bool)
        self.allowed[: max(2, cfg.model.num_classes)] = True
        self.allowed[schema.IGNORE_INDEX] = True
        self.mel_bins = cfg.model.frontend.mel_bins
        self.logmel_shape: tuple[int, ...] | None = None  # fixed by the first sample

    def decode(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Arrays of one sample; `mask` (task ids) is None for an unannotated frame."""
        meta: schema.SampleMeta = sample["__meta__"]
        image = schema.decode_image(sample[schema.image_member(sample)])
        if (image.shape[0], image.shape[1]) != (meta.height, meta.width):
            raise ValueError(f"image is {image.shape[:2]}, meta.json says {(meta.height, meta.width)}")
        if schema.LOGMEL not in sample:
            raise ValueError(f"no {schema.LOGMEL} member (members: {_members(sample)})")
        logmel = schema.decode_array(sample[schema.LOGMEL])
        if logmel.ndim != 2 or logmel.shape[1] != self.mel_bins:
            raise ValueError(f"log-mel has shape {logmel.shape}, expected [frames, {self.mel_bins}]")
        if self.logmel_shape is None:
            self.logmel_shape = logmel.shape
        elif logmel.shape != self.logmel_shape:
            raise ValueError(f"log-mel has shape {logmel.shape}, other samples {self.logmel_shape}")
        if not np.isfinite(logmel).all():
            raise ValueError("log-mel has NaN/inf values")
        mask = None
        if meta.annotated:
            if schema.MASK not in sample:
                raise ValueError(f"annotated sample has no {schema.MASK} member")
            unified = schema.decode_mask(sample[schema.MASK])
            if unified.shape != image.shape[:2]:
                raise ValueError(f"mask is {unified.shape}, image is {image.shape[:2]}")
            mask = self.lut[unified]
            if not self.allowed[mask].all():
                bad = sorted(set(np.unique(unified[~self.allowed[mask]]).tolist()))
                raise ValueError(f"mask ids {bad} map outside the {self.cfg.model.num_classes} classes of the model")
        classes = sorted({int(self.lut[c]) for c in meta.classes if 0 < c < 256} - {0, schema.IGNORE_INDEX})
        return {"meta": meta, "image": image, "mask": mask, "logmel": logmel, "classes": classes}

    def fail(self, sample: dict[str, Any], error: Exception) -> None:
        self.errors.record(sample.get("__url__"), sample.get("__key__"), f"{type(error).__name__}: {error}")


class _TrainDecodeStage(_DecodeBase):
    def __init__(self, cfg: Config, lut: np.ndarray, errors: DataErrorLog, seeds: _StreamSeeds) -> None:
        super().__init__(cfg, lut, errors)
        self.seeds = seeds

    def __call__(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        # The sample index counts every sample reaching this stage (bad ones too), so one bad
        # sample does not shift the augmentation of all that follow.
        for index, sample in enumerate(samples):
            try:
                decoded = self.decode(sample)
                meta = decoded["meta"]
                if decoded["mask"] is None:
                    raise ValueError("frame is not annotated (no mask to train on)")
                image, mask, logmel, _ = augment_for_training(
                    decoded["image"], decoded["mask"], meta.union_box, decoded["logmel"], self.cfg,
                    self.seeds.sample_rng(index),
                )
            except Exception as error:  # noqa: BLE001 - any bad sample is skipped, not fatal
                self.fail(sample, error)
                continue
            self.errors.note_success()
            yield {"image": image, "mask": mask, "logmel": logmel, **_identity(sample, decoded)}


def _identity(sample: dict[str, Any], decoded: dict[str, Any]) -> dict[str, Any]:
    """The fields of a batch item that say which frame it is (shared by train and eval)."""
    meta = decoded["meta"]
    return {
        "key": sample["__key__"],
        "classes": decoded["classes"],
        "orig_size": (meta.height, meta.width),
        "video": meta.video,
        "frame": meta.frame,
        "silent": meta.silent,
    }


class _EvalAssignStage:
    """Keep the samples of this (rank, worker); tag each with its batch number within the rank."""

    def __init__(self, rank: int, world_size: int, batch_size: int) -> None:
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size

    def __call__(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        worker, num_workers = _worker()
        for index, sample in enumerate(samples):
            if index % self.world_size != self.rank:
                continue
            batch = (index // self.world_size) // self.batch_size
            if batch % num_workers == worker:
                sample["__batch__"] = batch
                yield sample


class _EvalDecodeStage(_DecodeBase):
    def __call__(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        size = self.cfg.data.image_size
        for sample in samples:
            try:
                decoded = self.decode(sample)
                image, logmel = preprocess_for_model(decoded["image"], decoded["logmel"], self.cfg)
                if decoded["mask"] is None:
                    mask = np.full((size, size), schema.IGNORE_INDEX, dtype=np.uint8)
                else:
                    mask = resize_mask(decoded["mask"], size)
            except Exception as error:  # noqa: BLE001 - any bad sample is skipped, not fatal
                self.fail(sample, error)
                continue
            meta = decoded["meta"]
            yield {
                "image": image,
                "mask": torch.from_numpy(mask.astype(np.int64)),
                "logmel": logmel,
                **_identity(sample, decoded),
                "annotated": meta.annotated,
                "__batch__": sample["__batch__"],
            }


def _group_batches(samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Collate consecutive samples that share a batch number."""
    current: list[dict[str, Any]] = []
    for sample in samples:
        if current and sample["__batch__"] != current[0]["__batch__"]:
            yield collate_samples(current)
            current = []
        current.append(sample)
    if current:
        yield collate_samples(current)


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack decoded samples into the batch dict documented in `make_train_loader`."""
    batch: dict[str, Any] = {
        "image": torch.stack([s["image"] for s in samples]),
        "mask": torch.stack([s["mask"] for s in samples]),
        "logmel": torch.stack([s["logmel"] for s in samples]),
        "key": [s["key"] for s in samples],
        "classes": [s["classes"] for s in samples],
        "orig_size": torch.tensor([s["orig_size"] for s in samples], dtype=torch.int64),
        "video": [s["video"] for s in samples],
        "frame": torch.tensor([s["frame"] for s in samples], dtype=torch.int64),
        "silent": torch.tensor([s["silent"] for s in samples], dtype=torch.bool),
    }
    if "annotated" in samples[0]:
        batch["annotated"] = torch.tensor([s["annotated"] for s in samples], dtype=torch.bool)
    return batch


def _members(sample: dict[str, Any]) -> list[str]:
    return sorted(k for k in sample if not k.startswith("__"))


def find_sample(index: ShardIndex, key: str) -> tuple[dict[str, Any], str]:
    """The stored sample `key` of a prepared folder (members as bytes) and its shard (relative to
    the folder), located through the manifest; a `DataError` names what is missing."""
    shard = index.shard_of(key)
    for sample in read_shard_samples([str(index.root / shard)]):
        if sample["__key__"] == key:
            return sample, shard
    raise DataError(f"{index.root / shard}: sample {key!r} listed in the manifest is missing from its shard")
