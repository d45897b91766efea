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

# Commands register themselves in their modules; import order is the order in `--help`.


def main() -> None:
    try:
        app()
    except DDESegError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
