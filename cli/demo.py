"""`ddeseg demo`: the whole pipeline on the synthetic default."""

from __future__ import annotations

from pathlib import Path

import typer

from ddeseg.cli import options
from ddeseg.cli.registry import command


@command("demo")
def demo_command(
    out: Path = typer.Option(Path("demo-out"), "--out", help="Folder for everything the demo writes (raw data, shards, runs, report, config.yaml)."),
    minutes: float = typer.Option(6.0, "--minutes", min=0.1, help="Rough pipeline budget on 2 CPU cores; data and steps scale with it (small budgets still synthesise enough videos for every class to have training frames)."),
    classes: int = typer.Option(8, "--classes", min=2, max=20, help="Synthetic object/sound classes."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data, of training and of the memory bank's K-Means."),
    config: str = typer.Option("demo", "--config", help="Config YAML (path, or a bundled name)."),
    override: list[str] = options.set_option("data.image_size=96"),
    print_config: bool = options.print_config_option(),
) -> None:
    """Run synth -> prepare -> pretrain-audio -> build-memory-bank -> train -> evaluate (with
    shuffled- and silent-audio controls) and write OUT/report.html, OUT/report.md, OUT/eval.json.

    Example:

        ddeseg demo --out demo-out
    """
    from ddeseg.pipelines.demo import DemoPaths, DemoPlan, demo_config, run_demo

    plan = DemoPlan.for_minutes(minutes, classes=classes, seed=seed, overrides=list(override))
    resolved = demo_config(plan, config)  # a bad --config or --set fails here, before anything is written
    if print_config:
        options.print_config(resolved)
    with options.exit_130_on_interrupt():
        run_demo(resolved, DemoPaths(out), plan)
