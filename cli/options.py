"""Options that several commands share, defined once, and how a command's stage options become
config overrides.

A command's options are of three kinds:
- paths (`--shards`, `--out`, `--checkpoint`, ...) and run control (`--device`, `--quiet`,
  `--overwrite`, `--resume`): plain options, passed to the stage beside the config;
- stage settings (`--k`, `--workers`, `--split`, `--frames-per-second`, ...): aliases of a config
  key (`memory_bank.k`, `prepare.workers`, `eval.split`, `predict.frames_per_second`). They
  default to None, "not given": then the config decides (its file, else the built-in default);
  given, they override the key. `stage_overrides` puts them after the `--set` items;
- `--config` and `--set section.key=value`, the config itself.

Precedence, lowest first: the built-in defaults (`ddeseg.config`), the config file (or the one
stored in a checkpoint), `--set`, the command's own options.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from enum import Enum
from typing import Any

import typer

from ddeseg.config import STAGE_KEY_CHOICES, Override


def stage_overrides(sets: list[str], aliases: Mapping[str, Any]) -> list[Override]:
    """The `--set` items, then a `(key, value)` pair for every alias option given (not None), so
    that an option wins over a `--set` of the same key. The pairs carry the typed values as they
    are (the config checks them); an Enum choice gives its value."""
    given = {key: value.value if isinstance(value, Enum) else value for key, value in aliases.items() if value is not None}
    return [*sets, *given.items()]


def config_choices(name: str, key: str) -> type[Enum]:
    """A Typer choice type whose values are the config's choices for `key` (`STAGE_KEY_CHOICES`):
    the option and the config accept the same values, from one table."""
    return Enum(name, {value: value for value in STAGE_KEY_CHOICES[key]}, type=str)


@contextmanager
def exit_130_on_interrupt() -> Iterator[None]:
    """Ctrl-C / SIGTERM in a stage: exit status 130 (the stage left its state resumable)."""
    try:
        yield
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def set_option(example: str) -> Any:
    """`--set section.key=value` (repeatable)."""
    return typer.Option(
        [], "--set", help=f"Config override section.key=value, e.g. --set {example} (repeatable); this command's own options win over it."
    )


def config_option(help: str, required: bool = False) -> Any:
    """`--config CFG.yaml`: a file, or the name of a bundled config (`v2`, `demo`; checked by
    `ddeseg.config.resolve_config_path` when the config is loaded, before any work)."""
    return typer.Option(... if required else None, "--config", dir_okay=False, help=f"{help} A bundled config by name works too (v1s, v1m, v2, VPO-SS, VPO-MS, VPO-MSMI, tiny, demo).")


def print_config_option() -> Any:
    return typer.Option(False, "--print-config", help="Print the resolved config (config file, --set, this command's options) as YAML and exit.")


def stage_config(config: Any, sets: list[str], aliases: Mapping[str, Any], print_only: bool) -> Any:
    """A command's resolved config: the file (or bundled name), `--set`, then its own options
    (`stage_overrides`); with `--print-config` (`print_only`) it is printed and the command ends."""
    from ddeseg.config import load_config

    resolved = load_config(config, stage_overrides(sets, aliases))
    if print_only:
        print_config(resolved)
    return resolved


def print_config(config: Any) -> None:
    """The resolved config as YAML on stdout (what OUT/config.yaml would hold), then exit 0."""
    import yaml

    from ddeseg.config import to_dict

    typer.echo(yaml.safe_dump(to_dict(config), sort_keys=False), nl=False)
    raise typer.Exit(0)


def required(value: Any, option: str) -> Any:
    """`value`, or the one-line error of a missing option (options that `--print-config` does not need)."""
    if value is None:
        from ddeseg.errors import DDESegError

        raise DDESegError(f"missing option {option}")
    return value


def device_option(what: str = "") -> Any:
    """`--device`: cpu, cuda or cuda:N; None is the local GPU when present."""
    return typer.Option(None, "--device", help=f"{what}cpu, cuda or cuda:N; default: the local GPU when present.")


def quiet_option() -> Any:
    return typer.Option(False, "--quiet", help="No progress bars.")


def shards_option() -> Any:
    return typer.Option(..., "--shards", exists=True, file_okay=False, help="Shard directory (SHARDS_DIR) written by `ddeseg prepare`.")


def task_option(help: str = "Task (v1s, v1m, v2, VPO-SS, VPO-MS, VPO-MSMI); default: the config's.") -> Any:
    """`--task`: an alias of the config's top-level `task`."""
    return typer.Option(None, "--task", help=help)


def checkpoint_option() -> Any:
    return typer.Option(..., "--checkpoint", help="best.pt/last.pt from `ddeseg train`, or an official DDESeg checkpoint (then --config and --memory-bank).")


def inference_config_option() -> Any:
    """`--config` of the commands that read a checkpoint (which stores its own config)."""
    return config_option("Config YAML: required for official checkpoints; replaces the config stored in ours.")


def inference_bank_option() -> Any:
    return typer.Option(None, "--memory-bank", exists=True, dir_okay=False, help="bank.npy for checkpoints without a memory bank (official ones); replaces a stored one.")
