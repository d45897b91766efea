"""Benchmark of the training data path: our streaming loader against official-style per-file
loaders, and the steps/s of a tiny training run on the CPU.

    .venv/bin/python benchmarks/bench_loader.py [--videos 12] [--workers 2] [--batches 24]
                                                [--batch-size 8] [--image-size 224] [--rounds 2]
                                                [--baseline-augment {ours,official,both}]
                                                [--steps 20] [--json results.json]

1. Data: `generate("ddeseg", ...)` writes a synthetic v2 dataset in DDESeg's raw layout
   (`AVSSData/v2/{video}/frames/{i}.jpg`, `labels_semantic/{i}.png`, `audios/{i}.wav` at 16 kHz,
   `avss_bbox_orisize.json`), and the prepare stage turns it into shards, as `ddeseg prepare`.
2. Loaders, in this process and run, on the same train split, with the same number of workers,
   batch size, output image size and augmentation recipe (config `data.augment`: box-constrained
   crop, flip, colour jitter, resize, ImageNet normalisation, SpecAugment), all producing the
   batches the trainer consumes (`collate_samples`: `image`, `mask`, `logmel`, ...):
   - streaming: `make_train_loader` on the shards (JPEG bytes, index PNG, float16 log-mel),
     augmented by `ddeseg.data.augment` (colour jitter after the resize, on `image_size`^2 pixels);
   - per-file: a map-style `Dataset` doing per item what the official `AVSSDataLoadImg` does:
     PIL decode of the JPEG frame and the PNG mask, `librosa.load` of the one-second 16 kHz wav
     resampled to 22.05 kHz, repeat-padding to the clip length. The official loader returns
     the waveform and its model computes the log-mel; to compare equal outputs, the worker
     computes it per sample with the model's `LogMelFrontend`. Two ways to augment
     (`--baseline-augment`, default both, each its own loader and ratio):
     - `ours` (`per_file_ours`): the same `ddeseg.data.augment` calls as the streaming loader, so
       that ratio measures reading and decoding only;
     - `official` (`per_file_official`): the official transform with torchvision on PIL images,
       in its order (`dataload/data_augmentation.py`: crop on numpy copies, flip, `ColorJitter` at
       the frame's resolution, `Resize` bilinear / nearest, `ToTensor`, `Normalize`), so that
       ratio measures our whole design against the official way.
   Measured:
   - samples/s with `--workers` workers, the loaders alternating for `--rounds` rounds (the
     best round of each is reported: the machine may be shared). Steady state: the batches
     after the first `workers` (worker start-up excluded); end to end: from `iter(loader)`.
   - CPU ms per sample in this process (no workers, one torch thread), which does not depend on
     other load; and, for each per-file loader, the CPU ms of each of its steps.
3. `ddeseg.pipelines.train.train` with `configs/tiny.yaml` for `--steps` steps on the CPU (random
   memory bank); steps/s from its `metrics.jsonl` windows after the first (the first holds the
   loader start-up), and the wall time of the whole call (model build, final validation and
   checkpoints included).
Every number is measured here, in this run; ratios compare within the run only.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
TASK = "v2"
# The tiny model has 3 classes (background + 2): the synthetic data must not have more.
SYNTH_CLASSES = 2
COST_BATCHES = 6  # batches timed per loader for the in-process CPU cost
# How the per-file baseline augments: "ours" calls `ddeseg.data.augment` (only reading and
# decoding differ from the streaming loader); "official" does it the official way (torchvision
# transforms on PIL images, colour jitter at the original resolution before the resize).
BASELINE_AUGMENTS = ("ours", "official")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def build_data(work: Path, videos: int, image_size: int, cfg: Any) -> tuple[Path, Path, dict[str, float]]:
    """Raw `ddeseg`-layout dataset and its shards under `work`; returns (raw, shards, seconds)."""
    from ddeseg.pipelines.prepare import PreparePaths, prepare
    from ddeseg.pipelines.synth import generate
    from ddeseg.stage import RunOptions

    raw, shards = work / "raw", work / "shards"
    started = time.perf_counter()
    generate("ddeseg", raw, videos=videos, classes=SYNTH_CLASSES, seed=0, image_size=image_size, tasks=[TASK])
    generated = time.perf_counter()
    prepare(cfg, PreparePaths(layout="ddeseg", root=raw, out=shards, tasks=[TASK]), RunOptions(device="cpu", progress=False))
    return raw, shards, {"generate_s": generated - started, "prepare_s": time.perf_counter() - generated}


class PerFileTrainDataset(torch.utils.data.Dataset):
    """Map-style training set over the raw `ddeseg` layout, reading and decoding every file per item.

    Items follow the rows of `metadata_w_silent.csv` (uid at 1, split at 4, subset at 5) of
    `split`/`subset`; the sounding boxes come from `avss_bbox_orisize.json`, read once, as the
    official loader does. Each item is the dict that `ddeseg.data.stream.collate_samples` batches.
    """

    def __init__(
        self,
        avss_root: Path,
        cfg: Any,
        label_lut: np.ndarray,
        augment: str = "ours",
        split: str = "train",
        subset: str = TASK,
    ):
        import torchvision.transforms as T

        from ddeseg.data.augment import IMAGENET_MEAN, IMAGENET_STD
        from ddeseg.models.frontend import LogMelFrontend

        if augment not in BASELINE_AUGMENTS:
            raise ValueError(f"augment must be one of {BASELINE_AUGMENTS}, got {augment!r}")
        self.root, self.cfg, self.label_lut, self.augment = avss_root, cfg, label_lut, augment
        # The official way's transforms (`augment="official"`), torchvision on PIL images. The
        # strengths come from the config, which holds the official values (crop 0.6 and
        # 0.75..1.33, flip, jitter 0.2, 0.2, 0.2, 0.1), so both variants draw from the same recipe.
        size = (cfg.data.image_size, cfg.data.image_size)
        self.official_jitter = T.ColorJitter(*cfg.data.augment.color_jitter)
        self.official_resize_image = T.Resize(size, interpolation=T.InterpolationMode.BILINEAR)
        self.official_resize_mask = T.Resize(size, interpolation=T.InterpolationMode.NEAREST)
        self.official_to_input = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.sample_rate_hz = cfg.model.frontend.sample_rate
        self.clip_samples = int(cfg.data.clip_seconds * self.sample_rate_hz)
        self.frontend = LogMelFrontend(cfg.model.frontend).eval()
        self.boxes = json.loads((avss_root / "avss_bbox_orisize.json").read_text())
        self.items: list[tuple[str, str, int, bool]] = []  # (subset, video, frame, silent)
        with (avss_root / "metadata_w_silent.csv").open(newline="") as handle:
            rows = csv.reader(handle)
            header = [name.lower() for name in next(rows)]
            silent_column = header.index("silent") if "silent" in header else None
            for row in rows:
                if row[4] != split or row[5] != subset:
                    continue
                video, frame = row[1].rsplit("_", 1)
                silent = silent_column is not None and row[silent_column] in ("1", "true")
                self.items.append((row[5], video, int(frame), silent))
        if not self.items:
            raise ValueError(f"no {subset} {split} rows in {avss_root / 'metadata_w_silent.csv'}")
        # librosa imports its loader and resampler on first use (seconds); do it here, before the
        # workers fork, so the baseline does not pay that in every worker.
        self.read_waveform(self.paths(0)["audio"])
        self._rng: np.random.Generator | None = None
        self._rng_seed: int | None = None

    def __len__(self) -> int:
        return len(self.items)

    def paths(self, index: int) -> dict[str, Path]:
        subset, video, frame, _ = self.items[index]
        folder = self.root / subset / video
        return {
            "image": folder / "frames" / f"{frame}.jpg",
            "mask": folder / "labels_semantic" / f"{frame}.png",
            "audio": folder / "audios" / f"{frame}.wav",
        }

    @staticmethod
    def read_image(path: Path) -> np.ndarray:
        from PIL import Image

        with Image.open(path) as picture:
            return np.asarray(picture.convert("RGB"))

    def read_mask(self, path: Path) -> np.ndarray:
        from PIL import Image

        with Image.open(path) as picture:
            return self.label_lut[np.asarray(picture.convert("L"))]

    @staticmethod
    def open_image(path: Path) -> Any:
        """The official way: `Image.open(path).convert("RGB")`, a decoded PIL image."""
        from PIL import Image

        with Image.open(path) as picture:
            return picture.convert("RGB")

    @staticmethod
    def open_mask(path: Path) -> Any:
        """The official way: `Image.open(path).convert("L")`, raw ids (mapped after the resize)."""
        from PIL import Image

        with Image.open(path) as picture:
            return picture.convert("L")

    def read_waveform(self, path: Path) -> np.ndarray:
        import librosa

        audio, _ = librosa.load(path, sr=self.sample_rate_hz, mono=True)  # 16 kHz file -> 22.05 kHz
        return np.tile(audio, math.ceil(self.clip_samples / len(audio)))[: self.clip_samples]

    def logmel(self, waveform: np.ndarray) -> np.ndarray:
        """float32 `[samples]` -> `[frames, mel_bins]`, one sample through the model's front end."""
        with torch.no_grad():
            return self.frontend(torch.from_numpy(waveform)[None])[0].numpy()

    def generator(self) -> np.random.Generator:
        """This process's augmentation generator (seeded by the DataLoader's worker seed)."""
        info = torch.utils.data.get_worker_info()
        seed = 0 if info is None else info.seed
        if self._rng is None or self._rng_seed != seed:
            self._rng, self._rng_seed = np.random.default_rng(seed), seed
        return self._rng

    def augment_official(
        self, image: Any, mask: Any, box: list[float] | None, logmel: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The official training transform of a PIL frame and mask, its operations in its order.

        1. The box-constrained crop on numpy copies of both (the official converts the PIL images
           to arrays for it, box or not); `random_box_crop` is the same rule (one draw, kept when
           >= 0.6 of the box stays in).
        2. Back to PIL; horizontal flip of both with probability 0.5 (`TF.hflip`).
        3. `T.ColorJitter` on the PIL frame at its (cropped) original resolution.
        4. `T.Resize` to `image_size`^2: frame bilinear, mask nearest.
        5. `T.ToTensor`, `T.Normalize` (ImageNet); the mask as int64.
        The official has no id map (its v2 ids are the unified ids) and does SpecAugment in the
        model; both are done here as the streaming loader does them, so the outputs are equal.
        """
        import torchvision.transforms.functional as TF
        from PIL import Image

        from ddeseg.data.augment import logmel_tensor, random_box_crop, spec_augment_logmel

        augment = self.cfg.data.augment
        image_np, mask_np, _ = random_box_crop(
            np.array(image), np.array(mask), box, rng, augment.crop_scale_min, tuple(augment.crop_ratio)
        )
        image, mask = Image.fromarray(image_np), Image.fromarray(mask_np)
        if rng.random() < 0.5 and augment.hflip:
            image, mask = TF.hflip(image), TF.hflip(mask)
        image = self.official_jitter(image)
        image, mask = self.official_resize_image(image), self.official_resize_mask(mask)
        image_t = self.official_to_input(image)
        mask_t = torch.from_numpy(self.label_lut[np.asarray(mask)].astype(np.int64))
        if augment.spec_augment:
            logmel = spec_augment_logmel(logmel, rng)
        return image_t, mask_t, logmel_tensor(logmel)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from ddeseg.data.augment import augment_for_training

        _, video, frame, silent = self.items[index]
        paths = self.paths(index)
        box = self.boxes.get(f"{video}_{frame}")
        if self.augment == "official":
            picture, mask = self.open_image(paths["image"]), self.open_mask(paths["mask"])
            orig_size = (picture.height, picture.width)
            logmel = self.logmel(self.read_waveform(paths["audio"]))
            image_t, mask_t, logmel_t = self.augment_official(picture, mask, box, logmel, self.generator())
        else:
            image, mask = self.read_image(paths["image"]), self.read_mask(paths["mask"])
            orig_size = image.shape[:2]
            logmel = self.logmel(self.read_waveform(paths["audio"]))
            image_t, mask_t, logmel_t, _ = augment_for_training(
                image, mask, box, logmel, self.cfg, self.generator()
            )
        present = np.flatnonzero(np.bincount(mask_t.numpy().ravel(), minlength=256))
        return {
            "image": image_t,
            "mask": mask_t,
            "logmel": logmel_t,
            "key": f"{video}_{frame}",
            "classes": [int(c) for c in present if c not in (0, 255)],
            "orig_size": orig_size,
            "video": video,
            "frame": frame,
            "silent": silent,
        }


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


def time_batches(loader: Any, batches: int, warmup: int) -> dict[str, Any]:
    """Iterate `batches` batches; samples/s after the first `warmup` batches and end to end."""
    started = time.perf_counter()
    marks: list[float] = []
    sizes: list[int] = []
    shapes: dict[str, list[int]] = {}
    for batch in loader:
        marks.append(time.perf_counter())
        sizes.append(int(batch["image"].shape[0]))
        shapes = {name: list(batch[name].shape) for name in ("image", "mask", "logmel")}
        if len(marks) == batches:
            break
    if len(marks) <= warmup:
        raise RuntimeError(f"the loader gave {len(marks)} batches, need more than {warmup} (warm-up)")
    return {
        "batches": len(marks),
        "samples": sum(sizes),
        "steady_samples_per_s": sum(sizes[warmup:]) / (marks[-1] - marks[warmup - 1]),
        "end_to_end_samples_per_s": sum(sizes) / (marks[-1] - started),
        "first_batch_s": marks[0] - started,
        "shapes": shapes,
    }


def cpu_ms_per_sample(loader: Any, batches: int) -> float:
    """CPU time of this process per sample over `batches` batches, after one warm-up batch."""
    iterator = iter(loader)
    next(iterator)
    started, samples = time.process_time(), 0
    for _ in range(batches):
        samples += int(next(iterator)["image"].shape[0])
    return 1e3 * (time.process_time() - started) / samples


def cpu_ms(function: Callable[[], Any], repeats: int = 20) -> float:
    function()
    started = time.process_time()
    for _ in range(repeats):
        function()
    return 1e3 * (time.process_time() - started) / repeats


def per_file_stage_ms(dataset: PerFileTrainDataset) -> dict[str, float]:
    """CPU ms of each step of the per-file loader's item 0, augmented the dataset's way.

    `color_jitter` is the jitter alone, part of `augment`: at the output size for "ours" (after
    the resize), at the frame's size for "official" (before it).
    """
    from ddeseg.data.augment import augment_for_training, color_jitter, resize_image

    paths = dataset.paths(0)
    waveform = dataset.read_waveform(paths["audio"])
    logmel = dataset.logmel(waveform)
    _, video, frame, _ = dataset.items[0]
    box = dataset.boxes.get(f"{video}_{frame}")
    rng = np.random.default_rng(0)
    augment = dataset.cfg.data.augment
    if dataset.augment == "official":
        picture, mask = dataset.open_image(paths["image"]), dataset.open_mask(paths["mask"])
        decode_image, decode_mask = dataset.open_image, dataset.open_mask

        def augmented() -> Any:
            return dataset.augment_official(picture, mask, box, logmel, rng)

        def jittered() -> Any:
            return dataset.official_jitter(picture)
    else:
        image, mask = dataset.read_image(paths["image"]), dataset.read_mask(paths["mask"])
        decode_image, decode_mask = dataset.read_image, dataset.read_mask
        resized = resize_image(image, dataset.cfg.data.image_size)

        def augmented() -> Any:
            return augment_for_training(image, mask, box, logmel, dataset.cfg, rng)

        def jittered() -> Any:
            return color_jitter(resized, rng, tuple(augment.color_jitter))

    return {
        "jpeg_decode": cpu_ms(lambda: decode_image(paths["image"])),
        "png_decode": cpu_ms(lambda: decode_mask(paths["mask"])),
        "wav_load_resample": cpu_ms(lambda: dataset.read_waveform(paths["audio"])),
        "logmel_frontend": cpu_ms(lambda: dataset.logmel(waveform)),
        "augment": cpu_ms(augmented),
        "color_jitter": cpu_ms(jittered),
        "whole_item": cpu_ms(lambda: dataset[0]),
    }


def bench_loaders(
    raw: Path,
    shards: Path,
    cfg: Any,
    workers: int,
    batches: int,
    batch_size: int,
    rounds: int,
    baselines: tuple[str, ...] = BASELINE_AUGMENTS,
) -> dict[str, Any]:
    """The streaming loader against the per-file loader of each of `baselines` (augment ways).

    Loaders are named `streaming` and `per_file_{augment}`; the ratios are keyed by augment way.
    """
    from ddeseg.data.shards import ShardIndex
    from ddeseg.data.stream import collate_samples, list_shards, make_train_loader

    train_shards = list_shards(shards / TASK / "train")
    # The same id map for all; for the synthetic v2 data raw mask ids are the unified ids.
    label_lut = ShardIndex(shards, need_manifest=False).label_lut(cfg.task, cfg.model.num_classes)
    datasets = {way: PerFileTrainDataset(raw / "AVSSData", cfg, label_lut, augment=way) for way in baselines}

    def streaming(num_workers: int, num_batches: int, seed: int) -> Any:
        return make_train_loader(
            train_shards,
            cfg,
            seed=seed,
            num_batches=num_batches,
            label_lut=label_lut,
            num_workers=num_workers,
            batch_size=batch_size,
        )

    def per_file(dataset: PerFileTrainDataset) -> Callable[[int, int, int], Any]:
        def make(num_workers: int, num_batches: int, seed: int) -> Any:
            # Without replacement, as many permutations as the batches need (several epochs).
            sampler = torch.utils.data.RandomSampler(
                dataset, num_samples=num_batches * batch_size, generator=torch.Generator().manual_seed(seed)
            )
            return torch.utils.data.DataLoader(
                dataset,
                batch_size=batch_size,
                sampler=sampler,
                num_workers=num_workers,
                collate_fn=collate_samples,
                drop_last=True,
            )

        return make

    factories: dict[str, Callable[[int, int, int], Any]] = {"streaming": streaming}
    factories.update({f"per_file_{way}": per_file(dataset) for way, dataset in datasets.items()})
    results: dict[str, Any] = {
        "train_items": len(next(iter(datasets.values()))),
        "baselines": list(baselines),
    }

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a loader worker
    try:
        results["cpu_ms_per_sample"] = {
            name: cpu_ms_per_sample(make(0, COST_BATCHES + 1, 0), COST_BATCHES)
            for name, make in factories.items()
        }
        results["per_file_stage_ms"] = {way: per_file_stage_ms(dataset) for way, dataset in datasets.items()}
    finally:
        torch.set_num_threads(threads)

    warmup = max(1, workers)
    results["load_average_before"] = os.getloadavg()[0]
    results["rounds"] = [
        {
            name: time_batches(make(workers, batches, seed), batches, warmup)
            for name, make in factories.items()
        }
        for seed in range(rounds)
    ]
    results["load_average_after"] = os.getloadavg()[0]
    first = results["rounds"][0]
    for name in factories:
        if first[name]["shapes"] != first["streaming"]["shapes"]:
            raise RuntimeError(
                f"the loaders' batches differ: streaming {first['streaming']['shapes']},"
                f" {name} {first[name]['shapes']}"
            )
    for measure in ("steady_samples_per_s", "end_to_end_samples_per_s"):
        best = {name: max(r[name][measure] for r in results["rounds"]) for name in factories}
        results[f"best_{measure}"] = best
        results[f"ratio_{measure}"] = {way: best["streaming"] / best[f"per_file_{way}"] for way in baselines}
    cost = results["cpu_ms_per_sample"]
    results["ratio_cpu"] = {way: cost[f"per_file_{way}"] / cost["streaming"] for way in baselines}
    return results


def bench_training(shards: Path, work: Path, steps: int) -> dict[str, Any]:
    """`steps` steps of `configs/tiny.yaml` on the CPU; step times from `metrics.jsonl`."""
    from ddeseg.config import load_config
    from ddeseg.distributed import DistributedContext
    from ddeseg.pipelines.train import TrainRequest, train

    cfg = load_config(
        TINY_CONFIG,
        # One metrics line per step; validation and checkpoints only after the last step.
        [
            f"train.steps={steps}",
            "train.log_every=1",
            f"train.eval_every={steps}",
            f"train.checkpoint_every={steps}",
        ],
    )
    bank_path = work / "bank.npy"
    bank_shape = (cfg.model.num_classes, 4, cfg.model.audio_embed_dim)
    np.save(bank_path, np.random.default_rng(0).standard_normal(bank_shape).astype(np.float32))
    run_dir = work / "run"
    load_before = os.getloadavg()[0]
    started, cpu_started = time.perf_counter(), time.process_time()
    request = TrainRequest(shards_dir=shards, memory_bank=bank_path, out_dir=run_dir)
    summary = train(cfg, request, DistributedContext())
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "samples_per_s" in r and "split" not in r]
    if summary["steps"] != steps or len(logged) != steps:
        raise RuntimeError(f"training ran {summary['steps']} of {steps} steps, {len(logged)} logged")
    # Step 1 also starts the data stream; the others are steady-state steps.
    seconds = [cfg.data.batch_size / r["samples_per_s"] for r in logged[1:]]
    return {
        "steps": steps,
        "batch_size": cfg.data.batch_size,
        "image_size": cfg.data.image_size,
        "median_steps_per_s": 1.0 / float(np.median(seconds)) if seconds else float("nan"),
        "mean_steps_per_s": len(seconds) / sum(seconds) if seconds else float("nan"),
        "wall_s": wall,
        "wall_steps_per_s": steps / wall,
        "process_cpu_s": cpu,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "first_loss": logged[0]["loss"],
        "last_loss": logged[-1]["loss"],
    }


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


# What each ratio compares, for the printout.
RATIO_MEANING = {
    "ours": "I/O and decoding only: both run the same augmentation code, ddeseg.data.augment",
    "official": "our whole design (shards, precomputed log-mel, jitter after the resize) against the"
    " official way (per-file decode, torchvision transforms on PIL, jitter at the frame's size)",
}


def report(
    args: argparse.Namespace, data: dict[str, float], loaders: dict[str, Any], training: dict | None
) -> None:
    print(
        f"data: {args.videos} synthetic v2 videos ({loaders['train_items']} train frames, {args.image_size} px high),"
        f" generate {data['generate_s']:.1f} s, prepare {data['prepare_s']:.1f} s (once)"
    )
    print(
        f"training loaders: {args.workers} workers, batch {args.batch_size}, {args.image_size} px output,"
        f" {args.batches} batches each, best of {args.rounds} alternating rounds"
        f" (load average {loaders['load_average_before']:.1f} -> {loaders['load_average_after']:.1f}"
        f" on {os.cpu_count()} cores)"
    )
    print(
        "  streaming: shards (JPEG, index PNG, float16 log-mel), ddeseg.data.augment;"
        " per_file_*: PIL decode of JPEG/PNG, librosa load + resample of the wav, log-mel per sample,"
        " augmented as named"
    )
    print(f"  {'loader':<18} {'steady samples/s':>17} {'end-to-end samples/s':>21} {'CPU ms/sample':>14}")
    for name in loaders["best_steady_samples_per_s"]:
        print(
            f"  {name:<18} {loaders['best_steady_samples_per_s'][name]:>17.1f}"
            f" {loaders['best_end_to_end_samples_per_s'][name]:>21.1f} {loaders['cpu_ms_per_sample'][name]:>14.2f}"
        )
    for way in loaders["baselines"]:
        print(
            f"  streaming / per_file_{way}: {loaders['ratio_steady_samples_per_s'][way]:.2f}x steady,"
            f" {loaders['ratio_end_to_end_samples_per_s'][way]:.2f}x end to end,"
            f" {loaders['ratio_cpu'][way]:.2f}x CPU per sample"
            + (" (goal: >= 3x)" if way == "official" else "")
        )
        print(f"    compares {RATIO_MEANING[way]}")
    for way, stage_ms in loaders["per_file_stage_ms"].items():
        stages = ", ".join(f"{name} {value:.2f}" for name, value in stage_ms.items())
        print(f"  per_file_{way} item, CPU ms: {stages} (color_jitter is part of augment)")
    if training is None:
        return
    print(
        f"tiny training on the CPU (configs/tiny.yaml, batch {training['batch_size']}, {training['image_size']} px,"
        f" {training['steps']} steps, {torch.get_num_threads()} torch threads, load average"
        f" {training['load_average_before']:.1f} -> {training['load_average_after']:.1f}):"
    )
    print(
        f"  {training['median_steps_per_s']:.3f} steps/s (median step after the first),"
        f" {training['mean_steps_per_s']:.3f} steps/s (mean);"
        f" whole call {training['wall_s']:.1f} s = {training['wall_steps_per_s']:.3f} steps/s (model build, final"
        f" validation, checkpoints included; {training['process_cpu_s']:.1f} CPU s);"
        f" loss {training['first_loss']:.2f} -> {training['last_loss']:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--videos", type=int, default=12, help="synthetic v2 videos (10 frames each)")
    parser.add_argument("--workers", type=int, default=2, help="loader workers, the same for both loaders")
    parser.add_argument("--batches", type=int, default=24, help="batches timed per loader and round")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--image-size",
        type=int,
        default=224,
        help="frame height of the synthetic data and the loaders' output size",
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternating timing rounds per loader (best is kept)"
    )
    parser.add_argument(
        "--steps", type=int, default=20, help="steps of the tiny CPU training run (0: skip it)"
    )
    parser.add_argument(
        "--baseline-augment",
        choices=(*BASELINE_AUGMENTS, "both"),
        default="both",
        help="how the per-file baseline augments: ours (ddeseg.data.augment: the ratio compares I/O"
        " and decoding only), official (torchvision transforms on PIL, as the official loader: the"
        " ratio compares the whole design) or both (default; two baselines, two ratios)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if min(args.videos, args.batches, args.batch_size, args.image_size, args.rounds) < 1 or args.workers < 0:
        parser.error(
            "--videos, --batches, --batch-size, --image-size and --rounds must be >= 1, --workers >= 0"
        )

    from ddeseg.config import load_config

    cfg = load_config(TINY_CONFIG, [f"data.image_size={args.image_size}"])
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as directory:
        work = Path(directory)
        raw, shards, data = build_data(work, args.videos, args.image_size, cfg)
        baselines = BASELINE_AUGMENTS if args.baseline_augment == "both" else (args.baseline_augment,)
        loaders = bench_loaders(
            raw, shards, cfg, args.workers, args.batches, args.batch_size, args.rounds, baselines
        )
        training = bench_training(shards, work, args.steps) if args.steps > 0 else None

    report(args, data, loaders, training)
    if args.json:
        results = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "data": data,
            "loaders": loaders,
            "training": training,
        }
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
