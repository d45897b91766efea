"""`ddeseg inspect`: summarise a prepared shard directory, or dump one sample for a person to look at."""

from __future__ import annotations

from pathlib import Path

import typer

from ddeseg.cli.registry import command


@command("inspect", no_args_is_help=True)
def inspect_command(
    shards_dir: Path = typer.Argument(
        ..., exists=True, file_okay=False, help="Folder written by `ddeseg prepare`."
    ),
    dump: str | None = typer.Option(
        None, "--dump", help="Sample key to dump (see the manifest's `key` column)."
    ),
    out: Path | None = typer.Option(None, "--out", help="Folder for the dumped files (with --dump)."),
    classes: int = typer.Option(
        10, "--classes", min=0, help="How many of the most frequent classes to list."
    ),
) -> None:
    """Summarise a prepared shard folder, or dump one sample to PNG/WAV.

    Prints samples per task and split (annotated, silent), the most frequent classes and the rejects. With --dump KEY --out DIR it writes that sample's frame, mask, overlay with the sounding box and log-mel as PNG, its audio as WAV and its meta.json.

    Examples:

        ddeseg inspect shards/avs

        ddeseg inspect shards/avs --dump v2-_abc123_1000-003 --out look/
    """
    from rich.console import Console
    from rich.table import Table

    from ddeseg.errors import DDESegError
    from ddeseg.pipelines.shard_writer import dump_sample, manifest_summary

    console = Console()
    if dump is not None:
        if out is None:
            raise DDESegError("--dump needs --out DIR")
        for path in dump_sample(shards_dir, dump, out):
            console.print(str(path))
        return
    summary = manifest_summary(shards_dir)
    table = Table(
        title=f"{shards_dir}: {summary['samples']} samples in {summary['shards']} shards ({summary['layout']} layout)"
    )
    for column in ("task", "split", "samples", "annotated", "silent"):
        table.add_column(column, justify="left" if column in ("task", "split") else "right")
    for (task, split), counts in summary["splits"].items():
        table.add_row(task, split, str(counts["samples"]), str(counts["annotated"]), str(counts["silent"]))
    console.print(table)
    for task, names in summary["task_classes"].items():
        console.print(f"{task}: {len(names)} classes (with background): {', '.join(names)}", markup=False)
    top = list(summary["classes"].items())[:classes]
    if top:
        console.print("most frequent classes (frames): " + ", ".join(f"{name} {count}" for name, count in top), markup=False)
    rejects = summary["rejects"]
    console.print(f"{len(rejects)} rejected")
    for reject in rejects[:10]:
        console.print(f"  {reject['path']}: {reject['reason']}", markup=False)
    if len(rejects) > 10:
        console.print(f"  ... and {len(rejects) - 10} more in rejects.jsonl")
