"""The `ddeseg` Typer app. Each command lives in its own module and only parses arguments,
builds the config and calls a stage; user errors become a one-line message and exit status 2."""

from __future__ import annotations

import sys

import typer

from ddeseg.errors import DDESegError

app = typer.Typer(
    name="ddeseg",
    help="Audio-visual segmentation with DDESeg: synth -> prepare -> build-memory-bank -> train -> evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each command module records its command (`cli/registry.py`); the import order is the order in
# `--help` (the pipeline's order), so these lines are not sorted.
# ruff: noqa: I001
from ddeseg.cli import synth  # noqa: F401
from ddeseg.cli import prepare  # noqa: F401
from ddeseg.cli import inspect  # noqa: F401
from ddeseg.cli import pretrain_audio  # noqa: F401
from ddeseg.cli import build_memory_bank  # noqa: F401
from ddeseg.cli import train  # noqa: F401
from ddeseg.cli import evaluate  # noqa: F401
from ddeseg.cli import demo  # noqa: F401
from ddeseg.cli import predict  # noqa: F401
from ddeseg.cli.registry import COMMANDS

for _name, _settings, _function in COMMANDS:
    app.command(_name, **_settings)(_function)


def main() -> None:
    try:
        app()
    except DDESegError as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        sys.exit(2)


def _one_line(error: Exception) -> str:
    """The reason on one line. An error raised in a DataLoader worker arrives re-wrapped as
    "Caught X in DataLoader worker process N. Original Traceback ..." with the reason last."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught "):
        last = lines[-1]
        return last.split(": ", 1)[1] if last.startswith(type(error).__name__ + ":") else last
    return " ".join(line.strip() for line in lines)
