"""The first GPU check: one command, unattended, at most 8 minutes on one GPU, no download.

    python benchmarks/gpu_check.py --out gpu_check.json     # on the GPU machine
    python benchmarks/gpu_check.py --dry-run                # every part at tiny sizes (the CPU: < 2 min)

Parts, in this order, each in its own process with its own time limit, so that a crash, a CUDA
error, an out-of-memory or a hang loses that part only; all inside a global budget (`--budget-s`,
450 s by default): a part that would not fit in what is left is skipped, never started late.

1. environment: torch, CUDA, the GPU, FAISS and `faiss.get_num_gpus()`, the commit.
2. train_steps: the paper config (configs/v2.yaml, 224 px), AdamW training steps on synthetic
   batches: float32 without checkpointing at the largest micro-batch that fits (the memory plan
   chooses it for the GPU's memory, at most the paper's 50; halved after an out-of-memory), bf16,
   and bf16 + activation checkpointing (visual blocks, aligners, head), both at micro-batch 50.
   Each: step time (median, `torch.cuda.synchronize()` around every step), samples/s,
   `torch.cuda.max_memory_allocated` (peak stats reset first) beside the memory plan's peak
   (`ddeseg.training.memory_plan.plan`, measured on this GPU at micro-batches 1 and 2) and their ratio.
3. cuda_tests: `pytest -m cuda tests/test_cuda.py`: passed / failed / skipped, with names.
4. faiss: K-Means of 100k x 768 points, k 128, 25 iterations at most, from the same initial
   centroids on the GPU and on the CPU (FAISS, `ddeseg.pipelines.build_memory_bank.kmeans_faiss`):
   the time of each and the inertia ratio (within 1% passes).
5. loader: the real training loader on shards written here (synthetic v2 videos at 224 px,
   `prepare`), samples/s alone, then feeding the fastest step of part 2 (pinned memory,
   non-blocking copies): the fraction of the wall time spent waiting for the next batch.
6. predict: the library's `ddeseg predict` path (decode, model, masks, overlay video) on a
   720p H.264 + AAC clip with the paper model, every frame sampled: frames/s.
7. compile: `torch.compile` (inductor) on / off step time (bf16, micro-batch 50) and the time
   of the first compiled step.

The JSON (`--out`) is rewritten after every part, so a killed run keeps what it measured; a
markdown table is printed at the end. On a machine without CUDA, the figures only a GPU can give
print as "cpu" in the table (the JSON keeps what the CPU measured). Weights are random and data
synthetic: the numbers are costs, not accuracies.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent
CHECKPOINTED = ("aligners", "head", "visual_blocks")
DEFAULT_BUDGET_S = 450.0
# Lines of a failed part's log kept in the JSON (its work folder is deleted).
LOG_TAIL_LINES = 25
# What the parts import beyond torch (a fresh GPU image may lack some: the environment part
# lists them, and only the parts that need one fail).
MODULES = ("ddeseg", "webdataset", "librosa", "soundfile", "soxr", "faiss", "av", "pyarrow", "typer", "rich",
           "jinja2", "matplotlib", "sklearn", "pytest")
# The installed layout (pyproject's package-dir): these live at the top of the repository.
MAPPED_PACKAGES = {"ddeseg.pipelines": "pipelines", "ddeseg.cli": "cli", "ddeseg.configs": "configs"}


@dataclass(frozen=True)
class Sizes:
    """What every part measures at: the paper's sizes, or tiny ones for `--dry-run`."""

    config: str
    overrides: tuple[str, ...]
    batch: int  # the paper's micro-batch of the bf16 steps (and the fp32 step's upper bound)
    warmup_steps: int
    timed_steps: int
    faiss_points: int
    faiss_dim: int
    faiss_k: int
    faiss_niter: int
    loader_videos: int
    loader_batches: int  # batches timed, after the workers' first
    loader_workers: int | None  # None: the config's data.num_workers
    video: tuple[int, int, int, int]  # width, height, seconds, frames/s of the predict clip
    compile_backend: str | None  # None: torch.compile's default (inductor)
    cpu_budget: str  # the memory the plan may use for the fp32 micro-batch without a GPU


FULL = Sizes(
    config="v2", overrides=("data.image_size=224",), batch=50, warmup_steps=2, timed_steps=5,
    faiss_points=100_000, faiss_dim=768, faiss_k=128, faiss_niter=25,
    loader_videos=24, loader_batches=12, loader_workers=None, video=(1280, 720, 8, 25),
    compile_backend=None, cpu_budget="16GiB",
)
# Every code path of FULL, seconds each on a CPU: the demo's CPU-scale model (every module of the
# paper model, small widths) at 32 px. Dynamo's `eager` backend: inductor's C++ build takes
# minutes on a small CPU and is what the real run measures.
DRY = Sizes(
    config="demo", overrides=("data.image_size=32", "memory_bank.k=8"), batch=2, warmup_steps=1, timed_steps=2,
    faiss_points=2000, faiss_dim=768, faiss_k=16, faiss_niter=5,
    loader_videos=3, loader_batches=3, loader_workers=2, video=(160, 96, 2, 4),
    compile_backend="eager", cpu_budget="4GiB",
)


@dataclass(frozen=True)
class Part:
    name: str
    function: str  # the child's function, `part_<name>`
    min_s: float  # not started with less than this left of the budget
    limit_s: float  # its own time limit (the budget's rest, if smaller)


PARTS = (
    Part("environment", "part_environment", 10, 60),
    Part("train_steps", "part_train_steps", 60, 180),
    Part("cuda_tests", "part_cuda_tests", 45, 150),
    Part("faiss", "part_faiss", 20, 90),
    Part("loader", "part_loader", 45, 120),
    Part("predict", "part_predict", 30, 90),
    Part("compile", "part_compile", 60, 240),
)


# --------------------------------------------------------------------------------------------
# The child side: one part per process
# --------------------------------------------------------------------------------------------


class Child:
    """One part's process: its sizes, work folder, deadline, and the result it saves as it goes
    (a part killed at its time limit keeps what it had saved)."""

    def __init__(self, part: str, sizes: Sizes, work: Path, result_path: Path, deadline: float, previous: dict):
        self.part, self.sizes, self.work = part, sizes, work
        self.result_path, self.deadline, self.previous = result_path, deadline, previous
        self.result: dict[str, Any] = {"rows": []}
        import torch

        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda") if self.cuda else torch.device("cpu")

    def left_s(self) -> float:
        return self.deadline - time.time()

    def row(self, label: str, value: str, gpu: bool = False) -> None:
        """A table row; `gpu`: a figure only a GPU gives (printed "cpu" without CUDA)."""
        self.result["rows"].append([label, value, gpu])
        self.save()

    def save(self) -> None:
        temporary = self.result_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.result, indent=1, default=_json_default))
        temporary.replace(self.result_path)

    def synchronize(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def free(self) -> None:
        """Between measurements: collect, empty the CUDA cache, reset the peak statistics."""
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}"


def _is_oom(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def _gib(size: float | None) -> str:
    return "-" if size is None else f"{size / 2**30:.2f} GiB"


# ---- shared pieces: the model, the batch, a training step


def _config(sizes: Sizes, extra: tuple[str, ...] = ()):
    from ddeseg.config import load_config

    return load_config(sizes.config, [*sizes.overrides, *extra])


def _model(config, device):
    """The config's DDESeg with random weights and a random memory bank of `memory_bank.k`
    entries per class (the aligners attend over all of them), on `device`."""
    import torch

    from ddeseg.models import build_model

    torch.manual_seed(0)
    model = build_model(config.model)
    classes = max(config.model.num_classes, config.model.derived_semantics)
    model.set_memory_bank(torch.randn(classes, config.memory_bank.k, config.model.audio_embed_dim))
    return model.to(device)


class Stepper:
    """AdamW training steps of `module` (the model, or its compiled wrapper) on one batch, as
    the trainer takes them: autocast forward, float32 loss, backward, optimizer step."""

    def __init__(self, child: Child, model, config, precision: str, module=None):
        import torch

        from ddeseg.losses import SegmentationLoss

        self.child, self.model, self.module = child, model, module or model
        self.precision = precision
        train = config.train
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=train.base_lr,
            betas=tuple(train.betas), eps=train.eps, weight_decay=train.weight_decay,
        )
        self.loss_fn = SegmentationLoss(config.loss, config.model.num_classes).to(child.device)

    def step(self, image, logmel, target) -> float:
        from ddeseg.training.precision import autocast

        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.child.device.type, self.precision):
            logits = self.module(image, logmel)
        loss, _ = self.loss_fn(logits.float(), target)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def timed(self, batch, warmup: int, timed: int) -> dict[str, Any]:
        """Median seconds of `timed` steps after `warmup` (synchronised around each), and the
        allocator's peak over the timed steps (the optimizer state exists by then)."""
        import torch

        for _ in range(warmup):
            self.step(*batch)
        self.child.synchronize()
        if self.child.cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds = []
        for _ in range(timed):
            self.child.synchronize()
            started = time.perf_counter()
            loss = self.step(*batch)
            self.child.synchronize()
            seconds.append(time.perf_counter() - started)
        micro = int(batch[0].shape[0])
        step_s = statistics.median(seconds)
        return {
            "micro_batch": micro, "step_s": step_s, "samples_per_s": micro / step_s, "step_times_s": seconds,
            "loss": float(loss),
            "max_memory_allocated": torch.cuda.max_memory_allocated() if self.child.cuda else None,
            "max_memory_reserved": torch.cuda.max_memory_reserved() if self.child.cuda else None,
        }

    def close(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        del self.optimizer
        self.child.free()


def _batch(config, micro: int, device):
    import torch

    from ddeseg.training.memory_plan import _measurement_batch

    return _measurement_batch(config, micro, device, torch.Generator().manual_seed(micro))


def _fastest_step(previous: dict, default_batch: int) -> tuple[str, tuple[str, ...], int]:
    """(precision, checkpointing, micro-batch) of part 2's fastest step per sample; bf16 at
    the paper's batch when part 2 has none."""
    variants = [v for v in previous.get("train_steps", {}).get("variants", []) if v.get("samples_per_s")]
    if not variants:
        return "bf16", (), default_batch
    best = max(variants, key=lambda v: v["samples_per_s"])
    return best["precision"], tuple(best["checkpointing"]), int(best["micro_batch"])


# ---- 1. environment


def part_environment(child: Child) -> None:
    import torch

    info: dict[str, Any] = {
        "torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": child.cuda,
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "host": platform.node(),
    }
    child.result.update(info)
    child.row("torch / CUDA build", f"{torch.__version__} / {torch.version.cuda}")
    import importlib.util

    missing = [name for name in MODULES if importlib.util.find_spec(name) is None]
    child.result["missing_modules"] = missing
    child.row("Python modules missing", ", ".join(missing) or "none")
    if child.cuda:
        props = torch.cuda.get_device_properties(0)
        child.result.update({
            "gpu_name": props.name, "gpu_memory_bytes": props.total_memory, "gpu_count": torch.cuda.device_count(),
            "capability": f"{props.major}.{props.minor}", "bf16_supported": torch.cuda.is_bf16_supported(),
            "cudnn": torch.backends.cudnn.version(),
        })
    child.row("GPU", f"{child.result.get('gpu_name')} x {child.result.get('gpu_count')}", gpu=True)
    child.row("GPU memory", _gib(child.result.get("gpu_memory_bytes")), gpu=True)
    try:
        import faiss

        child.result.update({"faiss": faiss.__version__, "faiss_gpus": faiss.get_num_gpus()})
        child.row("FAISS / GPUs it sees", f"{faiss.__version__} / {faiss.get_num_gpus()}")
    except Exception as error:  # noqa: BLE001 (recorded: the faiss part says what it means)
        child.result["faiss_error"] = _one_line(error)
        child.row("FAISS", child.result["faiss_error"])
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        child.result["commit"] = commit
    child.save()


# ---- 2. training steps against the memory plan


def part_train_steps(child: Child) -> None:
    from ddeseg.errors import DDESegError
    from ddeseg.training.memory_plan import choose_micro_batch, plan, profile_activations
    from ddeseg.units import parse_bytes

    sizes = child.sizes
    config = _config(sizes)
    model = _model(config, child.device)
    if child.cuda:
        import torch

        budget = torch.cuda.get_device_properties(0).total_memory
    else:
        budget = parse_bytes(sizes.cpu_budget)
    child.result.update({"config": sizes.config, "image_size": config.data.image_size, "budget_bytes": budget,
                         "variants": []})
    variants = (("fp32", (), None), ("bf16", (), sizes.batch), ("bf16", CHECKPOINTED, sizes.batch))
    for precision, parts, micro in variants:
        largest = micro is None
        label = f"{precision}{' + checkpointing' if parts else ''}"
        entry: dict[str, Any] = {"precision": precision, "checkpointing": list(parts)}
        child.result["variants"].append(entry)
        if child.left_s() < 20:
            entry["status"] = "skipped: part time limit"
            child.row(f"step {label}", entry["status"])
            continue
        started = time.time()
        try:
            model.set_activation_checkpointing(parts)
            profile = profile_activations(config, precision, parts, model=model)
            if largest:  # the largest that fits, by the plan, at most the paper's batch
                try:
                    micro, _ = choose_micro_batch(config, budget, sizes.batch, 1, precision=precision,
                                                  checkpointing=parts, model=model)
                except DDESegError as error:
                    entry["plan_says"] = _one_line(error)
                    micro = 1
                entry["chosen_by_plan"] = micro
            measured = _steps_backing_off(child, model, config, precision, micro, entry, halve=largest)
            planned = plan(config, measured["micro_batch"], precision, parts, profile=profile, model=model)
            entry.update(measured)
            entry.update({"planned_peak": planned.peak_bytes, "planned_transient": planned.transient_bytes,
                          "status": "ok"})
            if measured["max_memory_allocated"]:
                entry["measured_over_planned"] = measured["max_memory_allocated"] / planned.peak_bytes
            ratio = entry.get("measured_over_planned")
            child.row(f"step {label}, micro-batch {measured['micro_batch']}",
                      f"{measured['step_s'] * 1000:.0f} ms ({measured['samples_per_s']:.1f} samples/s)", gpu=True)
            child.row(f"  max_memory_allocated / plan ({label})",
                      f"{_gib(measured['max_memory_allocated'])} / {_gib(planned.peak_bytes)}"
                      + (f" = {ratio:.2f}" if ratio else ""), gpu=True)
        except Exception as error:  # noqa: BLE001 (one variant's failure keeps the others)
            entry["status"] = ("oom: " if _is_oom(error) else "failed: ") + _one_line(error)
            entry["traceback"] = traceback.format_exc(limit=6)
            child.row(f"step {label}", entry["status"])
        finally:
            entry["seconds"] = time.time() - started
            model.set_activation_checkpointing(())
            child.free()
            child.save()


def _steps_backing_off(child: Child, model, config, precision: str, micro: int, entry: dict, halve: bool) -> dict:
    """Timed steps at `micro`; after an out-of-memory, at half of it (when `halve`), down to 1."""
    while True:
        stepper = Stepper(child, model, config, precision)
        try:
            return stepper.timed(_batch(config, micro, child.device), child.sizes.warmup_steps, child.sizes.timed_steps)
        except Exception as error:
            if not (_is_oom(error) and halve and micro > 1):
                raise
            entry.setdefault("oom_at", []).append(micro)
            micro //= 2
        finally:
            stepper.close()


# ---- 3. the cuda-marked tests


def pytest_configure(config: Any) -> None:
    """Part 3 loads this file into pytest as a plugin (`-p gpu_check`): an uninstalled checkout
    then imports as an installed one."""
    _importable_checkout()


def part_cuda_tests(child: Child) -> None:
    report = child.work / "cuda_tests.xml"
    command = [sys.executable, "-m", "pytest", "-p", "gpu_check", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
               f"--junitxml={report}", str(REPO / "tests" / "test_cuda.py")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCHMARKS), os.environ.get("PYTHONPATH")]))}
    # The reference fixtures live beside the repository (../shared/reference); a copy inside it
    # (shared/reference, what travels to a lent GPU machine) is used when nothing else is set.
    if "DDESEG_REFERENCE_DIR" not in env and (REPO / "shared" / "reference").is_dir():
        env["DDESEG_REFERENCE_DIR"] = str(REPO / "shared" / "reference")
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env,
                               timeout=max(10.0, child.left_s() - 5))
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failed, skip_reasons = [], set()
    if report.exists():
        for case in ElementTree.parse(report).getroot().iter("testcase"):
            outcome = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
            if outcome is None:
                counts["passed"] += 1
            elif outcome.tag == "skipped":
                counts["skipped"] += 1
                skip_reasons.add(" ".join((outcome.get("message") or "").split())[:200])
            else:
                counts["failed"] += 1
                failed.append(f"{case.get('name')}: {' '.join((outcome.get('message') or '').split())[:300]}")
    child.result.update(counts)
    child.result.update({"returncode": completed.returncode, "failed_tests": failed, "skip_reasons": sorted(skip_reasons),
                         "output_tail": completed.stdout.splitlines()[-LOG_TAIL_LINES:]})
    child.row("pytest -m cuda", f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
              + (f" (rc {completed.returncode})" if completed.returncode not in (0,) else ""))
    for name in failed:
        child.row("  failed", name)
    for reason in sorted(skip_reasons):
        child.row("  skipped because", reason)


# ---- 4. FAISS K-Means, GPU against CPU


def part_faiss(child: Child) -> None:
    import faiss
    import numpy as np
    from bench_memory_bank import Size, clustered_embeddings

    from ddeseg.pipelines.build_memory_bank import faiss_inertia, kmeans_faiss

    sizes = child.sizes
    n, dim, k, niter = sizes.faiss_points, sizes.faiss_dim, sizes.faiss_k, sizes.faiss_niter
    points = clustered_embeddings(Size("gpu_check", 1, 1, n, dim, k), seed=0)[1]
    init = points[np.random.default_rng(1).choice(n, k, replace=False)]
    child.result.update({"points": n, "dim": dim, "k": k, "niter": niter, "faiss_gpus": faiss.get_num_gpus()})

    def run(gpu: int | None) -> dict[str, Any]:
        started = time.perf_counter()
        centroids, iterations = kmeans_faiss(points, k, niter=niter, gpu=gpu, init_centroids=init)
        seconds = time.perf_counter() - started
        return {"seconds": seconds, "iterations": iterations, "inertia": faiss_inertia(points, centroids)}

    child.result["cpu"] = run(None)
    cpu = child.result["cpu"]
    child.row(f"FAISS K-Means CPU ({n} x {dim}, k {k})", f"{cpu['seconds']:.2f} s, {cpu['iterations']} iterations")
    if faiss.get_num_gpus() == 0:
        child.result["gpu"] = "FAISS sees no GPU (faiss.get_num_gpus() == 0)"
        child.row("FAISS K-Means GPU", child.result["gpu"], gpu=True)
        return
    kmeans_faiss(points[: 4 * k], k, niter=1, gpu=0)  # GPU resources and kernels, outside the timing
    child.result["gpu"] = gpu = run(0)
    ratio = gpu["inertia"] / cpu["inertia"]
    child.result.update({"inertia_ratio_gpu_over_cpu": ratio, "within_1_percent": abs(ratio - 1) <= 0.01,
                         "speedup_gpu_over_cpu": cpu["seconds"] / gpu["seconds"]})
    child.row("FAISS K-Means GPU", f"{gpu['seconds']:.2f} s, {gpu['iterations']} iterations "
              f"({cpu['seconds'] / gpu['seconds']:.1f}x the CPU)", gpu=True)
    child.row("  inertia GPU / CPU", f"{ratio:.4f} ({'within' if abs(ratio - 1) <= 0.01 else 'NOT within'} 1%)", gpu=True)


# ---- 5. the training loader feeding a step


def part_loader(child: Child) -> None:
    from bench_loader import build_data, time_batches

    from ddeseg.data.stream import make_train_loader

    sizes = child.sizes
    workers_prepare = max(1, min(8, (os.cpu_count() or 2) - 1))
    config = _config(sizes, (f"prepare.workers={workers_prepare}",))
    workers = config.data.num_workers if sizes.loader_workers is None else sizes.loader_workers
    precision, parts, micro = _fastest_step(child.previous, sizes.batch)
    _, shards, data_s = build_data(child.work / "loader", sizes.loader_videos, config.data.image_size, config)
    train_shards = shards / "v2" / "train"
    child.result.update({"videos": sizes.loader_videos, "workers": workers, "micro_batch": micro, "data_s": data_s,
                         "pin_memory": child.cuda, "step": {"precision": precision, "checkpointing": list(parts)}})
    batches = sizes.loader_batches + max(1, workers)

    def loader():
        return make_train_loader(train_shards, config, seed=0, num_batches=batches, num_workers=workers, batch_size=micro)

    alone = time_batches(loader(), batches, warmup=max(1, workers))
    child.result["alone"] = {k: v for k, v in alone.items() if k != "shapes"}
    child.row(f"loader alone ({workers} workers, micro-batch {micro})", f"{alone['steady_samples_per_s']:.1f} samples/s")

    model = _model(config, child.device)
    model.set_activation_checkpointing(parts)
    stepper = Stepper(child, model, config, precision)
    try:
        waits, steps = [], []
        iterator = iter(loader())
        for index in range(batches):
            started = time.perf_counter()
            batch = next(iterator)
            image, target, logmel = (batch[name].to(child.device, non_blocking=True) for name in ("image", "mask", "logmel"))
            waited = time.perf_counter() - started
            stepper.step(image, logmel, target)
            if index == max(1, workers) - 1:  # the workers' first batches and the warm-up step
                child.synchronize()
                fed_started = time.perf_counter()
            elif index >= max(1, workers):
                waits.append(waited)
            steps.append(time.perf_counter() - started)
        child.synchronize()
        fed_s = time.perf_counter() - fed_started
    finally:
        stepper.close()
    samples = micro * len(waits)
    child.result["fed"] = {"steps": len(waits), "seconds": fed_s, "samples_per_s": samples / fed_s,
                           "waiting_s": sum(waits), "waiting_fraction": sum(waits) / fed_s}
    fed = child.result["fed"]
    step_label = f"{precision}{' + checkpointing' if parts else ''}"
    child.row(f"loader feeding the {step_label} step", f"{fed['samples_per_s']:.1f} samples/s", gpu=True)
    child.row("  time waiting for data", f"{100 * fed['waiting_fraction']:.0f}% of the step time", gpu=True)


# ---- 6. predict on a 720p clip


def part_predict(child: Child) -> None:
    from bench_predict import write_checkpoint, write_video

    from ddeseg.pipelines.predict import PredictPaths, load_predictor, predict_to_directory
    from ddeseg.stage import ConfigSource

    width, height, seconds, fps = child.sizes.video
    video = write_video(child.work / f"clip-{height}p.mp4", seconds, width, height, fps)
    checkpoint = write_checkpoint(child.work / "model.pt", child.sizes.config, child.sizes.overrides)
    out = child.work / "predict"
    model, config, names, _ = load_predictor(ConfigSource(), PredictPaths(checkpoint, [video], out), device=child.device)
    started = time.perf_counter()
    result = predict_to_directory(video, model, config, names, out / video.stem, frames_per_second=fps,
                                  batch_size=config.predict.batch_size)
    child.synchronize()
    elapsed = time.perf_counter() - started
    child.result.update({"size": f"{width}x{height}", "seconds": seconds, "fps_in": fps, "frames": result.frames,
                         "predict_s": elapsed, "frames_per_s": result.frames / elapsed,
                         "batch_size": config.predict.batch_size})
    child.row(f"predict, {width}x{height} clip, every frame ({result.frames})",
              f"{result.frames / elapsed:.1f} frames/s", gpu=True)


# ---- 7. torch.compile


def part_compile(child: Child) -> None:
    from ddeseg.training.memory_plan import maybe_compile

    sizes = child.sizes
    config = _config(sizes)
    precision, micro = "bf16", sizes.batch
    model = _model(config, child.device)
    batch = _batch(config, micro, child.device)
    child.result.update({"precision": precision, "micro_batch": micro, "backend": sizes.compile_backend or "inductor"})
    eager = Stepper(child, model, config, precision)
    child.result["eager"] = eager.timed(batch, sizes.warmup_steps, sizes.timed_steps)
    eager.close()
    child.row(f"eager step (bf16, micro-batch {micro})", f"{child.result['eager']['step_s'] * 1000:.0f} ms", gpu=True)
    options = {"backend": sizes.compile_backend} if sizes.compile_backend else {}
    compiled = Stepper(child, model, config, precision, module=maybe_compile(model, True, **options))
    started = time.perf_counter()
    compiled.step(*batch)  # compiles forward and backward
    child.synchronize()
    child.result["first_step_s"] = time.perf_counter() - started
    child.row("  first compiled step (compiling)", f"{child.result['first_step_s']:.0f} s", gpu=True)
    child.result["compiled"] = compiled.timed(batch, max(0, sizes.warmup_steps - 1), sizes.timed_steps)
    compiled.close()
    speedup = child.result["eager"]["step_s"] / child.result["compiled"]["step_s"]
    child.result["speedup"] = speedup
    child.row(f"compiled step ({child.result['backend']})",
              f"{child.result['compiled']['step_s'] * 1000:.0f} ms ({speedup:.2f}x eager)", gpu=True)


def _importable_checkout() -> None:
    """Make `ddeseg` importable from this checkout when it is not installed (a bare GPU image):
    the repository root on the path, and `ddeseg.pipelines` / `.cli` / `.configs` mapped to their
    top-level folders as `pip install -e .` maps them."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("ddeseg") is None:
        sys.path.insert(0, str(REPO))
    for name, folder in MAPPED_PACKAGES.items():
        try:
            found = importlib.util.find_spec(name)
        except ImportError:
            found = None
        if found is None and (REPO / folder / "__init__.py").exists():
            spec = importlib.util.spec_from_file_location(name, REPO / folder / "__init__.py",
                                                          submodule_search_locations=[str(REPO / folder)])
            sys.modules[name] = module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            parent, _, child = name.rpartition(".")
            setattr(importlib.import_module(parent), child, module)


def run_child(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(BENCHMARKS))  # the other benchmarks' helpers
    _importable_checkout()
    function = globals().get(f"part_{args.child}")
    if function is None:
        print(f"gpu_check: no part named {args.child!r}", file=sys.stderr)
        return 2
    sizes = DRY if args.dry_run else FULL
    previous = json.loads(Path(args.previous).read_text()).get("parts", {}) if args.previous else {}
    child = Child(args.child, sizes, Path(args.work), Path(args.result), args.deadline, previous)
    import torch

    if child.cuda:
        torch.cuda.reset_peak_memory_stats()
    elif args.dry_run:
        # A dry run on a small shared CPU: two intra-op threads beside loader workers and other
        # jobs wait for each other (10x slower steps); one is enough to run every code path.
        torch.set_num_threads(1)
    try:
        function(child)
    except Exception as error:
        child.result["status"] = ("oom: " if _is_oom(error) else "failed: ") + _one_line(error)
        child.result["traceback"] = traceback.format_exc(limit=8)
        child.save()
        traceback.print_exc()
        return 1
    child.result["status"] = "ok"
    child.save()
    return 0


# --------------------------------------------------------------------------------------------
# The parent: parts in order, inside the budget
# --------------------------------------------------------------------------------------------


def _run_part(part: Part, args: argparse.Namespace, work: Path, report_path: Path, left_s: float) -> dict:
    """The part in its own process group (its loader workers and pytest's children too), killed
    at its time limit; returns what it saved, with the status and, unless ok, its log's tail."""
    limit = min(part.limit_s, left_s)
    part_work = work / part.name
    if part_work.exists():  # a previous run's (--work): the loader's dataset writer refuses a full folder
        shutil.rmtree(part_work)
    part_work.mkdir(parents=True)
    result_path, log_path = part_work / "result.json", part_work / "log.txt"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", part.name, "--work", str(part_work),
               "--result", str(result_path), "--deadline", str(time.time() + limit), "--previous", str(report_path)]
    if args.dry_run:
        command.append("--dry-run")
    started = time.time()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = process.wait(timeout=limit)
            status = None if returncode == 0 else f"failed: exit status {returncode}"
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = f"timeout: killed after {limit:.0f} s (its time limit)"
        finally:
            with contextlib.suppress(ProcessLookupError):  # workers it left behind
                os.killpg(process.pid, signal.SIGKILL)
    result = json.loads(result_path.read_text()) if result_path.exists() else {"rows": []}
    if status is not None and not str(result.get("status", "")).startswith(("failed", "oom")):
        result["status"] = status
    result.setdefault("status", status or "ok")
    result["seconds"] = time.time() - started
    if result["status"] != "ok":
        result["log_tail"] = log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    return result


def table(report: dict) -> str:
    """The markdown table of every part's rows; GPU-only figures read "cpu" without CUDA."""
    cuda = bool(report["parts"].get("environment", {}).get("cuda_available"))
    lines = ["| part | measurement | value |", "|---|---|---|"]
    for name, result in report["parts"].items():
        status = result.get("status", "?")
        lines.append(f"| **{name}** | status | {status} ({result.get('seconds', 0):.0f} s) |")
        for label, value, gpu in result.get("rows", []):
            shown = value if cuda or not gpu else "cpu"
            lines.append(f"| | {label} | {shown.replace('|', '/')} |")
    return "\n".join(lines)


def run_parent(args: argparse.Namespace) -> int:
    started = time.time()
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), "dry_run": args.dry_run,
        "budget_s": args.budget_s, "sizes": asdict(DRY if args.dry_run else FULL), "parts": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(report, indent=1) + "\n")

    wanted = [p for p in PARTS if not args.parts or p.name in args.parts]
    save()
    with _work_dir(args.work) as work:
        for part in wanted:
            left = args.budget_s - (time.time() - started)
            if left < part.min_s:
                report["parts"][part.name] = {"status": f"skipped: {left:.0f} s of the budget left, needs {part.min_s:.0f}",
                                              "rows": []}
            else:
                print(f"[gpu_check] {part.name} (at most {min(part.limit_s, left):.0f} s) ...", file=sys.stderr, flush=True)
                report["parts"][part.name] = _run_part(part, args, work, out, left)
            print(f"[gpu_check] {part.name}: {report['parts'][part.name]['status']}", file=sys.stderr, flush=True)
            save()
    report["total_s"] = time.time() - started
    save()
    print(table(report))
    print(f"\ntotal {report['total_s']:.0f} s of a {args.budget_s:.0f} s budget; JSON: {out}")
    return 0


@contextlib.contextmanager
def _work_dir(path: str | None) -> Iterator[Path]:
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
    else:
        with tempfile.TemporaryDirectory(prefix="gpu_check-") as directory:
            yield Path(directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check.json", help="the JSON report (default: gpu_check.json)")
    parser.add_argument("--dry-run", action="store_true", help="every part at tiny sizes (a CPU check of the script)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"global time budget in seconds (default {DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--parts", type=lambda text: text.split(","),
                        help=f"only these parts, comma-separated: {','.join(p.name for p in PARTS)}")
    parser.add_argument("--work", help="keep the work files (shards, clip, logs) in WORK/<part>/ (replaced on each "
                        "run) instead of a temporary folder")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--previous", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.parts and set(args.parts) - {p.name for p in PARTS}:
        parser.error(f"--parts: unknown {sorted(set(args.parts) - {p.name for p in PARTS})}; "
                     f"choose from {', '.join(p.name for p in PARTS)}")
    if args.budget_s <= 0:
        parser.error("--budget-s must be positive")
    return run_child(args) if args.child else run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
