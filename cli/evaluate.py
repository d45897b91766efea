"""`ddeseg evaluate`: parse arguments and call the evaluation stage (`ddeseg.pipelines.evaluate`)."""

from __future__ import annotations

from pathlib import Path

import typer

from ddeseg.cli import options
from ddeseg.cli.registry import command

EPILOG = """\
Examples:

  ddeseg evaluate --checkpoint runs/v2/best.pt --shards shards/ --out runs/v2/eval-test

  ddeseg evaluate --checkpoint runs/v2/best.pt --shards shards/ --out runs/v2/eval-shuffled --audio-control shuffled

  ddeseg evaluate --checkpoint official/v2.pth --config configs/v2.yaml --memory-bank bank/bank.npy \\
      --shards shards/ --task v2 --out eval/official-v2

  torchrun --nproc-per-node 8 -m ddeseg evaluate --checkpoint runs/v2/best.pt --shards shards/ --out eval/v2

Writes OUT/eval.json (DDESeg protocol: miou, fscore, f1, per_class; AVSBench protocol:
avsbench_miou, avsbench_fscore), OUT/eval.md and OUT/pictures/*.png (image | ground truth |
prediction for the first --pictures frames by key, and worst-frames.png).

Exit status: 0 the whole split was scored; 2 bad input (one line naming the file or option,
before any work: e.g. a file that is not a checkpoint, a checkpoint of another architecture than
--config, a memory bank of another class count); 3 the split was not scored whole (frames of a
cut or corrupt shard skipped): eval.json is still written, with "partial": true,
counts.frames_not_scored and skipped_shards; --allow-partial accepts such a result (exit 0).
"""
PARTIAL_EXIT = 3  # a result on less than the whole split: written, marked, but not a success


AudioControlChoice = options.config_choices("AudioControlChoice", "eval.audio_control")


@command("evaluate", no_args_is_help=True, epilog=EPILOG)
def evaluate_command(
    checkpoint: Path = options.checkpoint_option(),
    shards: Path = options.shards_option(),
    out: Path = typer.Option(..., "--out", help="Output directory: eval.json, eval.md, pictures/, config.yaml."),
    task: str | None = options.task_option("Task to evaluate (v1s, v1m, v2, VPO-SS, VPO-MS, VPO-MSMI); default: the checkpoint's config."),
    split: str | None = typer.Option(None, "--split", help="Split to evaluate: test, val or train. (config: eval.split, default test)"),
    audio_control: AudioControlChoice | None = typer.Option(None, "--audio-control", help="none; shuffled (each frame gets another frame's audio from its batch); silent (the log-mel of a zero waveform). The drop from `none` shows how much the model listens. (config: eval.audio_control, default none)"),
    config: Path | None = options.inference_config_option(),
    memory_bank: Path | None = options.inference_bank_option(),
    pictures: int | None = typer.Option(None, "--pictures", help="Frames to draw (the first by key). (config: eval.pictures)"),
    worst: int | None = typer.Option(None, "--worst", help="Frames on the worst-frames contact sheet. (config: eval.worst_frames)"),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Frames per batch. (config: data.eval_batch_size)"),
    workers: int | None = typer.Option(None, "--workers", help="Loader workers per process. (config: data.num_workers)"),
    device: str | None = options.device_option(),
    override: list[str] = options.set_option("data.eval_batch_size=8"),
    print_config: bool = options.print_config_option(),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Exit 0 even when frames of the split could not be scored (eval.json still says \"partial\": true)."),
    quiet: bool = options.quiet_option(),
) -> None:
    """Score a checkpoint on a split with the DDESeg and AVSBench protocols, in one process or under torchrun."""
    from ddeseg.distributed import init_distributed, shutdown_distributed
    from ddeseg.pipelines.evaluate import EvaluatePaths, run_evaluation
    from ddeseg.stage import ConfigSource

    settings = {
        "task": task,
        "eval.split": split,
        "eval.audio_control": audio_control,
        "eval.pictures": pictures,
        "eval.worst_frames": worst,
        "data.eval_batch_size": batch_size,
        "data.num_workers": workers,
    }
    source = ConfigSource(config, tuple(options.stage_overrides(override, settings)))
    if print_config:
        from ddeseg.inference import inference_config

        options.print_config(inference_config(checkpoint, source.file, source.overrides))
    context = init_distributed(device)
    try:
        report = run_evaluation(source, EvaluatePaths(checkpoint, shards, out, memory_bank), context, progress=not quiet)
    finally:
        shutdown_distributed()
    if report["partial"] and not allow_partial:
        typer.echo(
            f"error: partial result: {report['counts']['frames_not_scored']} of {report['counts']['frames_in_manifest']}"
            f" frames not scored (see {out}/eval.json); pass --allow-partial to accept it",
            err=True,
        )
        raise typer.Exit(PARTIAL_EXIT)
