"""Benchmark of `ddeseg predict` on the CPU with the demo config: frames/s on a 60 s video, and
peak memory (RSS) for a 60 s and a 240 s video, which must be about the same (streaming).

    .venv/bin/python benchmarks/bench_predict.py [--seconds 60 240] [--size 640x360] [--fps-in 25]
                                                 [--frames-per-second 1] [--threads 0] [--rounds 2]
                                                 [--json out.json]

1. Videos, written here with PyAV: H.264 (`--size`, `--fps-in` frames/s) with AAC audio (44.1 kHz
   stereo): coloured shapes moving over a gradient, each with its own tone.
2. Model: `configs/demo.yaml` (the CPU-scale DDESeg of `ddeseg demo`), random weights and memory
   bank, saved as a training checkpoint. The weights do not change the cost.
3. Every measurement runs in a fresh subprocess (this script with `--child`), which reports its
   wall times and its own peak RSS (`VmHWM`), so no measurement inherits another's memory:
   - `predict`: `ddeseg.pipelines.predict.predict_to_directory`, i.e. all `ddeseg predict` does for one
     video (decode, audio windows, model, masks, overlays, overlay.mp4 with the audio,
     predictions.json). Frames/s = sampled frames / wall time (model load excluded). The child
     also reports its peak RSS after loading the model and before the video (`idle`).
   - baseline `decode`: PyAV decoding every video frame and the whole audio track of the same
     file, converting nothing: the floor for any predictor that must look at every frame.
Ratios compare numbers of this run only: predict / decode wall time, RSS(longest) / RSS(60 s),
and the RSS a video adds over the idle process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
AUDIO_RATE = 44100


def peak_rss_mb() -> float:
    """This process's peak resident memory. `VmHWM` rather than `ru_maxrss`: Linux keeps
    ru_maxrss across fork + exec, so a child would report its parent's peak."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # elsewhere (kilobytes on Linux)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def write_video(path: Path, seconds: int, width: int, height: int, fps: int) -> Path:
    """H.264 + AAC: three shapes on circular paths over a gradient, each with a tone."""
    import av

    rng = np.random.default_rng(0)
    container = av.open(str(path), "w")
    video = container.add_stream("libx264", rate=fps)
    video.width, video.height, video.pix_fmt = width, height, "yuv420p"
    video.options = {"preset": "ultrafast", "crf": "23"}
    audio = container.add_stream("aac", rate=AUDIO_RATE, layout="stereo")
    y, x = np.mgrid[0:height, 0:width]
    background = np.stack([x * 200 // width, y * 200 // height, np.full_like(x, 90)], axis=-1).astype(np.uint8)
    colours = rng.integers(60, 255, size=(3, 3), dtype=np.uint8)
    size = height // 6
    tones = (220.0, 440.0, 880.0)
    for index in range(seconds * fps):
        image = background.copy()
        t = index / fps
        for shape, colour in enumerate(colours):
            cx = int(width / 2 + width / 3 * np.cos(0.3 * t + 2 * shape))
            cy = int(height / 2 + height / 3 * np.sin(0.4 * t + 2 * shape))
            image[max(0, cy - size) : cy + size, max(0, cx - size) : cx + size] = colour
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = index
        container.mux(video.encode(frame))
    container.mux(video.encode(None))
    chunk = AUDIO_RATE  # one second per frame of audio
    for second in range(seconds):
        t = (second * chunk + np.arange(chunk)) / AUDIO_RATE
        wave = sum(0.1 * np.sin(2 * np.pi * tone * t) * ((second + k) % 3 != 0) for k, tone in enumerate(tones))
        pcm = np.clip(np.rint(np.stack([wave, 0.5 * wave], axis=1) * 32767), -32768, 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm).reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate, frame.pts = AUDIO_RATE, second * chunk
        container.mux(audio.encode(frame))
    container.mux(audio.encode(None))
    container.close()
    return path


def write_checkpoint(path: Path, config_path: str | Path = DEMO_CONFIG, overrides: Sequence[str] = ()) -> Path:
    """A training checkpoint of `config_path` (+ `overrides`) with random weights and bank."""
    import torch

    from ddeseg.config import load_config, to_dict
    from ddeseg.models import build_model
    from ddeseg.training.checkpoint import FORMAT, atomic_torch_save

    config = load_config(config_path, list(overrides))
    torch.manual_seed(0)
    model = build_model(config.model)
    model.set_memory_bank(torch.randn(config.model.num_classes, 16, config.model.audio_embed_dim))
    names = ["background"] + [f"class-{k}" for k in range(1, config.model.num_classes)]
    payload = {"format": FORMAT, "model": model.state_dict(), "config": to_dict(config), "classes": names, "step": 0}
    return atomic_torch_save(payload, path)


# --------------------------------------------------------------------------------------------
# Children (one measurement each)
# --------------------------------------------------------------------------------------------


def child_predict(video: Path, checkpoint: Path, out: Path, frames_per_second: float, threads: int) -> dict:
    import torch

    from ddeseg.pipelines.predict import PredictPaths, load_predictor, predict_to_directory
    from ddeseg.stage import ConfigSource

    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    model, config, names, _ = load_predictor(ConfigSource(), PredictPaths(checkpoint, [video], out), device="cpu")
    loaded = time.perf_counter()
    idle = peak_rss_mb()
    result = predict_to_directory(video, model, config, names, out / video.stem, frames_per_second=frames_per_second)
    finished = time.perf_counter()
    return {
        "frames": result.frames,
        "load_s": loaded - started,
        "predict_s": finished - loaded,
        "frames_per_s": result.frames / (finished - loaded),
        "idle_rss_mb": idle,
        "peak_rss_mb": peak_rss_mb(),
        "torch_threads": torch.get_num_threads(),
    }


def child_decode(video: Path) -> dict:
    import av

    started = time.perf_counter()
    frames = samples = 0
    with av.open(str(video)) as container:
        for _ in container.decode(video=0):
            frames += 1
    with av.open(str(video)) as container:
        for frame in container.decode(audio=0):
            samples += frame.samples
    return {"video_frames": frames, "audio_s": samples / AUDIO_RATE, "decode_s": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}


def run_child(*args: str) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO).stdout
    return json.loads(output.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, nargs="+", default=[60, 240], help="video lengths; the first gives frames/s")
    parser.add_argument("--size", default="640x360", help="video frame size WxH")
    parser.add_argument("--fps-in", type=int, default=25, help="frames/s of the test videos")
    parser.add_argument("--frames-per-second", type=float, default=1.0, help="predict's sampling rate F")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in predict (0: torch's default)")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes timing the first video (best is kept)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "predict":
            video, checkpoint, out, fps, threads = rest
            result = child_predict(Path(video), Path(checkpoint), Path(out), float(fps), int(threads))
        else:
            result = child_decode(Path(rest[0]))
        print(json.dumps(result))
        return

    width, height = (int(v) for v in args.size.split("x"))
    results: dict = {"size": args.size, "fps_in": args.fps_in, "frames_per_second": args.frames_per_second, "videos": {}}
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as work:
        work = Path(work)
        started = time.perf_counter()
        checkpoint = write_checkpoint(work / "demo.pt")
        videos = {s: write_video(work / f"video-{s}s.mp4", s, width, height, args.fps_in) for s in args.seconds}
        results["setup_s"] = time.perf_counter() - started
        for seconds, video in videos.items():
            # The machine may be shared: for the frames/s video, the best of `--rounds` fresh
            # processes (peak RSS: the largest); the longer videos (memory) run once.
            rounds = args.rounds if seconds == args.seconds[0] else 1
            decodes = [run_child("decode", str(video)) for _ in range(rounds)]
            predicts = [
                run_child("predict", str(video), str(checkpoint), str(work / "out"), str(args.frames_per_second), str(args.threads))
                for _ in range(rounds)
            ]
            decode = min(decodes, key=lambda r: r["decode_s"]) | {"peak_rss_mb": max(r["peak_rss_mb"] for r in decodes)}
            predict = min(predicts, key=lambda r: r["predict_s"]) | {"peak_rss_mb": max(r["peak_rss_mb"] for r in predicts)}
            results["videos"][seconds] = {"mb": video.stat().st_size / 2**20, "decode": decode, "predict": predict}
            print(
                f"{seconds:4d} s video ({video.stat().st_size / 2**20:.1f} MB, {decode['video_frames']} frames at {args.fps_in}/s):"
                f" predict {predict['frames']} frames in {predict['predict_s']:.1f} s = {predict['frames_per_s']:.2f} frames/s"
                f" (decode-only baseline {decode['decode_s']:.1f} s, predict/decode {predict['predict_s'] / decode['decode_s']:.2f}x);"
                f" peak RSS {predict['peak_rss_mb']:.0f} MB (idle after model load {predict['idle_rss_mb']:.0f} MB,"
                f" +{predict['peak_rss_mb'] - predict['idle_rss_mb']:.0f} MB; decode-only {decode['peak_rss_mb']:.0f} MB)",
                flush=True,
            )
    first, last = args.seconds[0], args.seconds[-1]
    if first != last:
        a, b = results["videos"][first]["predict"], results["videos"][last]["predict"]
        results["rss_ratio"] = b["peak_rss_mb"] / a["peak_rss_mb"]
        print(
            f"peak RSS {last} s / {first} s video: {b['peak_rss_mb']:.0f} / {a['peak_rss_mb']:.0f} MB = {results['rss_ratio']:.3f}"
            f" (growth over idle: +{a['peak_rss_mb'] - a['idle_rss_mb']:.0f} MB vs +{b['peak_rss_mb'] - b['idle_rss_mb']:.0f} MB)"
        )
    print(f"torch threads {results['videos'][first]['predict']['torch_threads']}, cores {os.cpu_count()}, setup {results['setup_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
