"""GPU memory of the paper configuration (configs/v2.yaml, 224 px), planned on the CPU.

Prints, for float32 and bf16, each without and with activation checkpointing (visual blocks,
aligners, head):
- activation bytes per sample (measured saved tensors, `ddeseg.training.memory_plan`), and the largest
  segment rebuilt during the backward pass;
- the planned peak of one step at the official batch of 50 per GPU (no accumulation);
- the largest micro-batch (and accumulation keeping batch 50) for 24 / 40 / 80 GiB budgets;
- the transient bytes above the saved tensors at micro-batch 1 and 2 (measured steps:
  `ddeseg.training.memory_plan.measure_step_peak`, the profiler's allocation events on the CPU);
- the CPU time of one float32 training step per sample with vs without checkpointing (the
  recompute cost, as a ratio measured in this run; one step each, the model already warm);
- the plan against reality: the peak RSS growth of one float32 training step (fresh process,
  gradients preallocated, RSS sampled every 2 ms) at micro-batch 1 and 2, over the planned
  activation bytes without the transient term (the plan before it) and with it. The children
  run with glibc's mmap threshold fixed at 128 KiB (`MALLOC_MMAP_THRESHOLD_`), so that every
  tensor is returned to the system when freed and RSS follows the live bytes: by default glibc
  raises the threshold after each large free (up to 32 MiB) and keeps later tensors in its heap,
  which ones depending on thread timing (the same micro-batch-2 step measured 3.12 and 3.68 GiB
  in two runs). `--default-malloc` measures without it.

    python benchmarks/bench_memory.py [--config v2] [--image-size 224] [--threads 2] [--skip-rss]
                                      [--rss-only] [--json out.json]

About 4 minutes on 2 idle CPU cores (the paper model keeps ~1.4 GiB of activations per sample in
float32). bf16 is measured with CPU autocast, whose op lists are those of CUDA autocast for the
layers that matter here (linear, conv, matmul, attention).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddeseg.config import load_config  # noqa: E402
from ddeseg.losses import SegmentationLoss  # noqa: E402
from ddeseg.models import build_model  # noqa: E402
from ddeseg.training.memory_plan import (  # noqa: E402
    BATCHNORM_NOTE,
    _measurement_batch,
    choose_micro_batch,
    plan,
    profile_activations,
)
from ddeseg.units import format_bytes, parse_bytes  # noqa: E402

PARTS = ("aligners", "head", "visual_blocks")
BUDGETS = ("24GiB", "40GiB", "80GiB")
BATCH = 50


def _model(config):
    torch.manual_seed(0)
    model = build_model(config.model)
    model.set_memory_bank(torch.randn(config.model.num_classes, 10, config.model.audio_embed_dim))
    return model


def _step(model, loss_fn, batch) -> float:
    image, logmel, target = batch
    started = time.perf_counter()
    loss, _ = loss_fn(model(image, logmel).float(), target)
    loss.backward()
    return time.perf_counter() - started


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_child(config_name: str, image_size: int, micro_batch: int) -> None:
    """(subprocess) peak RSS growth of one float32 training step at `micro_batch`, as JSON."""
    config = load_config(config_name, [f"data.image_size={image_size}"])
    model = _model(config).train()
    for parameter in model.parameters():  # gradients exist before the baseline: growth = activations
        if parameter.requires_grad:
            parameter.grad = torch.zeros_like(parameter)
    loss_fn = SegmentationLoss(config.loss, config.model.num_classes)
    batch = _measurement_batch(config, micro_batch, torch.device("cpu"), torch.Generator().manual_seed(0))
    baseline, peak, running = _rss_bytes(), [0], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    thread = threading.Thread(target=sample)
    thread.start()
    _step(model, loss_fn, batch)
    running[0] = False
    thread.join()
    print(json.dumps({"growth": max(peak[0], _rss_bytes()) - baseline}))


def plan_vs_rss(args, fp32, micro_batches: tuple[int, ...] = (1, 2)) -> list[dict]:
    """Peak RSS growth of one float32 step (fresh process per micro-batch) against the planned
    activations, without the transient term (the plan before it) and with it."""
    malloc = "glibc default" if args.default_malloc else "mmap threshold 128 KiB"
    print(f"\nplan vs reality (fp32, no checkpointing; fresh process per micro-batch, {malloc}):")
    print("| micro-batch | peak RSS growth | planned kept | ratio, without transient | planned kept + transient | ratio |")
    print("|---|---|---|---|---|---|")
    rows = []
    env = dict(os.environ) if args.default_malloc else {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    for micro in micro_batches:
        output = subprocess.run(
            [sys.executable, __file__, "--config", args.config, "--image-size", str(args.image_size),
             "--threads", str(args.threads), "--rss-child", str(micro)],
            check=True, capture_output=True, text=True, env=env,
        ).stdout
        growth = json.loads(output.strip().splitlines()[-1])["growth"]
        kept = fp32.kept_bytes(micro)
        with_transient = kept + fp32.transient_bytes(micro)
        rows.append({"micro_batch": micro, "rss_growth": growth, "planned_kept": kept,
                     "planned_with_transient": with_transient, "ratio_before": growth / kept,
                     "ratio_after": growth / with_transient})
        print(f"| {micro} | {format_bytes(growth)} | {format_bytes(kept)} | {growth / kept:.2f} | "
              f"{format_bytes(with_transient)} | {growth / with_transient:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="v2")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--rss-only", action="store_true", help="only the plan-vs-RSS check (fp32)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="RSS children with glibc's default (dynamic) mmap threshold")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args.config, args.image_size, args.rss_child)
        return
    config = load_config(args.config, [f"data.image_size={args.image_size}"])
    started = time.time()
    load_before = os.getloadavg()[0]
    model = _model(config)
    results: dict = {"config": args.config, "image_size": args.image_size, "threads": args.threads}
    if args.rss_only:
        profile = profile_activations(config, "fp32", (), model=model)
        del model  # the children need the memory
        results["rss"] = plan_vs_rss(args, profile)
        _finish(args, results, started, load_before)
        return
    variants = [(precision, parts) for precision in ("fp32", "bf16") for parts in ((), PARTS)]
    profiles = {}
    for precision, parts in reversed(variants):  # the checkpointed count caches the plain one
        profiles[precision, parts] = profile_activations(config, precision, parts, model=model)
    print(f"# {args.config}, {args.image_size} px: activations measured in {time.time() - started:.0f} s\n")
    print(f"| precision | checkpointing | activations / sample | recompute (b=1) | transient (b=1, b=2) "
          f"| planned peak, batch {BATCH} |" + "".join(f" {b}: micro x accum (peak) |" for b in BUDGETS))
    print("|---|---|---|---|---|---|" + "---|" * len(BUDGETS))
    results["variants"] = []
    for precision, parts in variants:
        profile = profiles[precision, parts]
        full = plan(config, BATCH, precision, parts, profile=profile, model=model)
        cells = []
        for budget in BUDGETS:
            try:
                micro, accum = choose_micro_batch(config, parse_bytes(budget), BATCH, 1, precision=precision,
                                                  checkpointing=parts, model=model)
                peak = plan(config, micro, precision, parts, profile=profile, model=model).peak_bytes
                cells.append(f"{micro} x {accum} ({format_bytes(peak)})")
            except Exception as error:  # noqa: BLE001 (DDESegError: does not fit)
                cells.append("does not fit" if "does not fit" in str(error) else str(error))
        transient = f"{format_bytes(profile.transient_bytes(1))}, {format_bytes(profile.transient_bytes(2))}"
        print(f"| {precision} | {'on' if parts else 'off'} | {format_bytes(profile.kept_per_sample)} | "
              f"{format_bytes(profile.recompute_bytes(1))} | {transient} | {format_bytes(full.peak_bytes)} | "
              + " | ".join(cells) + " |")
        results["variants"].append({
            "precision": precision, "checkpointing": list(parts), "kept_per_sample": profile.kept_per_sample,
            "recompute_b1": profile.recompute_bytes(1), "transient_b1": profile.transient_bytes(1),
            "transient_b2": profile.transient_bytes(2), f"planned_peak_b{BATCH}": full.peak_bytes,
            "budgets": dict(zip(BUDGETS, cells, strict=True)),
        })
    print(f"\nnote: {BATCHNORM_NOTE}")

    # ---- the recompute cost: one float32 step each (the model is warm from the measurements)
    loss_fn = SegmentationLoss(config.loss, config.model.num_classes)
    batch = _measurement_batch(config, 1, torch.device("cpu"), torch.Generator().manual_seed(0))
    model.train()
    times: dict[bool, float] = {}
    for checkpointed in (False, True):
        model.set_activation_checkpointing(PARTS if checkpointed else ())
        model.zero_grad(set_to_none=True)
        times[checkpointed] = _step(model, loss_fn, batch)
    plain_s, ckpt_s = times[False], times[True]
    results["step_s"] = {"plain": plain_s, "checkpointed": ckpt_s}
    print(f"\nCPU step time per sample (fp32, micro-batch 1, one step each): without checkpointing {plain_s:.2f} s, "
          f"with {ckpt_s:.2f} s: ratio {ckpt_s / plain_s:.2f}x")
    del model

    if not args.skip_rss:
        results["rss"] = plan_vs_rss(args, profiles["fp32", ()])
    _finish(args, results, started, load_before)


def _finish(args, results: dict, started: float, load_before: float) -> None:
    # The machine may be shared: the load average says how much the times are worth.
    results["total_s"] = time.time() - started
    results["load_average"] = [load_before, os.getloadavg()[0]]
    print(f"\ntotal {results['total_s']:.0f} s (load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
