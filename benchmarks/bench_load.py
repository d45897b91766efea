"""Load: peak memory of `ddeseg prepare --workers N` over the whole process tree (the main process
and its worker processes), and of `ddeseg predict` on a long video against a short one.

    .venv/bin/python benchmarks/bench_load.py [--videos 300] [--workers 1 8] [--image-size 64]
        [--predict-seconds 60 600] [--predict-fps 0.1] [--skip-predict] [--json out.json]

1. prepare: a synthetic `ddeseg`-layout dataset of `--videos` videos (task v2, 10 s each) is
   written once; `ddeseg prepare --workers W` runs on it for each W in a fresh subprocess, into a
   fresh folder. This script samples the RSS of that process and of every descendant from /proc
   every 0.1 s and reports the largest sum seen (the peak of the tree, which `ru_maxrss` cannot
   give: it is per process), the main process's own peak (`VmHWM`) and the wall time. Workers
   only read and check frames (one shard in flight each), so the tree's peak should grow by about
   one worker's size per worker, not with the dataset.
2. predict: `benchmarks/bench_predict.py` (each video in a fresh process; VmHWM) on a short and a
   long video; its ratio RSS(long) / RSS(short) should be about 1 (streaming).
Every number is measured in this run; ratios compare numbers of this run only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20


def _children(pid: int) -> list[int]:
    found = []
    task_dir = Path(f"/proc/{pid}/task")
    try:
        tasks = list(task_dir.iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def _tree_rss_mb(root: int) -> float:
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_MB
        except (OSError, IndexError, ValueError):
            continue
        todo += _children(pid)
    return total


def run_sampled(command: list[str]) -> dict[str, float]:
    """Run `command`; its wall time, the peak RSS of its process tree, and its own VmHWM."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak, own_peak = 0.0, 0.0
    while process.poll() is None:
        peak = max(peak, _tree_rss_mb(process.pid))
        try:
            for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    own_peak = max(own_peak, int(line.split()[1]) / 1024)
        except OSError:
            pass
        time.sleep(0.1)
    stderr = process.stderr.read() if process.stderr else ""
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}): {stderr[-2000:]}")
    return {"seconds": time.perf_counter() - started, "tree_peak_rss_mb": peak, "main_peak_rss_mb": own_peak}


def bench_prepare(videos: int, image_size: int, workers: list[int], work: Path) -> list[dict[str, float]]:
    ddeseg = [sys.executable, "-m", "ddeseg"]
    raw = work / "raw"
    subprocess.run(
        [*ddeseg, "synth", "--layout", "ddeseg", "--out", str(raw), "--videos", str(videos), "--classes", "4",
         "--image-size", str(image_size), "--tasks", "v2"],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    rows = []
    for count in workers:
        out = work / f"shards-w{count}"
        result = run_sampled(
            [*ddeseg, "prepare", "--layout", "ddeseg", "--root", str(raw), "--out", str(out), "--tasks", "v2",
             "--workers", str(count), "--device", "cpu"]
        )  # fmt: skip
        manifest = out / "manifest.parquet"
        rows.append({"workers": count, "videos": videos, "manifest_bytes": manifest.stat().st_size, **result})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=300)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--predict-seconds", type=int, nargs=2, default=[60, 600])
    parser.add_argument("--predict-size", default="320x180")
    parser.add_argument(
        "--predict-fps", type=float, default=0.1,
        help="frames predicted per second of video: the whole video is still decoded and written (the streaming part)",
    )
    parser.add_argument("--skip-predict", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-load-") as work:
        prepare_rows = bench_prepare(args.videos, args.image_size, args.workers, Path(work))
    print(f"prepare, {args.videos} videos (v2, {args.image_size} px), {os.cpu_count()} CPU cores:")
    print(f"  {'workers':>7} {'seconds':>8} {'tree peak RSS MB':>17} {'main peak RSS MB':>17}")
    for row in prepare_rows:
        print(f"  {row['workers']:>7} {row['seconds']:>8.1f} {row['tree_peak_rss_mb']:>17.0f} {row['main_peak_rss_mb']:>17.0f}")
    first, last = prepare_rows[0], prepare_rows[-1]
    print(f"  tree peak RSS, {last['workers']} workers / {first['workers']}: {last['tree_peak_rss_mb'] / first['tree_peak_rss_mb']:.2f}")
    results: dict[str, object] = {"prepare": prepare_rows}

    if not args.skip_predict:
        predict_json = Path(tempfile.mkdtemp(prefix="bench-load-predict-")) / "predict.json"
        short, long = args.predict_seconds
        subprocess.run(
            [sys.executable, str(REPO / "benchmarks" / "bench_predict.py"), "--seconds", str(short), str(long),
             "--size", args.predict_size, "--fps-in", "10", "--frames-per-second", str(args.predict_fps),
             "--rounds", "1", "--json", str(predict_json)],
            check=True,
        )  # fmt: skip
        results["predict"] = json.loads(predict_json.read_text())
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
