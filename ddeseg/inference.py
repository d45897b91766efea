"""Checkpoint -> ready model: the one loader of `ddeseg evaluate`, `ddeseg predict` and the demo.

`load_for_inference` reads a checkpoint with the one safe `torch.load`
(`ddeseg.models.weights.read_checkpoint_file`), takes its config (ours store one; official
checkpoints need `config`), reads a memory bank with `ddeseg.bank.read_memory_bank` (official
checkpoints hold none), builds the model and loads every weight. A checkpoint that does not fill
the model (missing or shape-mismatched tensors: another architecture or size) is refused with one
`CheckpointError` line: scores of a half-loaded model look valid but are not. The memory bank is
the only part a checkpoint may lack (then `memory_bank` must be given).

`resolve_class_names` gives the names of a model's classes when no prepared folder is at hand
(predict).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ddeseg.bank import read_memory_bank
from ddeseg.classes import AVSS_CLASSES, VPO_CLASSES
from ddeseg.config import Config, config_from_dict, load_config
from ddeseg.data.shards import read_classes_file, task_class_names
from ddeseg.errors import CheckpointError, DataError, DDESegError
from ddeseg.training.checkpoint import FORMAT, is_training_checkpoint, stored_config


@dataclass
class InferenceModel:
    """A loaded model and where it came from."""

    model: torch.nn.Module  # a DDESeg with its memory bank, eval mode, on the requested device
    config: Config  # the checkpoint's config (or `config`), overrides applied
    checkpoint: Path
    format: str  # `ddeseg.training.checkpoint.FORMAT` for ours, "official" otherwise
    load_report: str  # `LoadReport.summary()`
    memory_bank: str  # the bank file read, or "checkpoint"
    classes: list[str] = field(default_factory=list)  # the unified class names stored in ours
    step: int | None = None
    unexpected_keys: int = 0  # file tensors the model has no place for (loaded anyway: a warning)

    def warning(self) -> str | None:
        """A line to show the user when the file held tensors the model does not use."""
        if not self.unexpected_keys:
            return None
        return f"{self.checkpoint} holds {self.unexpected_keys} tensors the model does not use: {self.load_report}"


def load_for_inference(
    checkpoint: str | Path,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    memory_bank: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> InferenceModel:
    """Build the model of a checkpoint (ours from `ddeseg train`, or an official full one).

    Args:
        checkpoint: the `.pt`/`.pth` file.
        config: a config YAML; required for official checkpoints, replaces the one stored in ours.
        overrides: `section.key=value` strings (e.g. `task=v1s`), applied to either config.
        memory_bank: a `bank.npy`; required when the checkpoint holds none, replaces a stored one.
            Checked by `read_memory_bank`: float, `[classes, k >= 1, model.audio_embed_dim]`, and
            for a multi-class model `classes == model.num_classes` (a binary model's bank has the
            AVSS rows: its count is checked against the shards by `require_bank_classes`).
        device: where the model goes.
    Raises:
        `CheckpointError` / `DataError` / `DDESegError`, one line naming the file, for a file that
        is not a checkpoint, a checkpoint of part of a model or of another architecture, a missing
        config or bank, or a bad bank.
    """
    from ddeseg.models import build_model, load_checkpoint
    from ddeseg.models.weights import read_checkpoint_file

    path = Path(checkpoint)
    payload = read_checkpoint_file(path)
    ours = is_training_checkpoint(payload)
    resolved, config_source = _checkpoint_config(path, payload, config, overrides)
    bank = None
    if memory_bank is not None:
        binary = resolved.model.num_classes == 1
        bank = read_memory_bank(
            memory_bank,
            classes=None if binary else resolved.model.num_classes,
            embed_dim=resolved.model.audio_embed_dim,
            task=resolved.task,
        )

    model = build_model(resolved.model)
    report = load_checkpoint(model, payload)
    stored = {"classes": list(payload.get("classes") or []), "step": payload.get("step")} if ours else {}
    del payload
    if report.format != "ddeseg":
        raise CheckpointError(
            f"{path} is a {report.format} checkpoint (part of the model only); evaluate a full DDESeg checkpoint"
            " (ours from `ddeseg train`, or an official one)"
        )
    if report.missing or report.mismatched:
        raise CheckpointError(
            f"{path} does not fit the model of {config_source} ({report.summary()}): a checkpoint of another"
            " architecture or size; pass the config it was trained with (--config)"
        )
    if bank is not None:
        model.set_memory_bank(bank)
    elif getattr(model, "memory_bank", None) is None:
        raise DDESegError(
            f"{path} holds no audio memory bank (official checkpoints do not): pass --memory-bank"
            " BANK_DIR/bank.npy from `ddeseg build-memory-bank`"
        )
    model.to(device).eval()
    return InferenceModel(
        model=model,
        config=resolved,
        checkpoint=path,
        format=FORMAT if ours else "official",
        load_report=report.summary(),
        memory_bank=str(memory_bank) if memory_bank is not None else "checkpoint",
        classes=list(stored.get("classes") or []),
        step=stored.get("step"),
        unexpected_keys=len(report.unexpected),
    )


def inference_config(checkpoint: str | Path, config: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """The config `load_for_inference` builds the model with (`config`, else the one stored in
    the checkpoint, with `overrides`), without building the model (`--print-config`)."""
    from ddeseg.models.weights import read_checkpoint_file

    path = Path(checkpoint)
    return _checkpoint_config(path, read_checkpoint_file(path), config, overrides)[0]


def _checkpoint_config(
    path: Path, payload: object, config: str | Path | None, overrides: Sequence[str]
) -> tuple[Config, str]:
    """(config, where it came from) for the checkpoint `payload` read from `path`."""
    if config is not None:
        return load_config(config, list(overrides)), str(config)
    if is_training_checkpoint(payload):
        return config_from_dict(stored_config(payload), list(overrides)), "the config stored in it"
    raise DDESegError(
        f"{path} is not a ddeseg training checkpoint (no config inside): pass --config CFG.yaml"
        " with the model it was trained with (e.g. configs/v2.yaml for an official v2 checkpoint)"
    )


def require_bank_classes(loaded: InferenceModel, needed: int, task: str) -> None:
    """Raise `DataError` when the loaded model's memory bank does not have the `needed` rows of
    `task` (e.g. `len(ShardIndex.bank_class_ids(task))`), naming the bank file or checkpoint."""
    rows = int(loaded.model.memory_bank.shape[0])
    if rows != needed:
        source = loaded.checkpoint if loaded.memory_bank == "checkpoint" else loaded.memory_bank
        raise DataError(
            f"{source}: memory bank has {rows} classes, but task {task} needs {needed}; build one with"
            " `ddeseg build-memory-bank --shards SHARDS_DIR --task TASK --out BANK_DIR`"
        )


def require_output_folder(out: str | Path, option: str = "--out") -> Path:
    """`out` as a Path; `DDESegError` when it exists and is not a folder (checked before any work)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DDESegError(f"{option} {out} is an existing file, not a folder: choose another {option}")
    return out


def resolve_class_names(config: Config, stored: Sequence[str], classes_file: Path | None = None) -> list[str]:
    """Names of the model's classes by class id (2 names for a binary model).

    From `classes_file` when given (a `classes.json` of `ddeseg prepare`, read for `config.task`
    as evaluation reads it, or a plain JSON list of names), else from the checkpoint's stored
    unified list, else the task's known list (binary; AVSS for v2 with 71 classes; VPO with 22).
    """
    num_classes = config.model.num_classes
    binary = num_classes == 1
    wanted = 2 if binary else num_classes
    task = config.task
    names: list[str] | None = None
    where = "the checkpoint"
    if classes_file is not None:
        where = str(classes_file)
        data = read_classes_file(classes_file, allow_name_list=True)  # one line naming the file when bad
        if isinstance(data, list):
            names = data
        elif task in data.get("tasks", {}):
            names = task_class_names(data, task)
        else:
            stored = data["names"]
    if names is None and stored:
        if binary:
            names = [stored[0], "foreground"]
        elif task.startswith("VPO-"):
            names = list(VPO_CLASSES)  # task ids name the VPO classes, whatever their unified ids
        else:
            names = list(stored)
    if names is None:
        if binary:
            names = ["background", "foreground"]
        elif task == "v2" and num_classes == len(AVSS_CLASSES):
            names = list(AVSS_CLASSES)
        elif task.startswith("VPO-") and num_classes == len(VPO_CLASSES):
            names = list(VPO_CLASSES)
        else:
            raise DDESegError(
                f"the checkpoint has no class list and task {task!r} with {num_classes} classes has no known one:"
                " pass --classes classes.json (from `ddeseg prepare`)"
            )
    if len(names) < wanted:
        raise DDESegError(f"{where} names {len(names)} classes but the model predicts {wanted}")
    return names[:wanted]

