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
    from ddeseg.pipelines.inspect import inspect

    inspect(shards_dir, dump=dump, out=out, classes=classes)
