"""`ddeseg synth`: write a deterministic synthetic AVS dataset in a real raw layout."""

from __future__ import annotations

from pathlib import Path

import typer

from ddeseg.cli.registry import command
from ddeseg.errors import DDESegError
from ddeseg.pipelines.synth import DEFAULT_ASPECTS, LAYOUTS, generate
from ddeseg.progress import console, stage_progress

EPILOG = """\
Examples:

  ddeseg synth --layout avsbench --out /tmp/s --videos 40 --seed 1

  ddeseg synth --layout ddeseg --out raw/ddeseg --videos 200 --classes 12 --workers 2

  ddeseg synth --layout vpo --out raw/vpo --tasks VPO-MS,VPO-MSMI --image-size 128

docs/datasets.md describes each layout; RAW_DIR/synth_meta.json holds the ground truth of every frame.
"""


def _split_list(text: str | None) -> list[str]:
    return [item.strip() for item in (text or "").split(",") if item.strip()]


@command("synth", epilog=EPILOG)
def synth(
    layout: str = typer.Option(..., help=f"Raw layout to write: {', '.join(LAYOUTS)}. avsbench: the AVSBench releases (Single-source/, Multi-sources/, AVSS metadata.csv + v1s/v1m/v2); ddeseg: DDESeg's reorganised AVSSData/ and VPO_Clean/; vpo: the VPO release (VPO/, vggsound_bench/).", case_sensitive=False),
    out: Path = typer.Option(..., "--out", help="RAW_DIR to create. Must be absent or empty (see --overwrite).", metavar="RAW_DIR"),
    videos: int = typer.Option(40, help="Total number of videos (VPO: images), spread evenly over the tasks; splits train/val/test cycle 3:1:1 within each task."),
    classes: int = typer.Option(8, help="Number of object classes, each with its own shape, colour, texture, timbre and frequency band (2..26; at most 21 with VPO tasks)."),
    seed: int = typer.Option(0, help="Random seed. Same arguments, same bytes."),
    image_size: int = typer.Option(224, help="Frame height in pixels. v1s/v1m frames are square, as AVSBench-object's 224 px frames; v2 and VPO images are wider (see --aspects)."),
    tasks: str = typer.Option("", help="Comma-separated tasks to generate (default: all of the layout's): v1s,v1m,v2 for avsbench; those and VPO-SS,VPO-MS,VPO-MSMI for ddeseg; the VPO ones for vpo."),
    offscreen_rate: float = typer.Option(0.2, help="Chance per second that a class that is not visible sounds (v1m, v2). It is heard in the audio but never labelled in the mask."),
    silent_rate: float = typer.Option(0.1, help="Chance per second that nothing sounds (v1s, v1m, v2): empty mask, only background hiss in the audio."),
    aspects: str = typer.Option(",".join(f"{a:.4g}" for a in DEFAULT_ASPECTS), help="Comma-separated width/height ratios drawn per video for v2 and VPO images."),
    workers: int = typer.Option(1, help="Worker processes; the output does not depend on it."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace RAW_DIR when it holds an earlier synthetic dataset."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Generate a synthetic audio-visual segmentation dataset in a real raw layout.

    Each video shows 1 to 4 textured objects on a textured background; each second a subset of them sounds (each class has its own timbre and frequency band) and the mask of that second's frame labels only the sounding visible objects. Off-screen sounds and silent seconds occur at the given rates.

    Subsets: v1s (one source, 5 s), v1m (several sources, 5 s), v2 (semantic, 10 s), and the single-image VPO-SS, VPO-MS, VPO-MSMI (several instances of one class).
    """
    try:
        aspect_values = [float(value) for value in _split_list(aspects)]
    except ValueError:
        raise DDESegError(f"--aspects must be comma-separated numbers, got {aspects!r}") from None
    bar = stage_progress(unit="videos", enabled=not quiet)
    bar_task = None

    def report(done: int, total: int) -> None:
        nonlocal bar_task
        if bar_task is None:  # started by the first report: a bad argument prints no bar
            bar.start()
            bar_task = bar.add_task("synth", total=total)
        bar.update(bar_task, completed=done)

    try:
        root = generate(
            layout.lower(),
            out,
            videos=videos,
            classes=classes,
            seed=seed,
            image_size=image_size,
            tasks=_split_list(tasks) or None,
            offscreen_rate=offscreen_rate,
            silent_rate=silent_rate,
            aspects=aspect_values,
            workers=workers,
            overwrite=overwrite,
            progress=report,
        )
    finally:
        bar.stop()
    if not quiet:
        console.print(f"wrote {videos} {layout} videos to {root} (ground truth: {root / 'synth_meta.json'})")
