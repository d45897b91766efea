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



def _print_version(value: bool) -> None:
    if value:
        from ddeseg import __version__

        typer.echo(f"ddeseg {__version__}")
        raise typer.Exit(0)


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print ddeseg's version and exit."),
) -> None:
    """Audio-visual segmentation with DDESeg: synth -> prepare -> build-memory-bank -> train -> evaluate."""


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
    hint = set_without_equals(sys.argv[1:])
    if hint:
        print(f"error: {hint}", file=sys.stderr)
        sys.exit(2)
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


def set_without_equals(args: list[str]) -> str | None:
    """The error for `--set key value` (two arguments; the parser would take `value` for an
    extra argument, or for a video of `predict`), with the form to write instead; else None."""
    for option, value in zip(args, args[1:], strict=False):
        if option == "--set" and "=" not in value:
            return f"--set {value}: write --set {value}=VALUE (key=value, one argument, no space around '=')"
    return None
