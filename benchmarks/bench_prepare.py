"""Benchmark of `ddeseg prepare`: throughput, memory at two dataset sizes, and the log-mel path.

    .venv/bin/python benchmarks/bench_prepare.py [--videos 24] [--scales 1,4] [--image-size 224]
        [--workers 1] [--samples-per-shard 64] [--clips 256] [--json results.json]

1. A synthetic `avsbench` dataset (all AVSS tasks) at `--scales` x `--videos` (default 1x and
   4x); each is prepared in a fresh process, which reports samples/s and its peak RSS (and its
   workers' peak). Prepare streams shard by shard, so the peak should stay flat when the dataset
   grows.
2. Log-mel of `--clips` one-second clips in the same run: the batched `LogMelBatcher` (the
   model's `LogMelFrontend`, on the GPU when there is one, and on the CPU) against per-clip
   `librosa.feature.melspectrogram` + `power_to_db` with the same parameters (the official
   loaders' way of computing features sample by sample).
Every number is measured here, in this run; ratios compare within the run only.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(root: str, out: str, workers: int, samples_per_shard: int) -> None:
    """Prepare `root` into `out` in this (fresh) process; print one json line of measurements."""
    from ddeseg.config import Config
    from ddeseg.pipelines.prepare import PreparePaths, prepare
    from ddeseg.stage import RunOptions

    config = Config()
    config.data.samples_per_shard = samples_per_shard
    config.prepare.workers = workers
    started = time.perf_counter()
    result = prepare(config, PreparePaths(layout="avsbench", root=Path(root), out=Path(out)), RunOptions(progress=False))
    elapsed = time.perf_counter() - started
    samples = sum(sum(splits.values()) for splits in result.counts.values())
    print(
        json.dumps(
            {
                "samples": samples,
                "seconds": elapsed,
                "samples_per_s": samples / elapsed,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "workers_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                "raw_mb": sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file()) / 2**20,
                "shards_mb": sum(p.stat().st_size for p in Path(out).rglob("*.tar")) / 2**20,
            }
        )
    )


def bench_prepare(
    videos: int, image_size: int, workers: int, samples_per_shard: int, scales: list[int], work: Path
) -> dict[str, dict]:
    from ddeseg.pipelines.synth import generate

    results = {}
    for scale in scales:
        raw = work / f"raw-{scale}x"
        started = time.perf_counter()
        generate(
            "avsbench", raw, videos=videos * scale, classes=8, seed=0, image_size=image_size, workers=workers
        )
        generated = time.perf_counter() - started
        command = [
            sys.executable,
            __file__,
            "--child",
            str(raw),
            str(work / f"shards-{scale}x"),
            str(workers),
            str(samples_per_shard),
        ]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[f"{scale}x"] = {**json.loads(output.strip().splitlines()[-1]), "generate_s": generated}
    return results


def bench_logmel(clips: int) -> dict[str, float]:
    import librosa
    import numpy as np
    import torch

    from ddeseg.audio import LogMelBatcher
    from ddeseg.config import FrontendConfig

    cfg = FrontendConfig()
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal((clips, cfg.sample_rate))).astype(np.float32)
    results: dict[str, float] = {}

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        batcher = LogMelBatcher(cfg, torch.device(device), batch_size=64)
        batcher(audio[:64])  # warm-up (kernels, allocator)
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        features = batcher(audio)
        if device == "cuda":
            torch.cuda.synchronize()
        results[f"batched_{device}_clips_per_s"] = clips / (time.perf_counter() - started)

    def librosa_clip(clip: np.ndarray) -> np.ndarray:
        mel = librosa.feature.melspectrogram(
            y=clip,
            sr=cfg.sample_rate,
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            n_mels=cfg.mel_bins,
            fmin=cfg.fmin,
            fmax=cfg.fmax,
            power=2.0,
            htk=False,
            norm="slaney",
            center=True,
            pad_mode="reflect",
        )
        return librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None).T

    librosa_clip(audio[0])  # warm-up (filterbank cache)
    started = time.perf_counter()
    reference = np.stack([librosa_clip(clip) for clip in audio])
    results["librosa_per_clip_clips_per_s"] = clips / (time.perf_counter() - started)
    # same computation, different code: agreement in dB (float16 storage included)
    results["max_abs_diff_db_vs_librosa"] = float(np.abs(features.astype(np.float32) - reference).max())
    for device in devices:
        results[f"speedup_{device}_vs_librosa"] = (
            results[f"batched_{device}_clips_per_s"] / results["librosa_per_clip_clips_per_s"]
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--videos", type=int, default=24, help="videos of the 1x dataset")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument(
        "--scales", default="1,4", help="dataset sizes, in multiples of --videos (first and last compared)"
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--samples-per-shard",
        type=int,
        default=64,
        help="data.samples_per_shard; the peak memory is one shard in flight per worker (+1), so keep "
        "it below the smaller dataset's split sizes to compare sizes fairly",
    )
    parser.add_argument("--clips", type=int, default=256, help="one-second clips for the log-mel comparison")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", nargs=4, metavar=("ROOT", "OUT", "WORKERS", "SPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]), int(args.child[3]))
        return

    scales = [int(scale) for scale in args.scales.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as work:
        prepare_results = bench_prepare(
            args.videos, args.image_size, args.workers, args.samples_per_shard, scales, Path(work)
        )
    logmel_results = bench_logmel(args.clips)

    print(
        f"prepare (avsbench layout, {args.image_size} px, workers {args.workers}, "
        f"{args.samples_per_shard} samples per shard):"
    )
    print(
        f"  {'size':<5} {'samples':>8} {'seconds':>8} {'samples/s':>10} {'peak RSS MB':>12} {'workers MB':>11} {'raw MB':>7}"
    )
    for scale, row in prepare_results.items():
        print(
            f"  {scale:<5} {row['samples']:>8} {row['seconds']:>8.2f} {row['samples_per_s']:>10.1f} "
            f"{row['peak_rss_mb']:>12.0f} {row['workers_peak_rss_mb']:>11.0f} {row['raw_mb']:>7.1f}"
        )
    small, large = prepare_results[f"{scales[0]}x"], prepare_results[f"{scales[-1]}x"]
    ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
    marginal = (large["samples"] - small["samples"]) / max(large["seconds"] - small["seconds"], 1e-9)
    grown = scales[-1] // scales[0]
    print(
        f"  marginal throughput ({scales[-1]}x minus {scales[0]}x, start-up excluded): {marginal:.1f} samples/s"
    )
    print(f"  peak RSS {scales[-1]}x / {scales[0]}x: {ratio:.2f} (dataset {grown}x larger)")
    print(f"log-mel of {args.clips} one-second clips at 22.05 kHz:")
    for name, value in logmel_results.items():
        print(f"  {name:<34} {value:10.2f}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "prepare": prepare_results,
                    "marginal_samples_per_s": marginal,
                    "logmel": logmel_results,
                    "rss_ratio_last_first": ratio,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
