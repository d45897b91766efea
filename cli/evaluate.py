"""`ddeseg evaluate`: parse arguments and call the evaluation stage (`ddeseg.engine.evaluate`)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from ddeseg.cli.app import app

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


class AudioControlChoice(str, Enum):  # the values of ddeseg.engine.evaluate.AUDIO_CONTROLS
    none = "none"
    shuffled = "shuffled"
    silent = "silent"


@app.command("evaluate", no_args_is_help=True, epilog=EPILOG)
def evaluate_command(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="best.pt/last.pt from `ddeseg train`, or an official DDESeg checkpoint (then --config and --memory-bank)."),
    shards: Path = typer.Option(..., "--shards", exists=True, file_okay=False, help="Shard directory written by `ddeseg prepare`."),
    out: Path = typer.Option(..., "--out", help="Output directory: eval.json, eval.md, pictures/."),
    task: str | None = typer.Option(None, "--task", help="Task to evaluate (v1s, v1m, v2, VPO-SS, VPO-MS, VPO-MSMI); default: the checkpoint's config."),
    split: str = typer.Option("test", "--split", help="Split to evaluate: test, val or train."),
    audio_control: AudioControlChoice = typer.Option(AudioControlChoice.none, "--audio-control", help="none; shuffled (each frame gets another frame's audio from its batch); silent (the log-mel of a zero waveform). The drop from `none` shows how much the model listens."),
    config: Path | None = typer.Option(None, "--config", exists=True, dir_okay=False, help="Config YAML: required for official checkpoints; replaces the config stored in ours."),
    memory_bank: Path | None = typer.Option(None, "--memory-bank", exists=True, dir_okay=False, help="bank.npy for checkpoints without a memory bank (official ones); replaces a stored one."),
    pictures: int | None = typer.Option(None, "--pictures", min=0, help="Frames to draw (the first by key); default eval.pictures of the config."),
    worst: int | None = typer.Option(None, "--worst", min=0, help="Frames on the worst-frames contact sheet; default eval.worst_frames."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="Frames per batch; default data.eval_batch_size."),
    workers: int | None = typer.Option(None, "--workers", min=0, help="Loader workers per process; default data.num_workers."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda or cuda:N; default: the local GPU when present."),
    override: list[str] = typer.Option([], "--set", help="Config override, e.g. --set data.eval_batch_size=8 (repeatable)."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Exit 0 even when frames of the split could not be scored (eval.json still says \"partial\": true)."),
) -> None:
    """Score a checkpoint on a split with the DDESeg and AVSBench protocols, in one process or under torchrun."""
    from ddeseg.distributed import init_distributed, shutdown_distributed
    from ddeseg.engine.evaluate import EvaluateRequest, run_evaluation

    request = EvaluateRequest(
        checkpoint=checkpoint,
        shards_dir=shards,
        out_dir=out,
        task=task,
        split=split,
        audio_control=audio_control.value,
        config_path=config,
        overrides=list(override),
        memory_bank=memory_bank,
        pictures=pictures,
        worst_frames=worst,
        batch_size=batch_size,
        num_workers=workers,
    )
    context = init_distributed(device)
    try:
        report = run_evaluation(request, context)
    finally:
        shutdown_distributed()
    if report["partial"] and not allow_partial:
        typer.echo(
            f"error: partial result: {report['counts']['frames_not_scored']} of {report['counts']['frames_in_manifest']}"
            f" frames not scored (see {out}/eval.json); pass --allow-partial to accept it",
            err=True,
        )
        raise typer.Exit(PARTIAL_EXIT)
