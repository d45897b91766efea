"""Where command modules declare their commands, so that they never import the app back.

`@command("train", no_args_is_help=True)` records the function and Typer's settings; `cli/app.py`
imports the command modules (the import order is `--help`'s order) and registers what they
recorded. The command modules import only this leaf, so `app -> command -> app` cannot form.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

COMMANDS: list[tuple[str, dict[str, Any], Callable[..., Any]]] = []


def command(name: str, **settings: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Record `function` as `ddeseg NAME` with Typer's `app.command` settings."""

    def record(function: Callable[..., Any]) -> Callable[..., Any]:
        COMMANDS.append((name, settings, function))
        return function

    return record
