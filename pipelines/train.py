"""The DDESeg training recipe: one readable loop.

`train` = `check_inputs` (every user-fixable error, before any work) -> `build_run` (model,
optimizer, schedule; the resumed state) -> `run_training_loop` (epochs of `train_step`: forward,
loss, backward over the accumulated micro-batches, one optimizer step; then `after_step`: log,
`validate`, `save_checkpoint`). Runs in one process or under `torchrun` (DDP; NCCL on GPU, gloo on
CPU). Everything it writes goes under one run directory:

    RUN_DIR/config.yaml      the resolved config
    RUN_DIR/metrics.jsonl    one JSON object per log/eval event
    RUN_DIR/last.pt          written every `train.checkpoint_every` steps, at the end, and on Ctrl-C
    RUN_DIR/best.pt          best validation mIoU (the val split; never test)
    RUN_DIR/data_errors/     samples the loader skipped (key, shard, reason), one file per worker
    RUN_DIR/run.json         per start: command line, ddeseg version, git commit, start-up table
    RUN_DIR/train.log        a plain-text copy of what the run printed

Exact resume: the data stream of epoch `e` is a pure function of (seed, e, rank, worker), so
`--resume` rebuilds the epoch's loader and skips the batches already consumed; with the model,
optimizer, scheduler, scaler and RNG states restored, N steps straight and N/2 + N/2 resumed give
identical weights (tested on the CPU).

A run folder that already holds a run is refused unless `--resume` (continue it; the config
must be the run's, see `RESUME_MAY_CHANGE`) or `--overwrite` (replace it) is given.

Memory (`ddeseg.training.memory_plan`): `train.activation_checkpointing`, SyncBatchNorm under torchrun on CUDA
(`train.sync_batchnorm`), `train.compile`, and the run's precision (`run_precision`: autocast on
CUDA; float32 on the CPU unless `train.cpu_autocast`). With `train.gpu_memory` the memory plan
picks the micro-batch and the accumulation that keep the configured batch
(`data.batch_size x ranks x train.grad_accum`); the choice is stored in the checkpoints and
reused by `--resume`, never planned again, so a resumed run stays exact.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from ddeseg.bank import read_memory_bank
from ddeseg.config import RESUME_MAY_CHANGE, Config, save_config, to_dict
from ddeseg.data.shards import ShardIndex
from ddeseg.data.stream import count_data_errors, make_eval_loader, make_train_loader
from ddeseg.distributed import DistributedContext, all_reduce_mean, all_reduce_sum, barrier
from ddeseg.errors import DDESegError
from ddeseg.fileio import reporting_disk_full, write_bytes_atomic
from ddeseg.losses import SegmentationLoss
from ddeseg.models import build_model, load_checkpoint
from ddeseg.progress import console, training_progress
from ddeseg.runlock import writer_lock
from ddeseg.scoring import evaluate_model
from ddeseg.training.checkpoint import (
    check_resumable,
    load_training_checkpoint,
    restore_training_state,
    save_training_checkpoint,
    stored_batch_plan,
    stored_config,
    training_payload,
)
from ddeseg.training.memory_plan import (
    BATCHNORM_NOTE,
    MemoryPlan,
    choose_micro_batch,
    convert_sync_batchnorm,
    maybe_compile,
    plan,
)
from ddeseg.training.precision import autocast, run_precision
from ddeseg.training.run_info import (
    LOG_FILE,
    ConsoleCopy,
    check_run_dir,
    clear_run_outputs,
    record_inputs,
    write_run_info,
)
from ddeseg.training.run_log import RunLog
from ddeseg.training.schedule import epoch_schedule, scheduled_lr
from ddeseg.units import parse_bytes

# What a run folder holds of a run (a second `train` into it needs --resume or --overwrite), and
# what --overwrite clears besides (the old run's skipped-sample reports would be counted again).
RUN_OUTPUTS = ("last.pt", "best.pt", "metrics.jsonl")
REPLACED_BY_OVERWRITE = (*RUN_OUTPUTS, "data_errors")


@dataclass
class TrainRequest:
    """What `ddeseg train` asks for, besides the config."""

    shards_dir: Path
    memory_bank: Path
    out_dir: Path
    resume: str | None = None  # a checkpoint path, or "latest" (RUN_DIR/last.pt)
    init_checkpoints: tuple[Path, ...] = ()  # backbone / audio / official weights to start from
    stop_at: int | None = None  # stop after this step (the schedule still spans train.steps)
    overwrite: bool = False  # replace the run already in out_dir (else it is refused)
    warnings: tuple[str, ...] = ()  # shown at the start and kept in train.log (e.g. a recorded input missing)

    @property
    def resume_path(self) -> Path | None:
        if not self.resume:
            return None
        return self.out_dir / "last.pt" if self.resume == "latest" else Path(self.resume)


@dataclass
class TrainInputs:
    """Everything `train` reads, checked before any work starts (see `check_inputs`)."""

    index: ShardIndex
    train_shards: list[str]
    val_shards: list[str]  # empty: no val split, so no validation and no best.pt
    label_lut: np.ndarray  # stored ids -> the task's ids for this model (read once, given to every loader)
    steps_per_epoch: int
    memory_bank: np.ndarray
    resume_payload: dict[str, Any] | None  # the checkpoint to continue, loaded


@dataclass
class LogWindow:
    """Losses and samples since the last log line."""

    running: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    steps: int = 0
    skipped: int = 0  # steps skipped for a non-finite loss or gradient (train.on_nonfinite skip)
    start: float = field(default_factory=time.time)

    def add(self, losses: dict[str, Any], grad_accum: int, samples: int) -> None:
        """One micro-batch: its losses count 1/grad_accum of the step's."""
        for name, value in losses.items():
            self.running[name] = self.running.get(name, 0.0) + float(value) / grad_accum
        self.samples += samples


@dataclass
class Run:
    """One training run: what `build_run` makes and `train_step` advances."""

    config: Config
    request: TrainRequest
    context: DistributedContext
    inputs: TrainInputs
    model: torch.nn.Module
    train_model: torch.nn.Module  # `model`, or its DDP wrapper under torchrun
    loss_fn: SegmentationLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    precision: str = "fp32"  # what the run trains in on its device (`run_precision`)
    setup: dict[str, str] = field(default_factory=dict)  # memory switches, for the start-up table
    memory_plan: MemoryPlan | None = None  # when planned (`plan_memory`)
    batch_chosen_for: str | None = None  # the train.gpu_memory budget the micro-batch was chosen for
    run_log: RunLog | None = None  # rank 0 only
    step: int = 0
    best: dict[str, Any] = field(default_factory=lambda: {"miou": -1.0, "fscore": 0.0, "step": -1})
    window: LogWindow = field(default_factory=LogWindow)
    stop_requested: bool = False  # SIGTERM/Ctrl-C seen by this rank (`_stop_at_step_boundary`)
    stop_agreed: bool = False  # some rank saw one: every rank stops after this step
    nonfinite_in_a_row: int = 0

    @property
    def device(self) -> torch.device:
        return self.context.device

    @property
    def errors_dir(self) -> Path:
        return self.request.out_dir / "data_errors"

# --------------------------------------------------------------------------------------------
# Optimisation
# --------------------------------------------------------------------------------------------


def build_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    """AdamW as the official `util_tools/optimizers.py`: two groups, in `named_parameters()`
    order, of the trainable parameters (the frozen audio backbone is in neither): group 0 with
    `train.weight_decay`, group 1 (decay 0) the 1-D parameters (norm scales, biases) and every
    parameter whose name ends in `.bias`; both start at `train.base_lr`,
    with `train.betas` and `train.eps`. (The official rule is `len(shape) == 1`: a 0-d parameter
    would decay there; the model has none, and a test keeps it so.)"""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue  # the frozen audio backbone
        (no_decay if parameter.ndim == 1 or name.endswith(".bias") else decay).append(parameter)
    train = config.train
    return torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train.base_lr,
        betas=tuple(train.betas),
        eps=train.eps,
        weight_decay=train.weight_decay,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, config: Config) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate of every group = its initial lr x `learning_rate_factor(step)`, stepped
    after every optimizer step. Stateless but for the step count (`last_epoch`), so a resumed
    run continues the same sequence."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, config))


def learning_rate_factor(step: int, config: Config) -> float:
    """`train`'s learning rate at optimizer step `step` over `train.base_lr` (the LambdaLR
    factor) under `train.schedule`: `official` (the official scheduler's sequence) or
    `warmup_cosine` (ours, from `warmup_lr` through `base_lr` to `min_lr`). A pure function of
    the global step, so a resumed run continues the same sequence."""
    train = config.train
    lr = scheduled_lr(
        train.schedule,
        step,
        base_lr=train.base_lr,
        min_lr=train.min_lr,
        warmup_steps=train.warmup_steps,
        total_steps=train.steps,
        warmup_lr=train.warmup_lr,
    )
    return lr / train.base_lr


def configured_batch(config: Config, world_size: int) -> int:
    """The batch of one optimizer step over all ranks: data.batch_size x ranks x train.grad_accum."""
    return config.data.batch_size * world_size * config.train.grad_accum


# --------------------------------------------------------------------------------------------
# Setup: check every input, then build the run
# --------------------------------------------------------------------------------------------


def train(config: Config, request: TrainRequest, context: DistributedContext) -> dict[str, Any]:
    """Train DDESeg on the shards; returns a summary (best metrics, paths)."""
    config = copy.deepcopy(config)  # derived values below must not leak into the caller's config
    torch.manual_seed(config.train.seed + context.rank)
    np.random.seed(config.train.seed + context.rank)
    inputs = check_inputs(config, request, context)
    barrier()  # every rank has checked the run folder before rank 0 writes to it
    # One writer per run folder (rank 0 holds the lock); a full disk is one line naming it.
    with writer_lock(request.out_dir, "ddeseg train", enabled=context.is_main), reporting_disk_full(request.out_dir, "the run"):
        return _train_locked(config, request, context, inputs)


def _train_locked(config: Config, request: TrainRequest, context: DistributedContext, inputs: TrainInputs) -> dict[str, Any]:
    run = build_run(config, request, context, inputs)
    if context.is_main and inputs.resume_payload is not None:
        # After a SIGKILL the log may hold records past the checkpoint: the resumed run writes
        # them again, so drop them (no step is logged twice).
        forget_records_after(request.out_dir / "metrics.jsonl", run.step)
    start_run_dir(run)
    started = time.time()
    interrupted = run_training_loop(run)
    barrier()
    summary = {
        "steps": run.step,
        "interrupted": interrupted,
        "best": run.best,
        "skipped_samples": count_data_errors(run.errors_dir),
        "seconds": time.time() - started,
        "run_dir": str(request.out_dir),
    }
    if run.run_log is not None:
        run.run_log.log({"event": "end", **summary})
        _print_end_summary(summary, request.out_dir)  # before close: train.log keeps it
        run.run_log.close()
    if interrupted:
        raise KeyboardInterrupt
    return summary


def check_inputs(config: Config, request: TrainRequest, context: DistributedContext) -> TrainInputs:
    """Every check a user can fail, before any work and any write: the run folder, the shards
    and the task's class count, the memory bank, the checkpoint to resume and its config.
    Derives `train.steps` (and `warmup_steps`) in `config` from the data when the config gives
    the schedule in epochs."""
    check_run_dir(request.out_dir, outputs=RUN_OUTPUTS, resume=bool(request.resume), overwrite=request.overwrite)
    index = ShardIndex(request.shards_dir)
    _check_task_classes(config, index)
    train_shards = index.shards(config.task, "train")
    val_shards = index.shards(config.task, "val") if index.has_split(config.task, "val") else []
    run_precision(config, context.device)  # fp16 on the CPU: refused here, before any work
    # An epoch is one pass over the data: steps of the configured batch (accumulation included).
    global_batch = configured_batch(config, context.world_size)
    steps_per_epoch = max(1, math.ceil(index.count(config.task, "train", annotated_only=True) / global_batch))
    # The official schedule is in epochs: derive steps from this dataset's size.
    config.train.steps, config.train.warmup_steps = epoch_schedule(config.train, steps_per_epoch)
    bank = read_memory_bank(
        request.memory_bank,
        classes=len(index.bank_class_ids(config.task)),
        embed_dim=config.model.audio_embed_dim,
        task=f"{config.task} of {request.shards_dir}",
    )
    payload = None
    if request.resume_path is not None:
        payload = load_training_checkpoint(request.resume_path)
        check_resumable(payload, request.resume_path)
        reuse_batch_plan(config, payload, context.world_size, request.resume_path)
        check_resume_config(stored_config(payload), config, request.resume_path)
    label_lut = index.label_lut(config.task, config.model.num_classes)
    return TrainInputs(index, train_shards, val_shards, label_lut, steps_per_epoch, bank, payload)


def reuse_batch_plan(config: Config, payload: dict[str, Any], world_size: int, checkpoint: Path) -> None:
    """On --resume: the run's micro-batch and accumulation, as its checkpoint stores them
    (`batch_plan`), into `config`; never planned again (another budget or plan would change the
    micro-batches, and BatchNorm sees each one). The configured batch and ranks must be the run's."""
    stored = stored_batch_plan(payload)
    if not stored:
        return  # a checkpoint from before batch plans: its config holds the micro-batch
    batch = configured_batch(config, world_size)
    if (stored["batch"], stored["world_size"]) != (batch, world_size):
        raise DDESegError(
            f"--resume {checkpoint}: the run's batch is {stored['micro_batch']} x {stored['world_size']} rank(s) x"
            f" {stored['grad_accum']} accumulation = {stored['batch']}, but this config and {world_size} rank(s) make"
            f" {batch}: resume with the run's data.batch_size, train.grad_accum and number of ranks"
        )
    config.data.batch_size, config.train.grad_accum = stored["micro_batch"], stored["grad_accum"]


def _check_task_classes(config: Config, index: ShardIndex) -> None:
    """The model's output classes must be the task's (1 for a binary task), as `evaluate`
    requires: a 3-class model on a 9-class task would silently skip every sample with a higher
    class id, and a softmax trained on a binary task could not be evaluated."""
    protocol = index.protocol(config.task)
    expected = 1 if protocol.get("binary") else protocol.get("num_classes")
    if expected is None or config.model.num_classes == expected:
        return
    kind = "binary (1 output class)" if protocol.get("binary") else f"{expected} classes (background included)"
    raise DDESegError(
        f"config model.num_classes is {config.model.num_classes} but task {config.task!r} of {index.root} is {kind}:"
        f" set model.num_classes={expected} (in the config or --set), or use the config made for this task"
    )


def check_resume_config(saved: dict[str, Any], config: Config, checkpoint: Path) -> None:
    """Refuse to resume a run under a config that differs from the one it was trained with, in
    any key but `RESUME_MAY_CHANGE` (keys missing on either side, e.g. from another ddeseg
    version, are not compared)."""
    before, now = _flatten(saved), _flatten(to_dict(config))
    changed = [
        key
        for key in sorted(before.keys() & now.keys())
        if before[key] != now[key] and not any(key == allowed or (allowed.endswith(".") and key.startswith(allowed)) for allowed in RESUME_MAY_CHANGE)
    ]
    if changed:
        shown = ", ".join(f"{key} ({before[key]!r} -> {now[key]!r})" for key in changed[:6])
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise DDESegError(
            f"--resume {checkpoint}: the run was trained with another config: {shown}{more};"
            " resume with the run's own settings (its config.yaml), or start a new run (--overwrite or another --out)"
        )


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def build_run(config: Config, request: TrainRequest, context: DistributedContext, inputs: TrainInputs) -> Run:
    """Model (memory bank, `--init` weights), loss, optimizer, schedule and scaler; the resumed
    state when `inputs` carries one; the DDP wrapper under torchrun."""
    device = context.device
    model = build_model(config.model)
    model.set_memory_bank(inputs.memory_bank)  # checks the embedding dim against the model
    filterbank_from = None
    for path in request.init_checkpoints:
        report = load_checkpoint(model, path)
        filterbank_from = path if report.filterbank_replaced else filterbank_from
        if context.is_main:
            console.print(f"[bold]init[/] {path}: {report.summary()}")
    model, setup = setup_model(model, config, context)
    model.to(device)
    optimizer = build_optimizer(model, config)
    run = Run(
        config=config,
        request=request,
        context=context,
        inputs=inputs,
        model=model,
        train_model=model,
        loss_fn=SegmentationLoss(config.loss, config.model.num_classes).to(device),
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, config),
        scaler=torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and config.train.precision == "fp16"),
        precision=run_precision(config, device),
        setup=setup,
    )
    plan_memory(run)  # may refuse (nothing fits): still before any write
    if inputs.resume_payload is not None:
        restore_run(run, inputs.resume_payload)
    # The shards' log-mels must come from the filterbank the model now carries (an HTS-AT
    # checkpoint brings its own): refuse to train on log-mels made with another one.
    inputs.index.check_frontend(model, checkpoint=filterbank_from)
    if context.is_distributed:
        # find_unused_parameters: the official aligners hold projections and norms that the
        # forward never uses (kept so official checkpoints load strictly); DDP must not wait
        # for their grads.
        run.train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    # Checkpoints save `run.model.state_dict()`: the weights without the compiled wrapper's prefix.
    run.train_model = maybe_compile(run.train_model, config.train.compile)
    return run


def setup_model(model: torch.nn.Module, config: Config, context: DistributedContext) -> tuple[torch.nn.Module, dict[str, str]]:
    """Activation checkpointing (`train.activation_checkpointing`) and, for multi-rank CUDA runs,
    every BatchNorm -> SyncBatchNorm (`train.sync_batchnorm`, as the official code under DDP).
    Returns the model and what was set, as rows of the start-up table."""
    train = config.train
    model.set_activation_checkpointing(train.activation_checkpointing)
    batchnorms = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if not train.sync_batchnorm:
        sync = "off (train.sync_batchnorm false)"
    elif context.world_size == 1:
        sync = "off (one rank)"
    elif context.device.type != "cuda":
        # PyTorch's SyncBatchNorm runs on CUDA only; gloo ranks normalise with their own batch.
        sync = f"off: SyncBatchNorm needs CUDA; each of the {context.world_size} CPU ranks keeps its own statistics"
    else:
        model = convert_sync_batchnorm(model, True)
        sync = f"on: {batchnorms} BatchNorm layers over {context.world_size} ranks"
    return model, {
        "activation checkpointing": ", ".join(train.activation_checkpointing) or "off",
        "sync BatchNorm": sync,
        "compile": "on (torch.compile; the first steps compile)" if train.compile else "off",
    }


def plan_memory(run: Run) -> None:
    """The run's memory plan (`ddeseg.training.memory_plan.plan`), measured on its model and device when
    `train.gpu_memory` is set, `train.memory_plan` is true, or it is null and the device is CUDA
    (measuring takes seconds on a GPU, minutes for the paper config on the CPU).

    With `train.gpu_memory` on a new run, the micro-batch and accumulation are chosen first
    (`choose_micro_batch`: the largest that fits, keeping the configured batch) and written into
    `run.config` (data.batch_size, train.grad_accum); a resumed run keeps its own. Every rank
    plans alike (the count is a function of the config and the device type). Raises
    `DDESegError` when even micro-batch 1 does not fit."""
    config, world = run.config, run.context.world_size
    train = config.train
    wanted = train.memory_plan if train.memory_plan is not None else run.device.type == "cuda"
    if train.gpu_memory is None and not wanted:
        return
    parts = run.model.activation_checkpointing()
    if train.gpu_memory is not None and run.inputs.resume_payload is None:
        config.data.batch_size, train.grad_accum = choose_micro_batch(
            config, parse_bytes(train.gpu_memory), configured_batch(config, world), world,
            precision=run.precision, checkpointing=parts, model=run.model,
        )
        run.batch_chosen_for = train.gpu_memory
    run.memory_plan = plan(config, config.data.batch_size, run.precision, parts, world_size=world, model=run.model)


def restore_run(run: Run, payload: dict[str, Any]) -> None:
    """Continue from a training checkpoint: weights, optimizer, schedule, scaler, step, best
    and this rank's RNG state."""
    run.step, run.best = restore_training_state(
        payload, run.model, run.optimizer, run.scheduler, run.scaler, run.context.rank
    )
    if run.context.is_main:
        console.print(f"[bold]resumed[/] from {run.request.resume_path} at step {run.step}")


def start_run_dir(run: Run) -> None:
    """Rank 0: the run folder with the resolved config, the start summary and the metrics log
    (appended to on --resume; an --overwrite first clears the old run's outputs)."""
    if not run.context.is_main:
        return
    out_dir, config = run.request.out_dir, run.config
    if run.request.overwrite:
        clear_run_outputs(out_dir, REPLACED_BY_OVERWRITE)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Self-describing: the inputs (absolute, fingerprinted) in config.yaml, so that
    # `ddeseg train --config RUN_DIR/config.yaml --out NEW` reruns it; run.json; train.log.
    request, resume = run.request, bool(run.request.resume)
    record_inputs(config, request.shards_dir, request.memory_bank, request.init_checkpoints)
    save_config(config, out_dir / "config.yaml")
    if not resume:
        (out_dir / LOG_FILE).write_text("")
    log_copy = ConsoleCopy(out_dir / LOG_FILE, console)
    for warning in request.warnings:
        console.print(f"[yellow]warning[/]: {warning}", markup=True)
    _print_start_summary(run)
    write_run_info(out_dir, log_copy.text, resume)
    run.run_log = RunLog(
        out_dir,
        tensorboard=config.train.tensorboard,
        wandb=config.train.wandb,
        wandb_project=config.train.wandb_project,
        config=to_dict(config),
        resume=resume,
        console_copy=log_copy,
    )


# --------------------------------------------------------------------------------------------
# The loop: epochs of optimizer steps; after a step, log, validate and save when due
# --------------------------------------------------------------------------------------------


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class _StopAtStepBoundary(Exception):
    """Every rank agreed to stop after the step just taken (a SIGTERM or Ctrl-C)."""


def run_training_loop(run: Run) -> bool:
    """Epochs until `train.steps` (or `--stop-at`); returns True when Ctrl-C/SIGTERM stopped it.

    The first SIGTERM/Ctrl-C only asks to stop: the step under way completes (on every rank:
    they agree through the step's collective), last.pt is saved at that step boundary, and the
    run is exactly resumable. A second signal stops at once, without saving over last.pt (the
    model may be half updated then); the last complete last.pt stays."""
    total_steps = run.config.train.steps
    stop_at = min(total_steps, run.request.stop_at or total_steps)
    progress = training_progress(enabled=run.context.is_main)
    run.window = LogWindow()
    run.model.train()
    with progress, _sigterm_as_interrupt(run):
        task_id = progress.add_task("train", total=total_steps, completed=run.step, loss=float("nan"), lr=0.0, rate=0.0)
        show = functools.partial(progress.update, task_id)
        try:
            while run.step < stop_at:
                run_epoch(run, stop_at, show)
        except _StopAtStepBoundary:
            save_checkpoint(run, "last.pt")
            if run.context.is_main:
                console.print(
                    f"[yellow]interrupted[/] (Ctrl-C or SIGTERM): saved {run.request.out_dir / 'last.pt'} at step"
                    f" {run.step}; continue with --resume latest"
                )
            return True
        except KeyboardInterrupt:
            if run.context.is_main:
                console.print(
                    f"[yellow]stopped at once[/] (second signal) during step {run.step + 1}: last.pt holds the last"
                    " completed checkpoint; continue with --resume latest"
                )
            return True
    return False


def run_epoch(run: Run, stop_at: int, show: Callable[..., None]) -> None:
    """The rest of the current epoch (after a resume, the batches already consumed are skipped),
    or until step `stop_at`."""
    config = run.config
    epoch = run.step // run.inputs.steps_per_epoch
    loader = make_train_loader(
        run.inputs.train_shards,
        config,
        seed=config.train.seed,
        epoch=epoch,
        rank=run.context.rank,
        world_size=run.context.world_size,
        num_batches=run.inputs.steps_per_epoch * config.train.grad_accum,
        errors_dir=run.errors_dir,
        label_lut=run.inputs.label_lut,
    )
    skip = (run.step - epoch * run.inputs.steps_per_epoch) * config.train.grad_accum
    batches = itertools.islice(loader, skip, None)  # fast-forward inside the epoch after a resume
    step_at_epoch_start = run.step
    while run.step < stop_at and train_step(run, itertools.islice(batches, config.train.grad_accum)):
        after_step(run, epoch, stop_at, show)
        # Ranks stop together: on a signal seen before this step's collective (else the next
        # step's); one process stops at the first boundary after the signal.
        if run.stop_agreed or (run.stop_requested and not run.context.is_distributed):
            raise _StopAtStepBoundary
    if run.step == step_at_epoch_start:
        raise DDESegError(
            f"the training loader of task {config.task} yielded no batch (epoch {epoch});"
            f" see {run.errors_dir} for samples that failed to decode"
        )


def train_step(run: Run, micro_batches: Iterable[dict[str, Any]]) -> bool:
    """One optimizer step over `train.grad_accum` micro-batches, taken lazily from
    `micro_batches` (each is moved to the device, run forward and backward as it comes).

    Returns False, without stepping, when the micro-batches ran out before a full accumulation
    (the epoch is over; gradients of a partial accumulation stay for the next step).

    A non-finite loss or gradient norm is seen here, before the optimizer step, and agreed on by
    every rank in the step's one extra collective (which also carries a stop request):
    `train.on_nonfinite` stop raises `TrainingDiverged` (nothing is saved over the last good
    checkpoint); skip throws the step's gradients away, counts the step as skipped and goes on,
    until `train.max_nonfinite_in_a_row` steps in a row were skipped."""
    config = run.config
    grad_accum = config.train.grad_accum
    count = 0
    step_losses: list[tuple[dict[str, Any], int]] = []
    for count, batch in enumerate(micro_batches, start=1):
        batch = _to_device(batch, run.device)
        # DDP only syncs gradients on the last micro-batch of an accumulation.
        last_micro = count == grad_accum
        sync = run.train_model.no_sync() if (run.context.is_distributed and not last_micro) else contextlib.nullcontext()
        with sync, autocast(run.device.type, run.precision):
            logits = run.train_model(batch["image"], batch["logmel"])
            loss, parts = run.loss_fn(logits.float(), batch["mask"])
        run.scaler.scale(loss / grad_accum).backward()
        step_losses.append(({"loss": loss.detach(), **parts}, batch["image"].shape[0]))
    if count < grad_accum:
        for losses, samples in step_losses:  # logged as before; its gradients stay for the next step
            run.window.add(losses, grad_accum, samples)
        return False
    grad_norm = None
    if config.train.grad_clip:
        run.scaler.unscale_(run.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.train.grad_clip)
    elif not run.scaler.is_enabled():  # fp16's scaler skips overflowing steps by itself
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in run.model.parameters() if p.grad is not None])
    loss_value = sum(float(losses["loss"]) for losses, _ in step_losses) / grad_accum
    nonfinite = not math.isfinite(loss_value) or (
        grad_norm is not None and not run.scaler.is_enabled() and not bool(torch.isfinite(grad_norm))
    )
    flags = all_reduce_sum(torch.tensor([float(nonfinite), float(run.stop_requested)], device=run.device))
    run.stop_agreed = run.stop_agreed or bool(flags[1] > 0)
    if flags[0] > 0:
        _handle_nonfinite(run, step_losses, grad_norm)
        if run.scaler.is_enabled() and config.train.grad_clip:
            run.scaler.update()  # unscale_ ran: the scaler must close this step (and lowers its scale)
    else:
        run.nonfinite_in_a_row = 0
        for losses, samples in step_losses:
            run.window.add(losses, grad_accum, samples)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.window.steps += 1
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.step += 1
    return True


class TrainingDiverged(DDESegError):
    """The loss or a gradient became non-finite (`train.on_nonfinite`)."""


def _handle_nonfinite(run: Run, step_losses: list[tuple[dict[str, Any], int]], grad_norm: torch.Tensor | None) -> None:
    """A step whose loss or gradient is non-finite on some rank: stop, or skip it (the schedule
    and the data still advance, so a resumed run stays exact)."""
    train = run.config.train
    step = run.step + 1
    terms = {name: sum(float(losses[name]) for losses, _ in step_losses) / len(step_losses) for name in step_losses[0][0]}
    shown = ", ".join(f"{name} {value:.4g}" for name, value in terms.items())
    norm = f"{float(grad_norm):.4g}" if grad_norm is not None else "not measured"
    lr = run.optimizer.param_groups[0]["lr"]
    where = f"non-finite loss or gradient at step {step} (this rank: {shown}; gradient norm {norm}; lr {lr:.3g})"
    run.nonfinite_in_a_row += 1
    if train.on_nonfinite == "stop":
        raise TrainingDiverged(
            f"{where}: stopped, {run.request.out_dir / 'last.pt'} is the last good checkpoint; lower train.base_lr,"
            " or resume with --set train.on_nonfinite=skip to skip such steps"
        )
    if run.nonfinite_in_a_row >= train.max_nonfinite_in_a_row:
        raise TrainingDiverged(
            f"{where}: {run.nonfinite_in_a_row} steps in a row were non-finite (train.max_nonfinite_in_a_row):"
            f" stopped, {run.request.out_dir / 'last.pt'} is the last good checkpoint"
        )
    run.window.skipped += 1
    if run.context.is_main:
        console.print(f"[yellow]skipped[/] {where}")


def after_step(run: Run, epoch: int, stop_at: int, show: Callable[..., None]) -> None:
    """Log every `log_every` steps, validate (and save best.pt) every `eval_every`, save
    last.pt every `checkpoint_every`; all of them at the last step."""
    train, step = run.config.train, run.step
    total_steps = train.steps
    if step % train.log_every == 0 or step == total_steps:
        log_window(run, epoch, show)
    else:
        show(completed=step)
    if step % train.eval_every == 0 or step == total_steps:
        result = validate(run)
        if result is not None:
            if run.run_log is not None:
                run.run_log.log({"step": step, "split": "val", **_scalars(result)})
            if is_new_best(result, run.best):
                run.best = {"miou": result["miou"], "fscore": result["fscore"], "step": step}
                save_checkpoint(run, "best.pt")
    if step % train.checkpoint_every == 0 or step in (total_steps, stop_at):
        save_checkpoint(run, "last.pt")


def is_new_best(result: dict[str, Any], best: dict[str, Any]) -> bool:
    """A validation result beats `best` only with a finite mIoU (a NaN never becomes best.pt)."""
    return math.isfinite(result["miou"]) and result["miou"] > best["miou"]


def log_window(run: Run, epoch: int, show: Callable[..., None]) -> None:
    """The losses averaged over the steps since the last log line (and over ranks), the
    learning rate and the throughput: one metrics.jsonl line and the progress bar."""
    window = run.window
    averaged = all_reduce_mean({k: v / window.steps for k, v in window.running.items()}, run.device)
    rate = window.samples * run.context.world_size / max(time.time() - window.start, 1e-9)
    lr = run.optimizer.param_groups[0]["lr"]
    skipped = {"skipped_steps": window.skipped} if window.skipped else {}  # train.on_nonfinite skip
    if run.run_log is not None:
        run.run_log.log({"step": run.step, "epoch": epoch, "lr": lr, "samples_per_s": rate, **averaged, **skipped})
    show(completed=run.step, loss=averaged.get("loss", float("nan")), lr=lr, rate=rate)
    run.window = LogWindow()


def validate(run: Run) -> dict[str, Any] | None:
    """The model on the val split (None when there is none); the model is back in train mode."""
    if not run.inputs.val_shards:
        return None
    loader = make_eval_loader(
        run.inputs.val_shards, run.config, rank=run.context.rank, world_size=run.context.world_size,
        errors_dir=run.errors_dir, label_lut=run.inputs.label_lut,
    )
    result = evaluate_model(run.model, loader, run.config, run.context)
    run.model.train()
    return result


def save_checkpoint(run: Run, name: str) -> None:
    """RUN_DIR/`name` (a collective: call it on every rank; rank 0 writes)."""
    save_training_checkpoint(
        run.request.out_dir / name,
        training_payload(
            model=run.model.state_dict(),
            optimizer=run.optimizer.state_dict(),
            lr_scheduler=run.scheduler.state_dict(),
            scaler=run.scaler.state_dict(),
            step=run.step,
            epoch=run.step // run.inputs.steps_per_epoch,
            best=run.best,
            config=to_dict(run.config),
            classes=run.inputs.index.class_names(),
            # The micro-batch and accumulation this run steps with: --resume reuses them.
            batch_plan={
                "micro_batch": run.config.data.batch_size,
                "grad_accum": run.config.train.grad_accum,
                "world_size": run.context.world_size,
                "batch": configured_batch(run.config, run.context.world_size),
                "gpu_memory": run.config.train.gpu_memory,
            },
        ),
        run.context,
    )

@contextlib.contextmanager
def _sigterm_as_interrupt(run: Run):
    """SIGTERM (what schedulers send before preempting a job) and Ctrl-C ask the loop to stop at
    the end of the step under way (`run.stop_requested`; the loop saves last.pt there); a second
    one raises KeyboardInterrupt at once. Only in the main thread; the previous handlers are
    restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum: int, frame: Any) -> None:
        if run.stop_requested:
            raise KeyboardInterrupt
        run.stop_requested = True
        if run.context.is_main:
            console.print(
                f"[yellow]{signal.Signals(signum).name}[/]: stopping after this step and saving last.pt"
                " (send it again to stop at once)"
            )

    previous = {number: signal.signal(number, request_stop) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def forget_records_after(log: Path, step: int) -> None:
    """Drop the records of steps after `step` from the metrics log (rewritten atomically); the
    events without a step (start, end) stay."""
    if not log.is_file():
        return
    lines = log.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _record_step(line) <= step]
    if len(kept) != len(lines):
        write_bytes_atomic(log, "".join(kept).encode())


def _record_step(line: str) -> float:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return math.inf  # a line cut by SIGKILL: dropped
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, (int, float)) else -math.inf


def _scalars(result: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in result.items() if isinstance(v, (int, float))}


def _print_start_summary(run: Run) -> None:
    from rich.table import Table

    config, context, model, index = run.config, run.context, run.model, run.inputs.index
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    table = Table(title=f"ddeseg train: {config.task}", show_header=False)
    table.add_row("train samples", str(index.count(config.task, "train", annotated_only=True)))
    table.add_row("val samples", str(index.count(config.task, "val")) if run.inputs.val_shards else "none (best.pt not written)")
    table.add_row("model", f"{total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable")
    table.add_row("devices", f"{context.world_size} x {context.device}")
    table.add_row("precision", _precision_text(run))
    chosen = f" (micro-batch chosen for train.gpu_memory {run.batch_chosen_for})" if run.batch_chosen_for else ""
    table.add_row(
        "batch",
        f"{config.data.batch_size} x {context.world_size} ranks x {config.train.grad_accum} accumulation"
        f" = {configured_batch(config, context.world_size)}{chosen}",
    )
    table.add_row("steps", f"{config.train.steps} ({run.inputs.steps_per_epoch} per epoch)")
    table.add_row("schedule", _schedule_text(config))
    for label, value in run.setup.items():
        table.add_row(label, value)
    if run.memory_plan is not None:
        for label, value in run.memory_plan.rows():
            table.add_row(label, value)
    else:
        table.add_row("memory plan", "not measured on this device (train.memory_plan=true or --memory-plan to measure)")
    if config.train.grad_accum > 1:
        table.add_row("note", BATCHNORM_NOTE)
    console.print(table)


def _schedule_text(config: Config) -> str:
    train = config.train
    if train.schedule == "official":
        return (
            f"official: warm-up 0 -> {train.base_lr:g} over {train.warmup_steps} steps, then cosine"
            f" (T_max {train.steps}) toward {train.min_lr:g}"
        )
    return (
        f"warmup_cosine (ours): {train.warmup_lr:g} -> {train.base_lr:g} over {train.warmup_steps} steps,"
        f" then cosine to {train.min_lr:g} at step {train.steps}"
    )


def _precision_text(run: Run) -> str:
    asked = run.config.train.precision
    if run.precision == asked:
        return asked
    return f"{run.precision} (train.precision {asked} is for CUDA; train.cpu_autocast=true for bf16 on the CPU)"


def _print_end_summary(summary: dict[str, Any], out_dir: Path) -> None:
    best = summary["best"]
    best_text = f"val mIoU {best['miou']:.4f} at step {best['step']}" if best["step"] >= 0 else "no validation"
    console.print(
        f"[bold green]done[/]: {summary['steps']} steps in {summary['seconds']:.0f}s; best {best_text};"
        f" skipped samples {summary['skipped_samples']}; run directory {out_dir}"
    )
