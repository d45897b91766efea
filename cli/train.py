"""`ddeseg train`: parse arguments, build the config, call the training recipe."""

from __future__ import annotations

from pathlib import Path

import typer

from ddeseg.cli import options
from ddeseg.cli.registry import command
from ddeseg.config import RESUME_MAY_CHANGE

RESUME_HELP = (
    "Continue a run: a checkpoint path, or 'latest' for OUT/last.pt. The config must be the run's; only these may "
    "change: " + ", ".join(f"{key}*" if key.endswith(".") else key for key in RESUME_MAY_CHANGE)
    + " (the run's micro-batch and accumulation are kept)."
)


@command("train", no_args_is_help=True)
def train_command(
    config: Path = options.config_option("Config YAML, e.g. configs/v2.yaml, or RUN_DIR/config.yaml of an earlier run to rerun it (its shards, memory bank and --init files come with it).", required=True),
    shards: Path | None = typer.Option(None, "--shards", exists=True, file_okay=False, help="Shard directory (SHARDS_DIR) written by `ddeseg prepare`; default: the config's inputs.shards (recorded by an earlier run)."),
    memory_bank: Path | None = typer.Option(None, "--memory-bank", exists=True, dir_okay=False, help="bank.npy from `ddeseg build-memory-bank`; default: the config's inputs.memory_bank."),
    out: Path | None = typer.Option(None, "--out", help="Run directory: config.yaml (with the inputs, absolute), run.json, train.log, metrics.jsonl, last.pt, best.pt. Required unless --print-config."),
    task: str | None = options.task_option("Task to train on (v1s, v1m, v2, VPO-SS, VPO-MS, VPO-MSMI); default: the config's."),
    steps: int | None = typer.Option(None, "--steps", help="Optimizer steps (overrides train.steps)."),
    resume: str | None = typer.Option(None, "--resume", help=RESUME_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run already in OUT (last.pt, best.pt, metrics.jsonl, data_errors/); without it (or --resume) such a folder is refused."),
    stop_at: int | None = typer.Option(None, "--stop-at", min=1, help="Stop after this step and save last.pt, keeping the schedule of --steps (for time-limited jobs; continue with --resume latest)."),
    init: list[Path] = typer.Option([], "--init", exists=True, dir_okay=False, help="Weights to start from (repeatable): an audio checkpoint from `ddeseg pretrain-audio`, HTS-AT, MiT/SegFormer ImageNet or an official DDESeg checkpoint. Default: the config's inputs.init (a missing one is left out, with a warning)."),
    gpu_memory: str | None = typer.Option(None, "--gpu-memory", help="GPU memory budget per rank, e.g. 24GiB or 40GB (sets train.gpu_memory): the memory plan picks the largest micro-batch that fits and the gradient accumulation that keeps the configured batch (data.batch_size x ranks x train.grad_accum); refused when micro-batch 1 does not fit."),
    memory_plan: bool | None = typer.Option(None, "--memory-plan/--no-memory-plan", help="Measure and print the memory plan in the start-up table (sets train.memory_plan; default: on CUDA, or with --gpu-memory; minutes for the paper config on the CPU)."),
    device: str | None = options.device_option(),
    override: list[str] = options.set_option("train.base_lr=5e-4"),
    print_config: bool = options.print_config_option(),
) -> None:
    """Train DDESeg on prepared shards, in one process or under torchrun.

    Example (one process):

        ddeseg train --config configs/v2.yaml --shards shards/ --memory-bank bank/bank.npy --out runs/v2

    Example (the paper config on one 24 GiB GPU: bf16, checkpointing, micro-batch chosen):

        ddeseg train --config configs/v2.yaml --shards shards/ --memory-bank bank/bank.npy --out runs/v2 \\
            --gpu-memory 24GiB --set train.precision=bf16 --set "train.activation_checkpointing=[visual_blocks,aligners,head]"

    Example (rerun an earlier run from its folder, into a new one):

        ddeseg train --config runs/v2/config.yaml --out runs/v2-again

    Example (2 nodes x 8 GPUs; run on every node):

        torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
            -m ddeseg train --config configs/v2.yaml --shards shards/ --memory-bank bank/bank.npy --out runs/v2
    """
    from ddeseg.config import load_config
    from ddeseg.distributed import init_distributed, shutdown_distributed
    from ddeseg.pipelines.train import TrainRequest, train
    from ddeseg.training.run_info import apply_input_options, train_inputs

    aliases = {"task": task, "train.steps": steps, "train.gpu_memory": gpu_memory, "train.memory_plan": memory_plan}
    overrides = options.stage_overrides(override, aliases) + ([("train.epochs_equivalent", None)] if steps else [])
    cfg = load_config(config, overrides)
    warnings = apply_input_options(cfg, shards, memory_bank, init)
    if print_config:
        for warning in warnings:
            typer.echo(f"warning: {warning}", err=True)
        options.print_config(cfg)
    shards_dir, bank, init_files = train_inputs(cfg)
    out_dir = options.required(out, "--out RUN_DIR")
    context = init_distributed(device, timeout_s=cfg.train.collective_timeout_s)
    request = TrainRequest(shards_dir=shards_dir, memory_bank=bank, out_dir=out_dir, resume=resume, init_checkpoints=init_files, stop_at=stop_at, overwrite=overwrite, warnings=tuple(warnings))
    try:
        with options.exit_130_on_interrupt():
            train(cfg, request, context)
    finally:
        shutdown_distributed()
