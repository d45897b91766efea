"""GPU memory of the paper configuration (configs/v2.yaml, 224 px), planned on the CPU.

Prints, for float32 and bf16, each without and with activation checkpointing (visual blocks,
aligners, head):
- activation bytes per sample (measured saved tensors, `ddeseg.training.memory_plan`), and the largest
  segment rebuilt during the backward pass;
- the planned peak of one step at the official batch of 50 per GPU (no accumulation);
- the largest micro-batch (and accumulation keeping batch 50) for 24 / 40 / 80 GiB budgets;
- the CPU time of one float32 training step per sample with vs without checkpointing (the
  recompute cost, as a ratio measured in this run);
- the plan against reality: the peak RSS growth of one float32 training step (fresh process,
  gradients preallocated, RSS sampled every 2 ms) at micro-batch 1 and 2, over the planned
  activation bytes (kept + recompute).

    python benchmarks/bench_memory.py [--config v2] [--image-size 224] [--threads 2] [--skip-rss]

A few minutes on 2 CPU cores (the paper model keeps ~1.4 GiB of activations per sample in
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


def _plan_vs_rss(args, fp32) -> None:
    """Peak RSS growth of one float32 step (fresh process) at micro-batch 1 and 2 vs the plan."""
    print("\nplan vs reality (fp32, no checkpointing; fresh process per micro-batch):")
    growths = {}
    for micro in (1, 2):
        output = subprocess.run(
            [sys.executable, __file__, "--config", args.config, "--image-size", str(args.image_size),
             "--threads", str(args.threads), "--rss-child", str(micro)],
            check=True, capture_output=True, text=True,
        ).stdout
        growth = json.loads(output.strip().splitlines()[-1])["growth"]
        planned, growths[micro] = fp32.kept_bytes(micro), growth
        print(f"  micro-batch {micro}: peak RSS growth {format_bytes(growth)}, planned activations "
              f"{format_bytes(planned)}: ratio {growth / planned:.2f}")
    # The slope cancels what does not grow with the batch (one-off buffers, allocator pools).
    slope = growths[2] - growths[1]
    print(f"  per sample (micro-batch 2 minus 1): RSS {format_bytes(slope)}, planned "
          f"{format_bytes(fp32.kept_per_sample)}: ratio {slope / fp32.kept_per_sample:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="v2")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--rss-only", action="store_true", help="only the plan-vs-RSS check (fp32)")
    parser.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args.config, args.image_size, args.rss_child)
        return
    config = load_config(args.config, [f"data.image_size={args.image_size}"])
    started = time.time()
    model = _model(config)
    if args.rss_only:
        profile = profile_activations(config, "fp32", (), model=model)
        del model  # the children need the memory
        _plan_vs_rss(args, profile)
        print(f"\ntotal {time.time() - started:.0f} s")
        return
    variants = [(precision, parts) for precision in ("fp32", "bf16") for parts in ((), PARTS)]
    profiles = {}
    for precision, parts in reversed(variants):  # the checkpointed measurement caches the plain one
        profiles[precision, parts] = profile_activations(config, precision, parts, model=model)
    print(f"# {args.config}, {args.image_size} px: activations measured in {time.time() - started:.0f} s\n")
    print(f"| precision | checkpointing | activations / sample | recompute (b=1) | planned peak, batch {BATCH} |"
          + "".join(f" {b}: micro x accum (peak) |" for b in BUDGETS))
    print("|---|---|---|---|---|" + "---|" * len(BUDGETS))
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
        print(f"| {precision} | {'on' if parts else 'off'} | {format_bytes(profile.kept_per_sample)} | "
              f"{format_bytes(profile.recompute_bytes(1))} | {format_bytes(full.peak_bytes)} | " + " | ".join(cells) + " |")
    print(f"\nnote: {BATCHNORM_NOTE}")

    # ---- the recompute cost: float32 steps, alternating, same process
    loss_fn = SegmentationLoss(config.loss, config.model.num_classes)
    batch = _measurement_batch(config, 1, torch.device("cpu"), torch.Generator().manual_seed(0))
    model.train()
    times: dict[bool, list[float]] = {False: [], True: []}
    _step(model, loss_fn, batch)  # warm-up
    for _ in range(2):
        for checkpointed in (False, True):
            model.set_activation_checkpointing(PARTS if checkpointed else ())
            model.zero_grad(set_to_none=True)
            times[checkpointed].append(_step(model, loss_fn, batch))
    plain_s, ckpt_s = min(times[False]), min(times[True])
    print(f"\nCPU step time per sample (fp32, micro-batch 1, best of 2): without checkpointing {plain_s:.2f} s, "
          f"with {ckpt_s:.2f} s: ratio {ckpt_s / plain_s:.2f}x")
    del model

    if not args.skip_rss:
        _plan_vs_rss(args, profiles["fp32", ()])
    print(f"\ntotal {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
