"""The `ddeseg` command line (installed as `ddeseg.cli`): thin Typer commands, no logic."""
