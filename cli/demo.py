"""`ddeseg demo`: the whole pipeline on the synthetic default."""

from __future__ import annotations

from pathlib import Path

import typer

from ddeseg.cli.app import app


@app.command("demo")
def demo_command(
    out: Path = typer.Option(Path("demo-out"), "--out", help="Folder for everything the demo writes (raw data, shards, runs, report)."),
    minutes: float = typer.Option(6.0, "--minutes", min=0.1, help="Rough pipeline budget on 2 CPU cores; data and steps scale with it (small budgets still synthesise enough videos for every class to have training frames)."),
    classes: int = typer.Option(8, "--classes", min=2, max=20, help="Synthetic object/sound classes."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data and of training."),
    config: str = typer.Option("demo", "--config", help="Config YAML (path, or a bundled name)."),
    override: list[str] = typer.Option([], "--set", help="Config override, e.g. --set data.image_size=96 (repeatable)."),
) -> None:
    """Run synth -> prepare -> pretrain-audio -> build-memory-bank -> train -> evaluate (with
    shuffled- and silent-audio controls) and write OUT/report.html, OUT/report.md, OUT/eval.json.

    Example:

        ddeseg demo --out demo-out
    """
    from ddeseg.pipelines.demo import DemoPlan, run_demo

    run_demo(out, DemoPlan.for_minutes(minutes, classes=classes, seed=seed, overrides=list(override)), config)
