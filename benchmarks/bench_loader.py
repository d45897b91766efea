"""Benchmark of the training data path: our streaming loader against an official-style per-file
loader, and the steps/s of a tiny training run on the CPU.

    .venv/bin/python benchmarks/bench_loader.py [--videos 12] [--workers 2] [--batches 24]
                                                [--batch-size 8] [--image-size 224] [--rounds 2]
                                                [--steps 20] [--json results.json]

1. Data: `generate("ddeseg", ...)` writes a synthetic v2 dataset in DDESeg's raw layout
   (`AVSSData/v2/{video}/frames/{i}.jpg`, `labels_semantic/{i}.png`, `audios/{i}.wav` at 16 kHz,
   `avss_bbox_orisize.json`), and the prepare stage turns it into shards, as `ddeseg prepare`.
2. Loaders, in this process and run, on the same train split, with the same number of workers,
   batch size, output image size and augmentation functions (`ddeseg.data.augment`), both
   producing the batches the trainer consumes (`collate_samples`: `image`, `mask`, `logmel`, ...):
   - streaming: `make_train_loader` on the shards (JPEG bytes, index PNG, float16 log-mel);
   - per-file: a map-style `Dataset` doing per item what the official `AVSSDataLoadImg` does:
     PIL decode of the JPEG frame and the PNG mask, `librosa.load` of the one-second 16 kHz wav
     resampled to 22.05 kHz, repeat-padding to the clip length. The official loader returns
     the waveform and its model computes the log-mel; to compare equal outputs, the worker
     computes it per sample with the model's `LogMelFrontend`.
   So only reading and decoding differ. Measured:
   - samples/s with `--workers` workers, the two loaders alternating for `--rounds` rounds (the
     best round of each is reported: the machine may be shared). Steady state: the batches
     after the first `workers` (worker start-up excluded); end to end: from `iter(loader)`.
   - CPU ms per sample in this process (no workers, one torch thread), which does not depend on
     other load; and, for the per-file loader, the CPU ms of each of its steps.
3. `ddeseg.engine.train.train` with `configs/tiny.yaml` for `--steps` steps on the CPU (random
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


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def build_data(work: Path, videos: int, image_size: int, cfg: Any) -> tuple[Path, Path, dict[str, float]]:
    """Raw `ddeseg`-layout dataset and its shards under `work`; returns (raw, shards, seconds)."""
    from ddeseg.pipelines.prepare import PrepareOptions, prepare
    from ddeseg.pipelines.sources.synthetic import generate

    raw, shards = work / "raw", work / "shards"
    started = time.perf_counter()
    generate("ddeseg", raw, videos=videos, classes=SYNTH_CLASSES, seed=0, image_size=image_size, tasks=[TASK])
    generated = time.perf_counter()
    prepare(
        PrepareOptions(layout="ddeseg", root=raw, out=shards, tasks=[TASK], device="cpu", progress=False), cfg
    )
    return raw, shards, {"generate_s": generated - started, "prepare_s": time.perf_counter() - generated}


class PerFileTrainDataset(torch.utils.data.Dataset):
    """Map-style training set over the raw `ddeseg` layout, reading and decoding every file per item.

    Items follow the rows of `metadata_w_silent.csv` (uid at 1, split at 4, subset at 5) of
    `split`/`subset`; the sounding boxes come from `avss_bbox_orisize.json`, read once, as the
    official loader does. Each item is the dict that `ddeseg.data.stream.collate_samples` batches.
    """

    def __init__(
        self, avss_root: Path, cfg: Any, label_lut: np.ndarray, split: str = "train", subset: str = TASK
    ):
        from ddeseg.models.frontend import LogMelFrontend

        self.root, self.cfg, self.label_lut = avss_root, cfg, label_lut
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

    def __getitem__(self, index: int) -> dict[str, Any]:
        from ddeseg.data.augment import augment_for_training

        _, video, frame, silent = self.items[index]
        paths = self.paths(index)
        image = self.read_image(paths["image"])
        mask = self.read_mask(paths["mask"])
        logmel = self.logmel(self.read_waveform(paths["audio"]))
        box = self.boxes.get(f"{video}_{frame}")
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
            "orig_size": image.shape[:2],
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
    """CPU ms of each step of the per-file loader's item 0 (the augmentation as the loaders do)."""
    from ddeseg.data.augment import augment_for_training

    paths = dataset.paths(0)
    image, mask = dataset.read_image(paths["image"]), dataset.read_mask(paths["mask"])
    waveform = dataset.read_waveform(paths["audio"])
    logmel = dataset.logmel(waveform)
    _, video, frame, _ = dataset.items[0]
    box = dataset.boxes.get(f"{video}_{frame}")
    rng = np.random.default_rng(0)
    return {
        "jpeg_decode": cpu_ms(lambda: dataset.read_image(paths["image"])),
        "png_decode": cpu_ms(lambda: dataset.read_mask(paths["mask"])),
        "wav_load_resample": cpu_ms(lambda: dataset.read_waveform(paths["audio"])),
        "logmel_frontend": cpu_ms(lambda: dataset.logmel(waveform)),
        "augment": cpu_ms(lambda: augment_for_training(image, mask, box, logmel, dataset.cfg, rng)),
        "whole_item": cpu_ms(lambda: dataset[0]),
    }


def bench_loaders(
    raw: Path, shards: Path, cfg: Any, workers: int, batches: int, batch_size: int, rounds: int
) -> dict[str, Any]:
    from ddeseg.data.stream import collate_samples, list_shards, make_train_loader, resolve_label_lut

    train_shards = list_shards(shards / TASK / "train")
    # The same id map for both; for the synthetic v2 data raw mask ids are the unified ids.
    label_lut = resolve_label_lut(train_shards, cfg)
    dataset = PerFileTrainDataset(raw / "AVSSData", cfg, label_lut)

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

    def per_file(num_workers: int, num_batches: int, seed: int) -> Any:
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

    factories = {"streaming": streaming, "per_file": per_file}
    results: dict[str, Any] = {"train_items": len(dataset)}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a loader worker
    try:
        results["cpu_ms_per_sample"] = {
            name: cpu_ms_per_sample(make(0, COST_BATCHES + 1, 0), COST_BATCHES)
            for name, make in factories.items()
        }
        results["per_file_stage_ms"] = per_file_stage_ms(dataset)
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
    if first["streaming"]["shapes"] != first["per_file"]["shapes"]:
        raise RuntimeError(
            f"the loaders' batches differ: {first['streaming']['shapes']} vs {first['per_file']['shapes']}"
        )
    for measure in ("steady_samples_per_s", "end_to_end_samples_per_s"):
        best = {name: max(r[name][measure] for r in results["rounds"]) for name in factories}
        results[f"best_{measure}"] = best
        results[f"ratio_{measure}"] = best["streaming"] / best["per_file"]
    cost = results["cpu_ms_per_sample"]
    results["ratio_cpu"] = cost["per_file"] / cost["streaming"]
    return results


def bench_training(shards: Path, work: Path, steps: int) -> dict[str, Any]:
    """`steps` steps of `configs/tiny.yaml` on the CPU; step times from `metrics.jsonl`."""
    from ddeseg.config import load_config
    from ddeseg.distributed import DistributedContext
    from ddeseg.engine.train import TrainRequest, train

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
    print(f"  {'loader':<10} {'steady samples/s':>17} {'end-to-end samples/s':>21} {'CPU ms/sample':>14}")
    for name in ("streaming", "per_file"):
        print(
            f"  {name:<10} {loaders['best_steady_samples_per_s'][name]:>17.1f}"
            f" {loaders['best_end_to_end_samples_per_s'][name]:>21.1f} {loaders['cpu_ms_per_sample'][name]:>14.2f}"
        )
    print(
        f"  streaming / per-file: {loaders['ratio_steady_samples_per_s']:.2f}x steady,"
        f" {loaders['ratio_end_to_end_samples_per_s']:.2f}x end to end, {loaders['ratio_cpu']:.2f}x CPU per sample"
        " (goal: >= 3x)"
    )
    stages = ", ".join(f"{name} {value:.2f}" for name, value in loaders["per_file_stage_ms"].items())
    print(f"  per-file item, CPU ms: {stages}")
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
        loaders = bench_loaders(raw, shards, cfg, args.workers, args.batches, args.batch_size, args.rounds)
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
