"""`ddeseg pretrain-audio`: parse arguments, build the config, call the recipe."""

from __future__ import annotations

from pathlib import Path

import typer

from ddeseg.cli.app import app


@app.command("pretrain-audio", no_args_is_help=True)
def pretrain_audio_command(
    shards: Path = typer.Option(..., "--shards", exists=True, file_okay=False, help="Shard directory written by `ddeseg prepare`."),
    config: Path = typer.Option(..., "--config", exists=True, dir_okay=False, help="Config YAML; its model.audio/frontend sections define the backbone and its pretrain_audio section the recipe."),
    out: Path = typer.Option(..., "--out", help="Run directory: audio.pt, metrics.jsonl, config.yaml."),
    task: str | None = typer.Option(None, "--task", help="Task whose training shards to learn from (default: the config's)."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Optimizer steps (overrides pretrain_audio.steps)."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda or cuda:N; default: the GPU when present."),
    override: list[str] = typer.Option([], "--set", help="Config override, e.g. --set pretrain_audio.base_lr=5e-4 (repeatable)."),
) -> None:
    """Train the HTS-AT audio backbone as a multi-label sound-event classifier on the prepared
    training shards (labels: the classes in each frame's mask). The checkpoint is what
    `build-memory-bank --audio-checkpoint` and `train --init` take.

    Example:

        ddeseg pretrain-audio --shards shards/ --config configs/tiny.yaml --out runs/audio --steps 300
    """
    from ddeseg.config import load_config
    from ddeseg.distributed import resolve_device
    from ddeseg.engine.pretrain_audio import pretrain_audio

    overrides = list(override)
    if task:
        overrides.append(f"task={task}")
    if steps:
        overrides.append(f"pretrain_audio.steps={steps}")
    pretrain_audio(load_config(config, overrides), shards, out, resolve_device(device))
