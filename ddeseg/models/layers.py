"""Small building blocks shared by the DDESeg modules (timm-style, no config objects).

timm is not a dependency of ddeseg: its PVT-v2 block names the depth-wise conv `mlp.dwconv`
where the official MiT (and every MiT/SegFormer checkpoint) says `mlp.dwconv.dwconv`, so the few
helpers we need are written here with the official parameter names.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# Set by `checkpoint_probe` while `ddeseg.training.memory_plan` counts activations: checkpointed segments then
# run plainly and report their inputs and what they save (see `run_checkpointed`).
_PROBE: Callable[..., Any] | None = None


def run_checkpointed(fn: Callable[..., Any], *args: Any, enabled: bool) -> Any:
    """`fn(*args)`, through activation checkpointing when `enabled`.

    Non-reentrant checkpointing (`use_reentrant=False`) with `preserve_rng_state=True`: the
    recompute in the backward pass replays the same Gumbel noise, drop-path and dropout draws, so
    the gradients equal those of the plain forward. Only the segment's inputs stay in memory; its
    internals are rebuilt during the backward pass. Never put a train-mode BatchNorm inside a
    segment (the recompute would update its running statistics twice).
    """
    if not enabled:
        return fn(*args)
    if _PROBE is not None:
        return _PROBE(fn, *args)
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)


@contextlib.contextmanager
def checkpoint_probe(probe: Callable[..., Any]) -> Iterator[None]:
    """While active, every enabled `run_checkpointed(fn, *args)` calls `probe(fn, *args)` instead
    (the memory plan uses it to account each segment's inputs and internals in one forward)."""
    global _PROBE
    previous, _PROBE = _PROBE, probe
    try:
        yield
    finally:
        _PROBE = previous


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch, rescale the survivors."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    keep = x.new_empty(shape).bernoulli_(keep_prob)
    return x * keep / keep_prob


class DropPath(nn.Module):
    """Stochastic depth per sample; identity in eval mode or with `drop_prob == 0`."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Mlp(nn.Module):
    """`fc1 -> GELU -> dropout -> fc2 -> dropout` (the transformer feed-forward)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def init_transformer_weights(module: nn.Module, convs: bool = True) -> None:
    """The initialisation used throughout the official code (SegFormer/Swin convention).

    Linear: truncated normal std 0.02, zero bias. LayerNorm: ones/zeros. Conv2d (when `convs`;
    HTS-AT leaves its convs at PyTorch's default): normal with std sqrt(2 / fan_out), fan_out per
    group, zero bias. Apply with `model.apply(init_transformer_weights)`.
    """
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif convs and isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
