"""The one shape of a stage: `stage(config, paths, run) -> result`.

- `config`: the resolved `Config`; its section of the stage (`prepare`, `memory_bank`,
  `pretrain_audio`, `train`, `eval`, `predict`) carries every setting. The stages that start from a
  checkpoint (evaluate, predict) take a `ConfigSource` instead: their config is the checkpoint's
  (or a file's) with overrides, resolved when the checkpoint is read.
- `paths`: a small dataclass of the stage's inputs and outputs on disk (`PreparePaths`,
  `MemoryBankPaths`, `PretrainAudioPaths`, `TrainRequest`, `EvaluatePaths`, `PredictPaths`,
  `DemoPaths`).
- `run`: how to run it, not what it computes: `RunOptions` (device, progress bars, overwrite), or
  the `DistributedContext` of the stages that run under torchrun (train, evaluate).

Each stage writes the config that made its outputs to `OUT/config.yaml` (`ddeseg.config.save_config`,
atomic): at the end, with its outputs (prepare, build-memory-bank, evaluate, predict, demo), or at
the start of a run folder that is written step by step (pretrain-audio, train).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ddeseg.config import CONFIG_FILE, Config, save_config

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class RunOptions:
    """How a stage runs; nothing here changes what it computes."""

    device: str | torch.device | None = None  # cpu, cuda, cuda:N (or a resolved device); None: the local GPU when present
    progress: bool = True  # progress bars on stderr
    overwrite: bool = False  # replace what an earlier run wrote to the output folder


@dataclass(frozen=True)
class ConfigSource:
    """A config still to be resolved: `file` (a YAML, or a bundled name) or, when None, the one
    stored in the checkpoint the stage reads; then `overrides` (`section.key=value`) on top
    (`ddeseg.inference.load_for_inference` resolves it)."""

    file: Path | str | None = None
    overrides: tuple[str, ...] = ()


def write_stage_config(config: Config, folder: Path) -> Path:
    """`folder/config.yaml`: the resolved config of the stage that wrote `folder`."""
    return save_config(config, Path(folder) / CONFIG_FILE)
