"""The DDESeg training recipe: one readable loop.

build data -> build model -> optimizer and schedule -> loop (forward, loss, backward, step)
-> validate -> checkpoint. Runs in one process or under `torchrun` (DDP; NCCL on GPU, gloo on
CPU). Everything it writes goes under one run directory:

    RUN_DIR/config.yaml      the resolved config
    RUN_DIR/metrics.jsonl    one JSON object per log/eval event
    RUN_DIR/last.pt          written every `train.checkpoint_every` steps, at the end, and on Ctrl-C
    RUN_DIR/best.pt          best validation mIoU (the val split; never test)
    RUN_DIR/data_errors/     samples the loader skipped (key, shard, reason), one file per worker

Exact resume: the data stream of epoch `e` is a pure function of (seed, e, rank, worker), so
`--resume` rebuilds the epoch's loader and skips the batches already consumed; with the model,
optimizer, scheduler, scaler and RNG states restored, N steps straight and N/2 + N/2 resumed give
identical weights (tested on the CPU).
"""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from ddeseg.bank import read_memory_bank
from ddeseg.checkpoint import (
    FORMAT,
    atomic_torch_save,
    capture_rng_state,
    load_training_checkpoint,
    restore_rng_state,
)
from ddeseg.config import Config, save_config, to_dict
from ddeseg.data.shards import ShardIndex
from ddeseg.data.stream import count_data_errors, make_eval_loader, make_train_loader
from ddeseg.distributed import DistributedContext, all_reduce_mean, barrier
from ddeseg.engine.evaluate import evaluate_model
from ddeseg.engine.run_log import RunLog
from ddeseg.errors import DDESegError
from ddeseg.losses import SegmentationLoss
from ddeseg.models import build_model, load_checkpoint
from ddeseg.progress import console, training_progress


@dataclass
class TrainRequest:
    """What `ddeseg train` asks for, besides the config."""

    shards_dir: Path
    memory_bank: Path
    out_dir: Path
    resume: str | None = None  # a checkpoint path, or "latest" (RUN_DIR/last.pt)
    init_checkpoints: tuple[Path, ...] = ()  # backbone / audio / official weights to start from
    stop_at: int | None = None  # stop after this step (the schedule still spans train.steps)


# --------------------------------------------------------------------------------------------
# Optimisation
# --------------------------------------------------------------------------------------------


def build_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    """AdamW as the official recipe: no weight decay on biases and 1-D parameters (norms)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue  # the frozen audio backbone
        (no_decay if parameter.ndim <= 1 or name.endswith(".bias") else decay).append(parameter)
    train = config.train
    return torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train.base_lr,
        betas=tuple(train.betas),
        eps=train.eps,
        weight_decay=train.weight_decay,
    )


def learning_rate_factor(step: int, config: Config) -> float:
    """Linear warm-up from `warmup_lr` to `base_lr`, then cosine to `min_lr`, per optimizer step.

    The official scheduler warms up from 0 (ignoring its own `warmup_lr`) and runs its cosine
    over all steps including the warm-up; we honour `warmup_lr` and run the cosine over the
    remaining steps so the schedule ends exactly at `min_lr`.
    """
    train = config.train
    if step < train.warmup_steps:
        progress = step / max(1, train.warmup_steps)
        lr = train.warmup_lr + (train.base_lr - train.warmup_lr) * progress
    else:
        decay_steps = max(1, train.steps - train.warmup_steps)
        progress = min(1.0, (step - train.warmup_steps) / decay_steps)
        lr = train.min_lr + 0.5 * (train.base_lr - train.min_lr) * (1 + math.cos(math.pi * progress))
    return lr / train.base_lr


def autocast_context(device: torch.device, precision: str):
    """bf16/fp16 autocast on GPU; full precision on the CPU (CPU autocast is slower here)."""
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train(config: Config, request: TrainRequest, context: DistributedContext) -> dict[str, Any]:
    """Train DDESeg on the shards; returns a summary (best metrics, paths)."""
    config = copy.deepcopy(config)  # derived values below must not leak into the caller's config
    out_dir = request.out_dir
    device = context.device
    torch.manual_seed(config.train.seed + context.rank)
    np.random.seed(config.train.seed + context.rank)

    # ---- data
    index = ShardIndex(request.shards_dir)
    train_shards = index.shards(config.task, "train")
    val_shards = index.shards(config.task, "val") if index.has_split(config.task, "val") else []
    global_batch = config.data.batch_size * context.world_size
    steps_per_epoch = max(1, math.ceil(index.count(config.task, "train", annotated_only=True) / global_batch))
    micro_steps_per_epoch = steps_per_epoch * config.train.grad_accum
    if config.train.epochs_equivalent is not None:
        # The official schedule is in epochs: derive steps from this dataset's size.
        config.train.steps = config.train.epochs_equivalent * steps_per_epoch
        if config.train.warmup_epochs is not None:
            config.train.warmup_steps = round(config.train.warmup_epochs * steps_per_epoch)
    errors_dir = out_dir / "data_errors"

    # ---- model
    model = build_model(config.model)
    bank = read_memory_bank(
        request.memory_bank,
        classes=len(index.bank_class_ids(config.task)),
        embed_dim=config.model.audio_embed_dim,
        task=f"{config.task} of {request.shards_dir}",
    )
    model.set_memory_bank(bank)  # checks the embedding dim against the model
    filterbank_from = None
    for path in request.init_checkpoints:
        report = load_checkpoint(model, path)
        filterbank_from = path if report.filterbank_replaced else filterbank_from
        if context.is_main:
            console.print(f"[bold]init[/] {path}: {report.summary()}")
    model.to(device)
    loss_fn = SegmentationLoss(config.loss, config.model.num_classes).to(device)
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, config))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and config.train.precision == "fp16")

    step, best = 0, {"miou": -1.0, "fscore": 0.0, "step": -1}
    if request.resume:
        resume_path = out_dir / "last.pt" if request.resume == "latest" else Path(request.resume)
        payload = load_training_checkpoint(resume_path)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["lr_scheduler"])
        scaler.load_state_dict(payload["scaler"])
        step, best = int(payload["step"]), dict(payload["best"])
        restore_rng_state(payload["rng"][context.rank] if isinstance(payload["rng"], list) else payload["rng"])
        if context.is_main:
            console.print(f"[bold]resumed[/] from {resume_path} at step {step}")
    # The shards' log-mels must come from the filterbank the model now carries (an HTS-AT
    # checkpoint brings its own): refuse to train on log-mels made with another one.
    index.check_frontend(model, checkpoint=filterbank_from)
    # find_unused_parameters: the official aligners hold projections and norms that the forward
    # never uses (kept so official checkpoints load strictly); DDP must not wait for their grads.
    train_model = (
        DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
        if context.is_distributed
        else model
    )

    if context.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, out_dir / "config.yaml")
        _print_start_summary(config, index, model, context, steps_per_epoch, val_shards)
    run_log = (
        RunLog(
            out_dir,
            tensorboard=config.train.tensorboard,
            wandb=config.train.wandb,
            wandb_project=config.train.wandb_project,
            config=to_dict(config),
            resume=bool(request.resume),
        )
        if context.is_main
        else None
    )

    def save(name: str) -> None:
        # Every rank's RNG state is gathered so a resumed multi-rank run continues each stream.
        rng_states = _gather_objects(capture_rng_state(), context)
        if context.is_main:
            atomic_torch_save(
                {
                    "format": FORMAT,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "lr_scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "step": step,
                    "epoch": step // steps_per_epoch,
                    "miou": best["miou"],
                    "fscore": best["fscore"],
                    "best": best,
                    "config": to_dict(config),
                    "classes": index.class_names(),
                    "rng": rng_states if context.is_distributed else rng_states[0],
                },
                out_dir / name,
            )

    def validate() -> dict[str, float] | None:
        if not val_shards:
            return None
        loader = make_eval_loader(
            val_shards, config, rank=context.rank, world_size=context.world_size, errors_dir=errors_dir
        )
        result = evaluate_model(model, loader, config, context)
        model.train()
        return result

    # ---- loop
    total_steps = config.train.steps
    stop_at = min(total_steps, request.stop_at or total_steps)
    progress = training_progress(enabled=context.is_main)
    started, window_start, window_samples, window_steps = time.time(), time.time(), 0, 0
    running: dict[str, float] = {}
    interrupted = False
    model.train()
    with progress, _sigterm_as_interrupt():
        task_id = progress.add_task("train", total=total_steps, completed=step, loss=float("nan"), lr=0.0, rate=0.0)
        try:
            while step < stop_at:
                epoch = step // steps_per_epoch
                loader = make_train_loader(
                    train_shards,
                    config,
                    seed=config.train.seed,
                    epoch=epoch,
                    rank=context.rank,
                    world_size=context.world_size,
                    num_batches=micro_steps_per_epoch,
                    errors_dir=errors_dir,
                )
                skip = (step - epoch * steps_per_epoch) * config.train.grad_accum
                step_at_epoch_start, micro = step, 0
                for batch_index, batch in enumerate(loader):
                    if batch_index < skip:
                        continue  # fast-forward inside the epoch after a resume
                    batch = _to_device(batch, device)
                    micro += 1
                    # DDP only syncs gradients on the last micro-batch of an accumulation.
                    last_micro = micro % config.train.grad_accum == 0
                    sync = train_model.no_sync() if (context.is_distributed and not last_micro) else contextlib.nullcontext()
                    with sync, autocast_context(device, config.train.precision):
                        logits = train_model(batch["image"], batch["logmel"])
                        loss, parts = loss_fn(logits.float(), batch["mask"])
                    scaler.scale(loss / config.train.grad_accum).backward()
                    for name, value in {"loss": loss.detach(), **parts}.items():
                        running[name] = running.get(name, 0.0) + float(value) / config.train.grad_accum
                    window_samples += batch["image"].shape[0]
                    if not last_micro:
                        continue
                    if config.train.grad_clip:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    step += 1
                    window_steps += 1

                    if step % config.train.log_every == 0 or step == total_steps:
                        averaged = all_reduce_mean({k: v / window_steps for k, v in running.items()}, device)
                        rate = window_samples * context.world_size / max(time.time() - window_start, 1e-9)
                        lr = optimizer.param_groups[0]["lr"]
                        if context.is_main:
                            run_log.log({"step": step, "epoch": epoch, "lr": lr, "samples_per_s": rate, **averaged})
                        progress.update(task_id, completed=step, loss=averaged["loss"], lr=lr, rate=rate)
                        running, window_start, window_samples, window_steps = {}, time.time(), 0, 0
                    else:
                        progress.update(task_id, completed=step)

                    if step % config.train.eval_every == 0 or step == total_steps:
                        result = validate()
                        if result is not None:
                            if context.is_main:
                                run_log.log({"step": step, "split": "val", **_scalars(result)})
                            if result["miou"] > best["miou"]:
                                best = {"miou": result["miou"], "fscore": result["fscore"], "step": step}
                                save("best.pt")
                    if step % config.train.checkpoint_every == 0 or step in (total_steps, stop_at):
                        save("last.pt")
                    if step >= stop_at:
                        break
                if step == step_at_epoch_start:
                    raise DDESegError(
                        f"the training loader of task {config.task} yielded no batch (epoch {epoch});"
                        f" see {errors_dir} for samples that failed to decode"
                    )
        except KeyboardInterrupt:
            interrupted = True
            save("last.pt")
            if context.is_main:
                console.print(f"[yellow]interrupted[/] (Ctrl-C or SIGTERM): saved {out_dir / 'last.pt'} at step {step}; continue with --resume latest")
    barrier()
    skipped = count_data_errors(errors_dir)
    summary = {
        "steps": step,
        "interrupted": interrupted,
        "best": best,
        "skipped_samples": skipped,
        "seconds": time.time() - started,
        "run_dir": str(out_dir),
    }
    if context.is_main:
        run_log.log({"event": "end", **summary})
        run_log.close()
        _print_end_summary(summary, out_dir)
    if interrupted:
        raise KeyboardInterrupt
    return summary


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Treat SIGTERM (what schedulers send before preempting a job) like Ctrl-C: save last.pt
    and stop. Only in the main thread, and the previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _scalars(result: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in result.items() if isinstance(v, (int, float))}


def _gather_objects(value: Any, context: DistributedContext) -> list[Any]:
    if not context.is_distributed:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def _print_start_summary(config, index, model, context, steps_per_epoch, val_shards) -> None:
    from rich.table import Table

    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    table = Table(title=f"ddeseg train: {config.task}", show_header=False)
    table.add_row("train samples", str(index.count(config.task, "train", annotated_only=True)))
    table.add_row("val samples", str(index.count(config.task, "val")) if val_shards else "none (best.pt not written)")
    table.add_row("model", f"{total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable")
    table.add_row("devices", f"{context.world_size} x {context.device}")
    table.add_row(
        "batch",
        f"{config.data.batch_size} x {context.world_size} ranks x {config.train.grad_accum} accumulation"
        f" = {config.data.batch_size * context.world_size * config.train.grad_accum}",
    )
    table.add_row("steps", f"{config.train.steps} ({steps_per_epoch} per epoch)")
    console.print(table)


def _print_end_summary(summary: dict[str, Any], out_dir: Path) -> None:
    best = summary["best"]
    best_text = f"val mIoU {best['miou']:.4f} at step {best['step']}" if best["step"] >= 0 else "no validation"
    console.print(
        f"[bold green]done[/]: {summary['steps']} steps in {summary['seconds']:.0f}s; best {best_text};"
        f" skipped samples {summary['skipped_samples']}; run directory {out_dir}"
    )
