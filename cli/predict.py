"""`ddeseg predict`: parse arguments and call the prediction stage (`ddeseg.engine.predict`)."""

from __future__ import annotations

from pathlib import Path

import typer

from ddeseg.cli.app import app

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


@app.command("predict", no_args_is_help=True, epilog=EPILOG)
def predict_command(
    videos: list[Path] = typer.Argument(..., metavar="VIDEO", help="Video files with sound (any format FFmpeg reads).", show_default=False),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="best.pt/last.pt from `ddeseg train`, or an official DDESeg checkpoint (then --config and --memory-bank)."),
    out: Path = typer.Option(..., "--out", help="Output directory: one folder per video."),
    frames_per_second: float = typer.Option(1.0, "--frames-per-second", "-f", min=0.0, help="Frames sampled per second of video (default 1, as the benchmarks annotate); above a video's frame rate it is capped at that rate, with a warning (more samples would only repeat frames)."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda or cuda:N; default: the local GPU when present."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Frames per forward pass."),
    classes: Path | None = typer.Option(None, "--classes", exists=True, dir_okay=False, help="classes.json (from `ddeseg prepare`) or a JSON list of names, for checkpoints without a class list."),
    config: Path | None = typer.Option(None, "--config", exists=True, dir_okay=False, help="Config YAML: required for official checkpoints; replaces the config stored in ours."),
    memory_bank: Path | None = typer.Option(None, "--memory-bank", exists=True, dir_okay=False, help="bank.npy for checkpoints without a memory bank (official ones); replaces a stored one."),
    allow_no_audio: bool = typer.Option(False, "--allow-no-audio", help="Predict videos without an audio track with silence (said so in predictions.json) instead of failing."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Segment the sounding objects in your own videos: masks, overlays, an overlay MP4 with sound, predictions.json."""
    from ddeseg.engine.predict import PredictRequest, run_predict

    results = run_predict(
        PredictRequest(
            checkpoint=checkpoint,
            videos=list(videos),
            out_dir=out,
            frames_per_second=frames_per_second,
            device=device,
            batch_size=batch_size,
            classes_file=classes,
            config_path=config,
            memory_bank=memory_bank,
            allow_no_audio=allow_no_audio,
            show_progress=not quiet,
        )
    )
    if any(result.error is not None for result in results):
        raise typer.Exit(1)
