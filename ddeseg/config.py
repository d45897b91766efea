"""Typed configuration, loaded from `configs/*.yaml`.

One tree of dataclasses mirrors the YAML. Unknown keys are errors (a typo in a config must not
be silently ignored), missing keys take the defaults below. `load_config(path)` resolves
`base:` inheritance (a config may name another YAML, relative to itself, whose values it
overrides) and dotted overrides such as `train.steps=100`.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ddeseg.errors import DDESegError
from ddeseg.fileio import write_bytes_atomic
from ddeseg.units import parse_bytes

# --------------------------------------------------------------------------------------------
# Model (names follow the official `configs/ddeseg.yaml`; configs/README.md maps them)
# --------------------------------------------------------------------------------------------


@dataclass
class FrontendConfig:
    """The log-mel front end, shared by `prepare` (precompute) and the model (raw waveform).

    Official names (`audio_model.config.*`) in brackets; see configs/README.md.
    """

    sample_rate: int = 22050  # [sample_rate]
    n_fft: int = 1024  # [window_size] (also the Hann window length)
    hop_length: int = 256  # [hop_size]
    mel_bins: int = 64  # [mel_bins]
    fmin: float = 50.0  # [fmin]
    # The official yaml says fmax 50 (an all-NaN filterbank that only worked because the
    # HTS-AT checkpoint overwrites it); we default to the Nyquist band.
    fmax: float = 11025.0  # [fmax]


@dataclass
class AudioBackboneConfig:
    """HTS-AT (official `audio_model`), frozen inside DDESeg."""

    spec_size: int = 256
    patch_size: int = 4
    patch_stride: tuple[int, int] = (4, 4)
    in_chans: int = 1
    num_classes: int = 71  # classes of the HTS-AT token-semantic head (not the segmentation classes)
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    enable_tscam: bool = True
    # `eval`: frozen means frozen (bn0 statistics fixed, no SpecAugment, no stochastic depth);
    # `official`: the audio backbone runs in train mode during training, as the official code.
    mode: str = "eval"
    # In `official` mode, SpecAugment inside the backbone while training (as the official
    # HTS-AT); false turns it off (e.g. to reproduce the official training-step fixture).
    spec_augment: bool = True


@dataclass
class VisualBackboneConfig:
    """MiT-style backbone with audio-visual aligners (official `vis_model`, type FAVS)."""

    in_channels: tuple[int, ...] = (64, 128, 320, 512)
    num_heads: tuple[int, ...] = (1, 2, 5, 8)
    mlp_ratios: tuple[int, ...] = (4, 4, 4, 4)
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    depths: tuple[int, ...] = (3, 6, 40, 3)
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)
    first_patch_stride: int = 2  # hard-coded in the official FAVSBackbone (MiT itself uses 4)
    aligner_heads: int = 8  # hard-coded `AV_Aligner(num_heads=8)`
    aligner_clusters: int = 5  # hard-coded `AV_Aligner(num_clusters=5)`
    gumbel_tau: float = 1.0  # hard-coded `GumbelSoftmaxClustering(temperature=1.0)`


@dataclass
class ModelConfig:
    num_classes: int = 71  # official top-level `num_classes` (1 for v1s/v1m, 22 for VPO)
    audio_embed_dim: int = 768  # width of the audio latent (= HTS-AT embed_dim * 2^(stages-1))
    derived_semantics: int = 5  # official `align_model.aud_cls_num`
    head_type: str = "norm"  # official `seg_head.type`: norm | weighted
    head_embedding_dim: int = 768  # official `seg_head.embedding_dim`
    head_dropout: float = 0.1  # hard-coded `Dropout2d(0.1)` before the classifier
    # PyTorch's fused scaled_dot_product_attention in the MiT and HTS-AT attentions: the same
    # function (both paths match the official fixture to < 1e-5); it does not materialise the
    # attention matrix (memory on GPU); on the CPU the speed is about the same (bench_model.py).
    # false = the official explicit softmax(QK^T)V.
    fused_attn: bool = True
    frontend: FrontendConfig = field(default_factory=FrontendConfig)
    audio: AudioBackboneConfig = field(default_factory=AudioBackboneConfig)
    visual: VisualBackboneConfig = field(default_factory=VisualBackboneConfig)


# --------------------------------------------------------------------------------------------
# Data, training, loss, evaluation
# --------------------------------------------------------------------------------------------


@dataclass
class AugmentConfig:
    crop_scale_min: float = 0.6  # minimum area ratio of the box-constrained crop
    crop_ratio: tuple[float, float] = (0.75, 1.3333)
    hflip: bool = True
    color_jitter: tuple[float, float, float, float] = (0.2, 0.2, 0.2, 0.1)
    # true: the jitter runs on the cropped frame before the resize, as the official loader (what
    # the paper configs reproduce); false: after the resize, on image_size^2 pixels (ours: far
    # cheaper on large frames, but a different image: docs/augmentations.md).
    jitter_before_resize: bool = False
    spec_augment: bool = False  # time/frequency masking of the log-mel, in the loader


@dataclass
class DataConfig:
    image_size: int = 224
    clip_seconds: float = 1.0  # audio per frame fed to the model
    batch_size: int = 2
    eval_batch_size: int = 2
    num_workers: int = 4
    shuffle_buffer: int = 1000
    samples_per_shard: int = 256
    vpo_audio: str = "mono"  # mono | stereo (stereo is mixed down after CAVP-style panning)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class LossConfig:
    ce_weight: float = 5.0
    dice_weight: float = 5.0
    iou_weight: float = 2.0
    focal_weight: float = 0.0


@dataclass
class TrainConfig:
    steps: int = 1000
    # The learning-rate schedule (ddeseg.training.schedule): `official` is the official scheduler's
    # per-step sequence (warm-up from 0, a cosine over all steps restarted at the warm-up's end);
    # `warmup_cosine` is ours (warm-up from warmup_lr, then a cosine ending exactly at min_lr).
    schedule: str = "warmup_cosine"
    # When set, `steps` = epochs_equivalent x steps per epoch of the data (and `warmup_steps` =
    # warmup_epochs x steps per epoch): the official schedules are in epochs.
    epochs_equivalent: int | None = None
    warmup_epochs: float | None = None
    base_lr: float = 1e-3
    min_lr: float = 4e-5
    warmup_lr: float = 4e-6
    warmup_steps: int = 100
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    precision: str = "bf16"  # bf16 | fp16 | fp32 (autocast on CUDA; the CPU trains in float32 ...)
    # ... unless this is true: then bf16 autocast also on the CPU (to check the GPU's bf16
    # numerics on the CPU; fp16 stays CUDA-only). False keeps CPU runs (demo, tests) float32.
    cpu_autocast: bool = False
    # Recompute activations in the backward pass (GPU memory; same gradients): any of
    # visual_blocks, visual_stages, aligners, head (CHECKPOINT_PARTS below).
    activation_checkpointing: tuple[str, ...] = ()
    # A GPU memory budget such as "24GiB": the micro-batch and gradient accumulation are then
    # chosen by the memory plan (ddeseg.training.memory_plan) so that the configured batch is kept.
    gpu_memory: str | None = None
    # Print the memory plan in `ddeseg train`'s start-up table (it measures two short forwards:
    # seconds on a GPU, minutes for the paper config on the CPU). null: on CUDA, or when
    # gpu_memory is set; true/false: always/never (gpu_memory still plans).
    memory_plan: bool | None = None
    sync_batchnorm: bool = True  # multi-rank runs: BatchNorm -> SyncBatchNorm, as the official code
    compile: bool = False  # torch.compile the model (opt-in; see configs/README.md for the caveats)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 500
    checkpoint_every: int = 500
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "ddeseg"
    # A non-finite loss or gradient (all ranks agree on it, at the step): stop (nothing is saved
    # over the last good checkpoint) or skip the step (counted in the log) up to
    # max_nonfinite_in_a_row steps in a row, then stop.
    on_nonfinite: str = "stop"  # stop | skip
    max_nonfinite_in_a_row: int = 10
    # torchrun: a collective that waits longer than this (a rank died or hangs) fails on every
    # rank, which then exit instead of waiting forever (the process group's timeout).
    collective_timeout_s: float = 600.0


@dataclass
class PretrainAudioConfig:
    """`ddeseg pretrain-audio`: the audio backbone trained as a multi-label sound-event classifier."""

    steps: int = 2000
    batch_size: int = 32
    base_lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.05
    log_every: int = 20
    eval_every: int = 500


# --------------------------------------------------------------------------------------------
# The other stages. Each command's stage settings are keys here; its options of the same name
# (in brackets) are aliases that override the key for one run (`ddeseg.cli.options`).
# --------------------------------------------------------------------------------------------


@dataclass
class PrepareConfig:
    """`ddeseg prepare` (the shards' own settings are `model.frontend` and `data.*`)."""

    workers: int = 1  # [--workers] processes that read and check frames; same output for any number
    on_error: str = "skip"  # [--on-error] skip: list bad frames in rejects.jsonl; fail: stop
    export_bbox_json: bool = False  # [--export-bbox-json] SHARDS_DIR/bbox/*_bbox_orisize.json
    avsbench_part: str = "auto"  # [--avsbench-part] auto | semantic | object (avsbench layout)


@dataclass
class MemoryBankConfig:
    """`ddeseg build-memory-bank` (see `ddeseg.pipelines.build_memory_bank`)."""

    k: int = 128  # [--k] centroids per class
    niter: int = 25  # [--niter] K-Means iterations
    nredo: int = 1  # [--nredo] K-Means restarts, the best kept
    seed: int = 0  # [--seed] K-Means seed
    spherical: bool = False  # [--spherical] cosine K-Means
    include_multi_source: bool = False  # [--include-multi-source]
    silence_row: bool = False  # [--silence-row] silent samples make the background row
    allow_missing_classes: bool = False  # [--allow-missing-classes] fill instead of failing
    missing_fill: str = "global_mean"  # [--missing-fill] global_mean | zeros
    batch_size: int = 64  # [--batch-size] clips per embedding batch


@dataclass
class EvalConfig:
    """`ddeseg evaluate`."""

    split: str = "test"  # [--split] train | val | test
    pictures: int = 16  # [--pictures] frames drawn (the first by key)
    worst_frames: int = 16  # [--worst] frames on the worst-frames contact sheet
    audio_control: str = "none"  # [--audio-control] none | shuffled | silent


@dataclass
class PredictConfig:
    """`ddeseg predict`."""

    frames_per_second: float = 1.0  # [--frames-per-second] capped at each video's frame rate
    batch_size: int = 8  # [--batch-size] frames per forward pass
    allow_no_audio: bool = False  # [--allow-no-audio] a video without sound is predicted with silence
    # overlay.mp4: "source" at the video's own frame rate (the frames between two predictions show
    # the last prediction's mask), "sampled" one picture per prediction at frames_per_second
    overlay_video: str = "source"


@dataclass
class InputsConfig:
    """The files a training run read. `ddeseg train` records them here, absolute, with a
    fingerprint each, in RUN_DIR/config.yaml, so that `ddeseg train --config RUN_DIR/config.yaml
    --out NEW` reruns the run; `--shards`, `--memory-bank` and `--init` replace them."""

    shards: str | None = None  # [--shards] SHARDS_DIR
    memory_bank: str | None = None  # [--memory-bank] bank.npy
    init: tuple[str, ...] = ()  # [--init] checkpoints loaded before step 0 (e.g. the audio backbone)
    # path -> "sha256:HEX" (files up to 1 GiB, a shard folder's manifest.parquet) or
    # "size=BYTES mtime=ISO" (larger files): a rerun warns when a file changed since.
    fingerprints: dict[str, str] = field(default_factory=dict)


@dataclass
class Config:
    task: str = "v2"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain_audio: PretrainAudioConfig = field(default_factory=PretrainAudioConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    memory_bank: MemoryBankConfig = field(default_factory=MemoryBankConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    inputs: InputsConfig = field(default_factory=InputsConfig)


# --------------------------------------------------------------------------------------------
# Value ranges of the training keys (checked on load: a 0 batch size or step count is a clear
# error naming the key, not a ZeroDivisionError deep in the loop)
# --------------------------------------------------------------------------------------------

# dotted key: (bound, strict); the value must be > bound (strict) or >= bound. None passes (the
# key's "off" or "derive it" value where its type allows None).
TRAINING_KEY_RANGES: dict[str, tuple[float, bool]] = {
    "data.batch_size": (1, False),
    "data.eval_batch_size": (1, False),
    "data.num_workers": (0, False),
    "data.samples_per_shard": (1, False),
    "train.steps": (1, False),
    "train.epochs_equivalent": (1, False),
    "train.warmup_epochs": (0, False),
    "train.base_lr": (0, True),  # the schedule is a factor of it
    "train.min_lr": (0, False),
    "train.warmup_lr": (0, False),
    "train.warmup_steps": (0, False),
    "train.weight_decay": (0, False),
    "train.eps": (0, True),
    "train.grad_clip": (0, False),  # 0 or null: no clipping
    "train.grad_accum": (1, False),
    "train.log_every": (1, False),
    "train.eval_every": (1, False),
    "train.checkpoint_every": (1, False),
    "train.max_nonfinite_in_a_row": (1, False),
    "train.collective_timeout_s": (0, True),
    "pretrain_audio.steps": (1, False),
    "pretrain_audio.batch_size": (1, False),
    "pretrain_audio.base_lr": (0, True),
    "pretrain_audio.min_lr": (0, False),
    "pretrain_audio.warmup_steps": (0, False),
    "pretrain_audio.weight_decay": (0, False),
    "pretrain_audio.log_every": (1, False),
    "pretrain_audio.eval_every": (1, False),
}
PRECISIONS = ("bf16", "fp16", "fp32")  # train.precision; the memory plan and autocast (ddeseg.training.precision) read it here
# The model parts `train.activation_checkpointing` may name (`DDESeg.set_activation_checkpointing`).
CHECKPOINT_PARTS = ("visual_stages", "visual_blocks", "aligners", "head")
TRAINING_KEY_CHOICES: dict[str, tuple[str, ...]] = {
    "train.schedule": ("official", "warmup_cosine"),  # ddeseg.training.schedule's schedules
    "train.on_nonfinite": ("stop", "skip"),  # a non-finite loss or gradient: stop, or skip the step
}


def check_training_keys(config: Config) -> None:
    """Raise `ConfigError` naming the first training key whose value is out of range."""
    _check_table(config, TRAINING_KEY_RANGES, TRAINING_KEY_CHOICES)
    betas = config.train.betas
    if len(betas) != 2 or not all(0 <= beta < 1 for beta in betas):
        raise ConfigError(f"train.betas must be two numbers in [0, 1), got {list(betas)}")
    if config.train.precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {config.train.precision!r}")
    _check_memory_keys(config.train)


def _check_memory_keys(train: TrainConfig) -> None:
    """`train.activation_checkpointing` names known parts; `train.gpu_memory` is a size."""
    if train.activation_checkpointing:
        unknown = sorted(set(train.activation_checkpointing) - set(CHECKPOINT_PARTS))
        if unknown:
            raise ConfigError(f"train.activation_checkpointing: unknown part(s) {unknown}; choose from {list(CHECKPOINT_PARTS)}")
    if train.gpu_memory is not None:
        try:
            parse_bytes(train.gpu_memory)
        except DDESegError as error:
            raise ConfigError(f"train.gpu_memory: {error}") from None


# The other stages' keys: (bound, strict) as above, and the values a choice key may take.
STAGE_KEY_RANGES: dict[str, tuple[float, bool]] = {
    "prepare.workers": (1, False),
    "memory_bank.k": (1, False),
    "memory_bank.niter": (1, False),
    "memory_bank.nredo": (1, False),
    "memory_bank.batch_size": (1, False),
    "eval.pictures": (0, False),
    "eval.worst_frames": (0, False),
    "predict.frames_per_second": (0, True),
    "predict.batch_size": (1, False),
}
# Config keys a resumed run may change: the schedule's length (extending a run), how often it
# logs, validates and saves, and settings that do not reach the weights. Everything else (model,
# task, data, loss, optimizer, seed) must match the run: the weights and the optimizer state are
# its, and a changed base_lr would be silently ignored by the restored scheduler. Changing
# data.num_workers changes the sample order, so the resumed run is no longer bit-identical to
# an uninterrupted one. Activation checkpointing computes the same gradients (memory for time:
# e.g. resuming on a smaller GPU); gpu_memory is not planned again on resume (the run's micro-
# batch is kept); memory_plan only prints. Not here: precision, cpu_autocast, sync_batchnorm and
# compile (other numerics or other random draws).
# A trailing "." is a whole section. Checked by the train stage (`check_resume_config`); `train
# --resume --help` lists them from here.
RESUME_MAY_CHANGE = (
    "train.steps",
    "train.epochs_equivalent",
    "train.warmup_epochs",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.tensorboard",
    "train.wandb",
    "train.wandb_project",
    "train.on_nonfinite",  # e.g. resume a diverged run with skip
    "train.max_nonfinite_in_a_row",
    "train.collective_timeout_s",
    "train.activation_checkpointing",
    "train.gpu_memory",
    "train.memory_plan",
    "data.num_workers",
    "data.eval_batch_size",
    "eval.",
    "pretrain_audio.",
    # Settings of other stages: they never reach the weights or the data order of a training run.
    "prepare.",
    "memory_bank.",
    "predict.",
    # Where the inputs are (a moved dataset may still resume) and their fingerprints.
    "inputs.",
)


STAGE_KEY_CHOICES: dict[str, tuple[str, ...]] = {
    "prepare.on_error": ("skip", "fail"),
    "prepare.avsbench_part": ("auto", "semantic", "object"),
    "memory_bank.missing_fill": ("global_mean", "zeros"),
    "eval.split": ("train", "val", "test"),
    "eval.audio_control": ("none", "shuffled", "silent"),
    "predict.overlay_video": ("source", "sampled"),
}


def check_stage_keys(config: Config) -> None:
    """Raise `ConfigError` naming the first stage key (prepare, memory_bank, eval, predict) whose
    value is out of range or not one of its choices."""
    _check_table(config, STAGE_KEY_RANGES, STAGE_KEY_CHOICES)


def _check_table(config: Config, ranges: dict[str, tuple[float, bool]], choices: dict[str, tuple[str, ...]]) -> None:
    """The one range/choice check behind both tables: the first offending key, named, with how
    to set it. None passes a range (a key's "off" or "derive it" value where its type allows)."""
    for dotted in (*ranges, *choices):
        section, key = dotted.split(".")
        value = getattr(getattr(config, section), key)
        how = f"set it in the config, with --set {dotted}=... or its option"
        if dotted in choices:
            if value not in choices[dotted]:
                raise ConfigError(f"{dotted} must be one of {', '.join(choices[dotted])}, got {value!r}: {how}")
            continue
        bound, strict = ranges[dotted]
        if value is not None and (value <= bound if strict else value < bound):
            raise ConfigError(f"{dotted} must be {'>' if strict else '>='} {bound}, got {value!r}: {how}")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


class ConfigError(DDESegError, ValueError):
    """A config file or override that does not fit the schema."""


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        return tuple(_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{where}[{k!r}]") for k, v in value.items()}
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)  # YAML reads `4e-6` as a string
        except ValueError as error:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from error
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass `cls` from a plain dict, refusing unknown keys."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain-YAML-able dict of a config dataclass (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(config))


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular `base:` chain {[str(p) for p in seen]}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with path.open() as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base_name = data.pop("base", None)
    if base_name is None:
        return data
    base = _read_yaml_with_bases(path.parent / base_name, seen + (path,))
    return _deep_merge(base, data)


# An override: `section.key=value` as typed after `--set` (its value is YAML), or a pair
# `(section.key, value)` from a typed command-line option (`--k 64`), taken as it is rather than
# written out as text and parsed back. Either way the config's tables check the value, once.
Override = str | tuple[str, Any]


def override_text(item: Override) -> str:
    """An override as a user would type it after `--set` (for messages and records)."""
    return item if isinstance(item, str) else f"{item[0]}={json.dumps(item[1])}"


def parse_overrides(overrides: Sequence[Override] | None) -> dict[str, Any]:
    """`["train.steps=10", ("data.batch_size", 4)]` -> nested dict (strings' values YAML-parsed)."""
    nested: dict[str, Any] = {}
    for item in overrides or []:
        if isinstance(item, tuple):
            dotted, value = item
        elif "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value: write --set {item.strip()}=VALUE (one argument, no space around '=')")
        else:
            dotted, raw = item.split("=", 1)
            value = yaml.safe_load(raw)
        node = nested
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def check_overrides(overrides: Sequence[Override]) -> None:
    """`ConfigError` (one line, naming the overrides) for an unknown key or a value of the wrong
    type in `section.key=value` overrides: for the stages whose config is read later, from a
    checkpoint, so that a typo fails before any work."""
    try:
        from_dict(Config, parse_overrides(list(overrides)))
    except ConfigError as error:
        raise ConfigError(f"--set {' '.join(map(override_text, overrides))}: {error}") from None


def config_from_dict(data: dict[str, Any], overrides: Sequence[Override] | None = None) -> Config:
    config = from_dict(Config, _deep_merge(data, parse_overrides(overrides)))
    check_training_keys(config)
    check_stage_keys(config)
    return config


BUNDLED_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def resolve_config_path(path: str | Path) -> Path:
    """A config file path; a bare name such as `v2` or `demo.yaml` that is not a file names one
    of the configs shipped with ddeseg (`configs/` of the repository, `ddeseg.configs` installed)."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    if candidate.parent == Path("."):
        name = candidate.name if candidate.suffix == ".yaml" else f"{candidate.name}.yaml"
        try:
            from importlib.resources import files

            bundled = Path(str(files("ddeseg.configs") / name))
        except ModuleNotFoundError:
            bundled = BUNDLED_CONFIGS / name
        if bundled.is_file():
            return bundled
    raise ConfigError(f"config file not found: {path} (bundled configs: v1s, v1m, v2, VPO-SS, VPO-MS, VPO-MSMI, tiny, demo)")


def load_config(path: str | Path | None, overrides: Sequence[Override] | None = None) -> Config:
    """Load a YAML config (with `base:` inheritance) and dotted overrides into a `Config`.
    `path` may also name a bundled config (`v2`, `demo`, ...)."""
    data = {} if path is None else _read_yaml_with_bases(resolve_config_path(path))
    try:
        return config_from_dict(data, overrides)
    except ConfigError as error:
        # No file: the error is in the `--set` items or the options (an option as `key=value`).
        where = path if path is not None else " ".join(
            f"--set {item}" if isinstance(item, str) else override_text(item) for item in overrides or []
        )
        raise ConfigError(f"{where}: {error}") from None


CONFIG_FILE = "config.yaml"  # the resolved config, in every stage's output folder


def save_config(config: Config, path: str | Path) -> Path:
    """Write `config` as YAML to `path` through a temporary name and a rename (a reader never sees
    half a file). The same config gives the same bytes (keys in the dataclasses' order)."""
    path = Path(path)
    write_bytes_atomic(path, yaml.safe_dump(to_dict(config), sort_keys=False).encode())
    return path
