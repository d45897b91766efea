"""GPU memory: a plan before the first step, and the training-setup switches that change it.

The plan is a device-independent account of one training step of a config at a micro-batch:

    parameters (all, float32) + gradients (trainable, float32) + AdamW state (2 x trainable)
    [+ DDP gradient buckets (trainable) when world_size > 1]
    + activations kept for the backward pass  (measured, per micro-batch)
    + the largest checkpointed segment rebuilt during the backward pass (measured; 0 without
      checkpointing)
    + transient bytes above those: the loss's temporaries at the end of the forward pass, the
      frozen audio backbone's forward (no saved tensors, but its intermediates exist while it
      runs), the backward pass's gradient buffers and kernel workspaces (measured, per micro-batch)

Activation bytes are **measured, not guessed**: a short training forward and the loss (micro-
batch 1 and 2, the config's image size and clip length, random inputs and bank) under
`torch.autograd.graph.saved_tensors_hooks`, counting every tensor autograd saves once per
storage (views share it), parameters and buffers excluded. Checkpointing is accounted in the same
forward: `ddeseg.models.layers.checkpoint_probe` runs each segment plainly and reports its inputs
(kept) and what it saves (rebuilt). Activations are affine in the micro-batch (fixed part: e.g.
bf16 copies of the weights under autocast), so two forwards give the line.

Transient bytes are **measured too** (`measure_step_peak`): one real training forward, loss and
backward pass per micro-batch (1 and 2) on the model's device, gradients allocated beforehand,
tracking every allocation: `torch.cuda.max_memory_allocated` on CUDA, the profiler's allocation
events on the CPU (`torch.profiler`, `profile_memory=True`: every tensor the CPU allocator hands
out, kernel workspaces included). Transient = the measured peak above the saved tensors (and the
segment rebuilt), separately for the forward and the backward pass, each a line in the
micro-batch; the plan takes the larger. Without it the peak RSS growth of a CPU step of
configs/v2.yaml (224 px) was 1.16x (micro-batch 1) and 1.04x (2) the planned activations, with
it 1.02x and 0.97x (`benchmarks/bench_memory.py`): at micro-batch 1 the head's 1x1-convolution
backward holds two 147 MiB buffers, at 2 the loss holds a one-hot int64 target and the softmax
beside the saved tensors. On the tiny config the frozen audio forward (a 256 x 256 spectrogram)
outweighs the saved tensors several times over.

Not in the plan (keep the headroom `choose_micro_batch` leaves, 10% by default): allocator
fragmentation and caching, the CUDA context, the optimizer step's own temporaries (after the
backward pass, when the activations are gone; AdamW's foreach update needs about one more copy of
the trainable weights).
Gradient accumulation keeps the optimizer step's batch, but **not** large-batch BatchNorm: the
head's BatchNorm normalises each micro-batch with its own statistics.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ddeseg.config import PRECISIONS, Config, to_dict
from ddeseg.errors import DDESegError
from ddeseg.models.frontend import frames_for
from ddeseg.models.layers import checkpoint_probe
from ddeseg.training.precision import autocast
from ddeseg.units import format_bytes

BATCHNORM_NOTE = (
    "gradient accumulation does not reproduce large-batch BatchNorm statistics: the head's "
    "BatchNorm normalises each micro-batch with its own statistics"
)


# --------------------------------------------------------------------------------------------
# Measuring saved tensors
# --------------------------------------------------------------------------------------------


@dataclass
class _Segment:
    inputs: set[int] = field(default_factory=set)  # storage ids of the segment's tensor inputs
    saved: set[int] = field(default_factory=set)  # storages saved directly inside it
    children: list[_Segment] = field(default_factory=list)


@dataclass(frozen=True)
class SavedTensorCount:
    """What one training forward saved for the backward pass (bytes, parameters excluded).

    `all_bytes`: without checkpointing (every saved tensor). `kept_bytes`: with the model's
    checkpointing as set: tensors saved outside the segments plus the segments' inputs.
    `recompute_bytes`: the most the backward pass holds at once while rebuilding a segment."""

    all_bytes: int
    kept_bytes: int
    recompute_bytes: int


class _SavedTensorCounter:
    def __init__(self, excluded: set[int]):
        self.excluded = excluded
        self.sizes: dict[int, int] = {}
        # Storages are keyed by address, so every storage seen is held until the count is done:
        # a segment input that autograd does not save (e.g. `x * 3` saves nothing) would
        # otherwise be freed after its segment and its address reused by a later saved tensor,
        # which then counted as the same storage (the count depended on the allocator's state,
        # i.e. on what the process had run before).
        self.held: dict[int, torch.UntypedStorage] = {}
        self.root = _Segment()
        self.stack = [self.root]

    def _storage(self, tensor: torch.Tensor) -> int | None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return None
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.excluded or storage.nbytes() == 0:
            return None
        self.sizes[key] = storage.nbytes()
        self.held[key] = storage
        return key

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = self._storage(tensor)
        if key is not None:
            self.stack[-1].saved.add(key)
        return tensor

    def segment(self, fn, *args):
        parent = self.stack[-1]
        child = _Segment(inputs={k for k in map(self._storage, args) if k is not None})
        parent.children.append(child)
        self.stack.append(child)
        try:
            return fn(*args)
        finally:
            self.stack.pop()

    def _bytes(self, keys: set[int]) -> int:
        return sum(self.sizes[k] for k in keys)

    def _everything(self, segment: _Segment) -> set[int]:
        keys = set(segment.saved)
        for child in segment.children:
            keys |= self._everything(child)
        return keys

    def _recompute_peak(self, segment: _Segment, kept: set[int]) -> int:
        # Rebuilding a segment holds what it saves itself plus its inner segments' inputs; an
        # inner segment is rebuilt in turn while those are held.
        own = (segment.saved | {k for c in segment.children for k in c.inputs}) - kept
        inner = max((self._recompute_peak(c, kept | own) for c in segment.children), default=0)
        return self._bytes(own) + inner

    def count(self) -> SavedTensorCount:
        kept = set(self.root.saved) | {k for c in self.root.children for k in c.inputs}
        recompute = max((self._recompute_peak(c, kept) for c in self.root.children), default=0)
        return SavedTensorCount(self._bytes(self._everything(self.root)), self._bytes(kept), recompute)


def count_saved_tensors(
    model: nn.Module, image: torch.Tensor, audio: torch.Tensor, target: torch.Tensor, loss_fn: nn.Module,
    precision: str = "fp32",
) -> SavedTensorCount:
    """One training forward and loss of `model` on the batch, counting what autograd saves
    (see `SavedTensorCount`); checkpointing as set on the model. Nothing is run backward.

    The model's buffers (BatchNorm statistics) and the global RNG are restored afterwards, so a
    trainer may measure its own model before the first step without changing the run."""
    excluded = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    counter = _SavedTensorCounter(excluded)
    buffers = [b.detach().clone() for b in model.buffers()]
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[image.device] if image.device.type == "cuda" else []):
            with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t), checkpoint_probe(counter.segment):
                with autocast(image.device.type, precision):
                    logits = model(image, audio)
                loss, _ = loss_fn(logits.float(), target)
                del loss, logits
    finally:
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers, strict=True):
                buffer.copy_(saved)
        model.train(was_training)
    return counter.count()


@dataclass(frozen=True)
class StepPeak:
    """Measured live bytes of one training step's forward (with the loss) and backward pass,
    above what was allocated before it (weights, gradients, the batch).

    `forward_peak_bytes`: the most during the forward pass and the loss (the frozen audio
    forward included). `forward_end_bytes`: what is still allocated when the backward pass
    starts (the saved tensors, the logits and the loss). `backward_peak_bytes`: the most during
    the backward pass (saved tensors not yet freed, gradient buffers, rebuilt segments)."""

    forward_peak_bytes: int
    forward_end_bytes: int
    backward_peak_bytes: int

    @property
    def peak_bytes(self) -> int:
        return max(self.forward_peak_bytes, self.backward_peak_bytes)


class _CpuAllocations:
    """The CPU allocator's live bytes while a phase runs, from the profiler's allocation events
    (each records a signed size: + allocated, - freed). `peak`/`end`: relative to the start."""

    def __init__(self) -> None:
        self.peak = self.end = 0

    def __enter__(self) -> _CpuAllocations:
        # On a machine without a GPU, kineto logs a harmless "gpuGetDeviceCount failed" line on
        # its first use; a user who set the level keeps theirs.
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profile.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        from torch._C._profiler import _EventType

        self._profile.__exit__(*exc)
        if exc[0] is not None:
            return
        events: list[tuple[int, int]] = []
        pending = list(self._profile.profiler.kineto_results.experimental_event_tree())
        while pending:
            node = pending.pop()
            if node.tag == _EventType.Allocation:
                events.append((node.start_time_ns, node.extra_fields.alloc_size))
            pending.extend(node.children)
        live = 0
        for _, size in sorted(events):
            live += size
            self.peak = max(self.peak, live)
        self.end = live


class _CudaAllocations:
    """The CUDA caching allocator's allocated bytes while a phase runs (`max_memory_allocated`),
    relative to the start; the device is synchronised at both ends."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak, self.end = device, 0, 0

    def __enter__(self) -> _CudaAllocations:
        torch.cuda.synchronize(self.device)
        self.start = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        self.end = torch.cuda.memory_allocated(self.device) - self.start


def _allocations(device: torch.device) -> _CpuAllocations | _CudaAllocations:
    return _CudaAllocations(device) if device.type == "cuda" else _CpuAllocations()


def measure_step_peak(
    model: nn.Module, image: torch.Tensor, audio: torch.Tensor, target: torch.Tensor, loss_fn: nn.Module,
    precision: str = "fp32",
) -> StepPeak:
    """One training forward, loss and backward pass of `model` on the batch (checkpointing as
    set on the model), tracking the allocator's live bytes on the batch's device (see
    `StepPeak`). Gradients of the trainable parameters are allocated (zeros) before it starts:
    the plan counts them as held, so only the step's own allocations are measured.

    The model's gradients, buffers (BatchNorm statistics), mode and the global RNG are restored
    afterwards, as `count_saved_tensors` does: a trainer may measure its own model."""
    device = image.device
    gradients = [(p, p.grad) for p in model.parameters()]
    buffers = [b.detach().clone() for b in model.buffers()]
    was_training = model.training
    model.train()
    try:
        for parameter, _ in gradients:
            if parameter.requires_grad:
                parameter.grad = torch.zeros_like(parameter)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            with _allocations(device) as forward:
                with autocast(device.type, precision):
                    logits = model(image, audio)
                loss, _ = loss_fn(logits.float(), target)
            with _allocations(device) as backward:
                loss.backward()
                del loss, logits
    finally:
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers, strict=True):
                buffer.copy_(saved)
        for parameter, gradient in gradients:
            parameter.grad = gradient
        model.train(was_training)
    # The backward pass starts from what the forward pass left allocated.
    return StepPeak(forward.peak, forward.end, forward.end + backward.peak)


def _measurement_batch(config: Config, micro_batch: int, device: torch.device, generator: torch.Generator):
    model_cfg, size = config.model, config.data.image_size
    frames = frames_for(model_cfg.frontend, round(config.data.clip_seconds * model_cfg.frontend.sample_rate))
    image = torch.randn(micro_batch, 3, size, size, generator=generator).to(device)
    logmel = (torch.randn(micro_batch, frames, model_cfg.frontend.mel_bins, generator=generator) * 10 - 40).to(device)
    classes = max(2, model_cfg.num_classes)
    target = torch.randint(0, classes, (micro_batch, size, size), generator=generator).to(device)
    if model_cfg.num_classes == 1:
        target = (target > 0).long()
    return image, logmel, target


@dataclass(frozen=True)
class ActivationProfile:
    """Measured activation bytes of a config as lines in the micro-batch:
    `kept(b) = kept_fixed + kept_per_sample * b`, likewise `recompute(b)`, and the transient
    bytes above them, `transient(b) = max(0, forward line, backward line)` (see
    `transient_bytes`).

    `measured` holds the counts it was built from ({micro_batch: SavedTensorCount}), `peaks` the
    measured steps ({micro_batch: StepPeak}; empty when the transient term was not measured)."""

    precision: str
    checkpointing: tuple[str, ...]
    kept_fixed: float
    kept_per_sample: float
    recompute_fixed: float
    recompute_per_sample: float
    measured: dict[int, SavedTensorCount]
    transient_forward: tuple[float, float] = (0.0, 0.0)  # (fixed, per sample)
    transient_backward: tuple[float, float] = (0.0, 0.0)
    peaks: dict[int, StepPeak] = field(default_factory=dict)

    def kept_bytes(self, micro_batch: int) -> int:
        return max(0, round(self.kept_fixed + self.kept_per_sample * micro_batch))

    def recompute_bytes(self, micro_batch: int) -> int:
        return max(0, round(self.recompute_fixed + self.recompute_per_sample * micro_batch))

    def transient_bytes(self, micro_batch: int) -> int:
        """Bytes above the kept and rebuilt activations at the step's peak: the larger of the
        forward pass's (loss temporaries, the frozen audio forward) and the backward pass's
        (gradient buffers, kernel workspaces)."""
        lines = (self.transient_forward, self.transient_backward)
        return max(0, *(round(fixed + per_sample * micro_batch) for fixed, per_sample in lines))


_PROFILES: dict[str, ActivationProfile] = {}
_SAVED: dict[str, dict[int, SavedTensorCount]] = {}  # saved-tensor counts, by the profile's key
_PEAKS: dict[str, dict[int, StepPeak]] = {}  # measured steps, likewise


def _line(a: float, b: float, n_a: int, n_b: int) -> tuple[float, float]:
    slope = (b - a) / (n_b - n_a)
    return a - slope * n_a, slope


def _rising_line(a: float, b: float, n_a: int, n_b: int) -> tuple[float, float]:
    """The line through two measurements, flat at the larger one when it would fall: a transient
    that shrinks with the batch is a kernel choice at small sizes (e.g. the CPU's convolution
    backward picks another algorithm), not a trend to extrapolate below zero."""
    fixed, slope = _line(a, b, n_a, n_b)
    return (fixed, slope) if slope >= 0 else (max(a, b), 0.0)


def profile_activations(
    config: Config,
    precision: str = "fp32",
    checkpointing: Iterable[str] = (),
    *,
    model: nn.Module | None = None,
    batches: tuple[int, int] = (1, 2),
    bank_entries: int = 10,
    transient: bool = True,
) -> ActivationProfile:
    """Measure `config`'s activation bytes at two micro-batches (`count_saved_tensors`) and fit
    the lines; with `transient` (default) also run a training step at each
    (`measure_step_peak`) and fit the transient bytes above the saved tensors. Cached per (model
    config, image size, clip length, precision, checkpointing, device type, memory-bank size).

    `model`: measure this model (e.g. the trainer's, on its device; its checkpointing setting
    is restored afterwards); default: build one from `config.model` on the CPU. Raises
    `DDESegError` for an unknown precision or checkpoint part."""
    from ddeseg.losses import SegmentationLoss
    from ddeseg.models import build_model

    if precision not in PRECISIONS:
        raise DDESegError(f"train.precision must be one of {PRECISIONS}, got {precision!r}")
    parts = tuple(sorted(set(checkpointing)))
    # What the count depends on besides the config: the device type (kernels save different
    # tensors, e.g. fused attention) and the memory bank's size (the aligners attend over it).
    device_type = "cpu" if model is None else next(model.parameters()).device.type
    bank = None if model is None else getattr(model, "memory_bank", None)
    bank_classes = max(config.model.num_classes, config.model.derived_semantics)
    bank_shape = tuple(bank.shape) if bank is not None else (bank_classes, bank_entries, config.model.audio_embed_dim)

    def key(parts: tuple[str, ...], transient: bool = transient) -> str:
        return repr((to_dict(config.model), config.data.image_size, config.data.clip_seconds, precision, parts, batches,
                     device_type, bank_shape, transient))

    if key(parts) in _PROFILES:
        return _PROFILES[key(parts)]
    if model is None:
        model = build_model(config.model)
    if getattr(model, "memory_bank", None) is None:
        model.set_memory_bank(torch.randn(*bank_shape, generator=torch.Generator().manual_seed(0)))
    previous = model.activation_checkpointing()
    model.set_activation_checkpointing(parts)
    device = next(model.parameters()).device
    loss_fn = SegmentationLoss(config.loss, config.model.num_classes).to(device)
    generator = torch.Generator().manual_seed(0)
    try:
        if key(parts, False) not in _SAVED:
            measured = {
                b: count_saved_tensors(model, *_measurement_batch(config, b, device, generator), loss_fn, precision)
                for b in batches
            }
            _SAVED[key(parts, False)] = measured
            # The same forward also counted everything (= no checkpointing): keep that count too.
            _SAVED.setdefault(key((), False), {n: SavedTensorCount(c.all_bytes, c.all_bytes, 0) for n, c in measured.items()})
        if transient and key(parts, False) not in _PEAKS:
            _PEAKS[key(parts, False)] = {
                b: measure_step_peak(model, *_measurement_batch(config, b, device, generator), loss_fn, precision)
                for b in batches
            }
    finally:
        model.set_activation_checkpointing(previous)
    measured, peaks = _SAVED[key(parts, False)], _PEAKS.get(key(parts, False), {}) if transient else {}
    (n_a, a), (n_b, b) = sorted(measured.items())
    lines: dict[str, tuple[float, float]] = {}
    if peaks:
        # Above what the plan already holds at each measured micro-batch: the kept and the rebuilt.
        held = {n: c.kept_bytes + c.recompute_bytes for n, c in measured.items()}
        for phase, of in (("forward", lambda p: p.forward_peak_bytes), ("backward", lambda p: p.backward_peak_bytes)):
            lines[phase] = _rising_line(of(peaks[n_a]) - held[n_a], of(peaks[n_b]) - held[n_b], n_a, n_b)
    _PROFILES[key(parts)] = ActivationProfile(
        precision, parts, *_line(a.kept_bytes, b.kept_bytes, n_a, n_b),
        *_line(a.recompute_bytes, b.recompute_bytes, n_a, n_b), measured,
        transient_forward=lines.get("forward", (0.0, 0.0)), transient_backward=lines.get("backward", (0.0, 0.0)),
        peaks=peaks,
    )
    return _PROFILES[key(parts)]


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPlan:
    """Planned bytes of one training step per rank (see the module docstring)."""

    micro_batch: int
    precision: str
    checkpointing: tuple[str, ...]
    world_size: int
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    ddp_bucket_bytes: int
    activation_bytes: int  # kept for the backward pass
    recompute_bytes: int  # the largest segment rebuilt at once (0 without checkpointing)
    activation_bytes_per_sample: float
    transient_bytes: int = 0  # above the kept and rebuilt at the step's peak (measured)

    @property
    def peak_bytes(self) -> int:
        return (self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes + self.ddp_bucket_bytes
                + self.activation_bytes + self.recompute_bytes + self.transient_bytes)

    @property
    def step_bytes(self) -> int:
        """What one forward and backward pass adds to the held weights, gradients and optimizer
        state: kept + rebuilt + transient activations."""
        return self.activation_bytes + self.recompute_bytes + self.transient_bytes

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) rows of the start-up table."""
        parts = ", ".join(self.checkpointing) or "off"
        return [
            ("memory plan", f"micro-batch {self.micro_batch}, {self.precision}, checkpointing {parts}"),
            ("parameters", format_bytes(self.parameter_bytes)),
            ("gradients", format_bytes(self.gradient_bytes)),
            ("optimizer state (AdamW)", format_bytes(self.optimizer_bytes)),
            *([("DDP gradient buckets", format_bytes(self.ddp_bucket_bytes))] if self.ddp_bucket_bytes else []),
            ("activations kept", f"{format_bytes(self.activation_bytes)} "
                                 f"({format_bytes(self.activation_bytes_per_sample)} per sample, measured)"),
            *([("recompute (largest segment)", format_bytes(self.recompute_bytes))] if self.checkpointing else []),
            ("transient (audio, loss, backward)", f"{format_bytes(self.transient_bytes)} (measured)"),
            ("planned peak", format_bytes(self.peak_bytes)),
        ]

    def text(self) -> str:
        """The plan as plain text, with the BatchNorm note."""
        width = max(len(label) for label, _ in self.rows())
        lines = [f"{label:<{width}}  {value}" for label, value in self.rows()]
        return "\n".join(lines + [f"note: {BATCHNORM_NOTE}"])


def plan(
    config: Config,
    micro_batch: int,
    precision: str = "fp32",
    checkpointing: Iterable[str] = (),
    *,
    world_size: int = 1,
    profile: ActivationProfile | None = None,
    model: nn.Module | None = None,
) -> MemoryPlan:
    """The memory plan of one training step of `config` at `micro_batch` per rank.

    Parameter, gradient and optimizer bytes are counted from a model built from `config.model`
    (or `model`): float32 master weights and AdamW's two moments per trainable parameter, also
    under bf16 autocast. Activations and the transient bytes come from `profile_activations`
    (measured; pass `profile` to reuse one)."""
    if micro_batch < 1:
        raise DDESegError(f"micro-batch must be >= 1, got {micro_batch}")
    if profile is None:
        profile = profile_activations(config, precision, checkpointing, model=model)
    total, trainable = _parameter_counts(config, model)
    trainable_bytes = 4 * trainable
    return MemoryPlan(
        micro_batch=micro_batch,
        precision=profile.precision,
        checkpointing=profile.checkpointing,
        world_size=world_size,
        parameter_bytes=4 * total,
        gradient_bytes=trainable_bytes,
        optimizer_bytes=2 * trainable_bytes,
        ddp_bucket_bytes=trainable_bytes if world_size > 1 else 0,
        activation_bytes=profile.kept_bytes(micro_batch),
        recompute_bytes=profile.recompute_bytes(micro_batch),
        activation_bytes_per_sample=profile.kept_per_sample,
        transient_bytes=profile.transient_bytes(micro_batch),
    )


_COUNTS: dict[str, tuple[int, int]] = {}


def _parameter_counts(config: Config, model: nn.Module | None) -> tuple[int, int]:
    if model is None:
        key = repr(to_dict(config.model))
        if key not in _COUNTS:
            from ddeseg.models import build_model

            with torch.device("meta"):  # shapes only: nothing allocated
                built = build_model(config.model)
            _COUNTS[key] = _count(built)
        return _COUNTS[key]
    return _count(model)


def _count(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


def choose_micro_batch(
    config: Config,
    budget_bytes: int,
    batch_size: int,
    world_size: int = 1,
    *,
    precision: str = "fp32",
    checkpointing: Iterable[str] = (),
    headroom: float = 0.1,
    model: nn.Module | None = None,
) -> tuple[int, int]:
    """The largest micro-batch that fits and the accumulation that keeps the batch:
    `micro_batch * accumulation * world_size == batch_size` (the optimizer step's batch over
    all ranks). Candidates are the divisors of the per-rank batch; a candidate fits when its
    planned peak is at most `(1 - headroom) * budget_bytes`.

    Raises `DDESegError` when the batch does not divide over the ranks, or when even micro-batch
    1 does not fit (with the planned peak and what to try)."""
    if world_size < 1 or batch_size < 1:
        raise DDESegError(f"batch size {batch_size} and ranks {world_size} must be >= 1")
    if batch_size % world_size:
        raise DDESegError(f"the batch of {batch_size} does not divide over {world_size} ranks")
    per_rank = batch_size // world_size
    usable = (1.0 - headroom) * budget_bytes
    profile = profile_activations(config, precision, checkpointing, model=model)
    for micro in sorted((d for d in range(1, per_rank + 1) if per_rank % d == 0), reverse=True):
        planned = plan(config, micro, precision, checkpointing, world_size=world_size, profile=profile, model=model)
        if planned.peak_bytes <= usable:
            return micro, per_rank // micro
    smallest = plan(config, 1, precision, checkpointing, world_size=world_size, profile=profile, model=model)
    hints = [h for h, off in (("train.precision=bf16", precision == "fp32"),
                              ("train.activation_checkpointing=[visual_blocks,aligners,head]", not profile.checkpointing))
             if off]
    raise DDESegError(
        f"train.gpu_memory: even micro-batch 1 does not fit: planned peak {format_bytes(smallest.peak_bytes)} > "
        f"{format_bytes(usable)} ({format_bytes(budget_bytes)} less {headroom:.0%} headroom)"
        + (f"; try {' and '.join(hints)}" if hints else "; use a larger GPU or a smaller model/image size")
    )


def render_plans(plans: list[MemoryPlan], title: str = "memory plan") -> Any:
    """A rich `Table` of one or more plans side by side (columns), with the BatchNorm note."""
    from rich.table import Table

    table = Table(title=title, caption=f"note: {BATCHNORM_NOTE}")
    table.add_column("")
    for item in plans:
        table.add_column(f"{item.precision}, ckpt {'on' if item.checkpointing else 'off'}, b={item.micro_batch}",
                         justify="right")
    labels = [label for label, _ in max((p.rows() for p in plans), key=len)][1:]
    for label in labels:
        table.add_row(label, *[dict(p.rows()).get(label, "-") for p in plans])
    return table


# --------------------------------------------------------------------------------------------
# Training-setup switches
# --------------------------------------------------------------------------------------------


def convert_sync_batchnorm(model: nn.Module, enabled: bool) -> nn.Module:
    """Every BatchNorm -> `SyncBatchNorm` when `enabled` (as the official code under DDP: the
    statistics of a training batch are taken over all ranks); the model itself otherwise.

    Call it before wrapping in DDP, for multi-rank GPU runs (`train.sync_batchnorm`, on by
    default; the trainer passes `enabled = sync_batchnorm and world_size > 1 and cuda`).
    PyTorch's SyncBatchNorm runs on CUDA (and XPU) only: on the CPU (gloo) each rank keeps its
    own statistics. Converted modules keep their weights, statistics, eval/train mode and
    `requires_grad` (the frozen audio backbone's `bn0` stays frozen)."""
    if not enabled:
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def maybe_compile(model: nn.Module, enabled: bool, **options: Any) -> nn.Module:
    """`torch.compile(model, **options)` when `enabled` (`train.compile`), else the model.

    Caveats: the first steps are slow (compilation, minutes for the paper model) and again
    whenever a shape changes (a last smaller batch, another image size: use `drop_last` loaders);
    the default inductor backend needs a C++ compiler on the CPU and Triton on the GPU; the
    compiled module shares parameters with `model` (save `model.state_dict()`, not the wrapper's,
    whose keys carry `_orig_mod.`). Random draws (Gumbel noise, dropout) use other kernels under
    inductor, so a compiled run matches an eager one in distribution, not draw for draw."""
    if not enabled:
        return model
    return torch.compile(model, **options)


__all__ = [
    "BATCHNORM_NOTE", "ActivationProfile", "MemoryPlan", "SavedTensorCount", "choose_micro_batch",
    "StepPeak", "convert_sync_batchnorm", "count_saved_tensors", "maybe_compile",
    "measure_step_peak", "plan", "profile_activations", "render_plans",
]
