"""`ddeseg predict`: parse arguments and call the prediction stage (`ddeseg.pipelines.predict`)."""

from __future__ import annotations

from pathlib import Path

import typer

from ddeseg.cli import options
from ddeseg.cli.registry import command

EPILOG = """\
Examples:

  ddeseg predict --checkpoint runs/v2/best.pt my_video.mp4 --out predictions/

  ddeseg predict --checkpoint runs/v2/best.pt a.mp4 b.mov --out predictions/ --frames-per-second 5 --device cuda

  ddeseg predict --checkpoint official/v2.pth --config configs/v2.yaml --memory-bank bank/bank.npy \\
      --classes shards/classes.json clip.mkv --out predictions/

Frame k is the frame on screen at k / F seconds and hears the audio [k / F, k / F + 1 s) (the
AVSBench convention: a frame at the start of its second). Writes, per video, OUT/{stem}/:
masks/*.png (class ids, the video's frame size), overlays/*.png (palette overlay with a legend),
overlay.mp4 (overlays at F frames/s with the original audio) and predictions.json (per frame:
time_s, classes with pixel_fraction and box). A video that cannot be used is reported on one line
and skipped; the others are still done and the exit status is 1. Bad input found before any
video is read (a file that is not a checkpoint, a memory bank of another class count, an --out
that is a file) exits 2 with one line; a run that writes no video leaves no OUT folder behind.
"""


@command("predict", no_args_is_help=True, epilog=EPILOG)
def predict_command(
    videos: list[Path] = typer.Argument(..., metavar="VIDEO", help="Video files with sound (any format FFmpeg reads).", show_default=False),
    checkpoint: Path = options.checkpoint_option(),
    out: Path = typer.Option(..., "--out", help="Output directory: one folder per video, and config.yaml."),
    frames_per_second: float | None = typer.Option(None, "--frames-per-second", "-f", help="Frames sampled per second of video (default 1, as the benchmarks annotate); above a video's frame rate it is capped at that rate, with a warning (more samples would only repeat frames). (config: predict.frames_per_second)"),
    device: str | None = options.device_option(),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Frames per forward pass. (config: predict.batch_size, default 8)"),
    classes: Path | None = typer.Option(None, "--classes", exists=True, dir_okay=False, help="classes.json (from `ddeseg prepare`) or a JSON list of names, for checkpoints without a class list."),
    config: Path | None = options.inference_config_option(),
    memory_bank: Path | None = options.inference_bank_option(),
    allow_no_audio: bool | None = typer.Option(None, "--allow-no-audio", help="Predict videos without an audio track with silence (said so in predictions.json) instead of failing. (config: predict.allow_no_audio)"),
    override: list[str] = options.set_option("predict.batch_size=4"),
    print_config: bool = options.print_config_option(),
    quiet: bool = options.quiet_option(),
) -> None:
    """Segment the sounding objects in your own videos: masks, overlays, an overlay MP4 with sound, predictions.json."""
    from ddeseg.pipelines.predict import PredictPaths, run_predict
    from ddeseg.stage import ConfigSource, RunOptions

    settings = {
        "predict.frames_per_second": frames_per_second,
        "predict.batch_size": batch_size,
        "predict.allow_no_audio": allow_no_audio,
    }
    source = ConfigSource(config, tuple(options.stage_overrides(override, settings)))
    if print_config:
        from ddeseg.inference import inference_config

        options.print_config(inference_config(checkpoint, source.file, source.overrides))
    results = run_predict(
        source,
        PredictPaths(checkpoint, list(videos), out, classes=classes, memory_bank=memory_bank),
        RunOptions(device=device, progress=not quiet),
    )
    if any(result.error is not None for result in results):
        raise typer.Exit(1)
