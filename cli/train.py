"""`ddeseg train`: parse arguments, build the config, call the training recipe."""

from __future__ import annotations

from pathlib import Path

import typer

from ddeseg.cli import options
from ddeseg.cli.app import app


@app.command("train", no_args_is_help=True)
def train_command(
    config: Path = options.config_option("Config YAML, e.g. configs/v2.yaml or configs/tiny.yaml.", required=True),
    shards: Path = options.shards_option(),
    memory_bank: Path = typer.Option(..., "--memory-bank", exists=True, dir_okay=False, help="bank.npy from `ddeseg build-memory-bank`."),
    out: Path = typer.Option(..., "--out", help="Run directory: config.yaml, metrics.jsonl, last.pt, best.pt."),
    task: str | None = options.task_option("Task to train on (v1s, v1m, v2, VPO-SS, VPO-MS, VPO-MSMI); default: the config's."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Optimizer steps (overrides train.steps)."),
    resume: str | None = typer.Option(None, "--resume", help="Continue a run: a checkpoint path, or 'latest' for OUT/last.pt. The config must be the run's (only train.steps/epochs_equivalent/warmup_epochs, the log/eval/checkpoint cadence, tensorboard/wandb, data.num_workers/eval_batch_size, train.activation_checkpointing/gpu_memory/memory_plan, eval.*, pretrain_audio.* and the other stages' sections (prepare.*, memory_bank.*, predict.*) may change; the run's micro-batch and accumulation are kept)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run already in OUT (last.pt, best.pt, metrics.jsonl, data_errors/); without it (or --resume) such a folder is refused."),
    stop_at: int | None = typer.Option(None, "--stop-at", min=1, help="Stop after this step and save last.pt, keeping the schedule of --steps (for time-limited jobs; continue with --resume latest)."),
    init: list[Path] = typer.Option([], "--init", exists=True, dir_okay=False, help="Weights to start from (repeatable): an audio checkpoint from `ddeseg pretrain-audio`, HTS-AT, MiT/SegFormer ImageNet or an official DDESeg checkpoint."),
    gpu_memory: str | None = typer.Option(None, "--gpu-memory", help="GPU memory budget per rank, e.g. 24GiB or 40GB (sets train.gpu_memory): the memory plan picks the largest micro-batch that fits and the gradient accumulation that keeps the configured batch (data.batch_size x ranks x train.grad_accum); refused when micro-batch 1 does not fit."),
    memory_plan: bool | None = typer.Option(None, "--memory-plan/--no-memory-plan", help="Measure and print the memory plan in the start-up table (sets train.memory_plan; default: on CUDA, or with --gpu-memory; minutes for the paper config on the CPU)."),
    device: str | None = options.device_option(),
    override: list[str] = options.set_option("train.base_lr=5e-4"),
) -> None:
    """Train DDESeg on prepared shards, in one process or under torchrun.

    Example (one process):

        ddeseg train --config configs/v2.yaml --shards shards/ --memory-bank bank/bank.npy --out runs/v2

    Example (the paper config on one 24 GiB GPU: bf16, checkpointing, micro-batch chosen):

        ddeseg train --config configs/v2.yaml --shards shards/ --memory-bank bank/bank.npy --out runs/v2 \\
            --gpu-memory 24GiB --set train.precision=bf16 --set "train.activation_checkpointing=[visual_blocks,aligners,head]"

    Example (2 nodes x 8 GPUs; run on every node):

        torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
            -m ddeseg train --config configs/v2.yaml --shards shards/ --memory-bank bank/bank.npy --out runs/v2
    """
    from ddeseg.config import load_config
    from ddeseg.distributed import init_distributed, shutdown_distributed
    from ddeseg.engine.train import TrainRequest, train

    aliases = {"task": task, "train.steps": steps, "train.gpu_memory": gpu_memory, "train.memory_plan": memory_plan}
    overrides = options.stage_overrides(override, aliases) + (["train.epochs_equivalent=null"] if steps else [])
    cfg = load_config(config, overrides)
    context = init_distributed(device, timeout_s=cfg.train.collective_timeout_s)
    request = TrainRequest(shards_dir=shards, memory_bank=memory_bank, out_dir=out, resume=resume, init_checkpoints=tuple(init), stop_at=stop_at, overwrite=overwrite)
    try:
        with options.exit_130_on_interrupt():
            train(cfg, request, context)
    finally:
        shutdown_distributed()
