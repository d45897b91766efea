"""`ddeseg pretrain-audio`: parse arguments, build the config (`pretrain_audio` section), call the recipe."""

from __future__ import annotations

from pathlib import Path

import typer

from ddeseg.cli import options
from ddeseg.cli.registry import command


@command("pretrain-audio", no_args_is_help=True)
def pretrain_audio_command(
    shards: Path = options.shards_option(),
    config: Path = options.config_option("Config YAML; its model.audio/frontend sections define the backbone and its pretrain_audio section the recipe.", required=True),
    out: Path = typer.Option(..., "--out", help="Run directory: audio.pt, metrics.jsonl, config.yaml."),
    task: str | None = options.task_option("Task whose training shards to learn from (default: the config's)."),
    steps: int | None = typer.Option(None, "--steps", help="Optimizer steps. (config: pretrain_audio.steps)"),
    device: str | None = options.device_option(),
    override: list[str] = options.set_option("pretrain_audio.base_lr=5e-4"),
    quiet: bool = options.quiet_option(),
    print_config: bool = options.print_config_option(),
) -> None:
    """Train the HTS-AT audio backbone as a multi-label sound-event classifier on the prepared
    training shards (labels: the classes in each frame's mask). The checkpoint is what
    `build-memory-bank --audio-checkpoint` and `train --init` take.

    Example:

        ddeseg pretrain-audio --shards shards/ --config configs/tiny.yaml --out runs/audio --steps 300
    """
    from ddeseg.pipelines.pretrain_audio import PretrainAudioPaths, pretrain_audio
    from ddeseg.stage import RunOptions

    resolved = options.stage_config(config, override, {"task": task, "pretrain_audio.steps": steps}, print_config)
    with options.exit_130_on_interrupt():
        pretrain_audio(resolved, PretrainAudioPaths(shards, out), RunOptions(device=device, progress=not quiet))
