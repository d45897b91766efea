"""Activation checkpointing changes memory, not numbers.

Same seed, same batch: the gradients with every part checkpointed equal those of the plain
forward, in training mode with all the random parts live (Gumbel clustering noise, drop-path,
dropout, the head's Dropout2d, SpecAugment in the official audio mode). The recompute replays the
random draws (`preserve_rng_state`); a different seed gives different gradients, so the equality
is not vacuous. The head's train-mode BatchNorm stays outside the segments: its running
statistics are updated once, as without checkpointing.
"""

from __future__ import annotations

import functools

import pytest
import torch
from test_model_behaviour import single_threaded_torch  # noqa: F401 (autouse fixture)

from ddeseg.config import load_config
from ddeseg.errors import DDESegError
from ddeseg.losses import SegmentationLoss
from ddeseg.models import build_model
from ddeseg.models.ddeseg import CHECKPOINT_PARTS

STOCHASTIC = [  # every random part of the model live, with rates that make its draws matter
    "model.visual.drop_path_rate=0.5",
    "model.visual.drop_rate=0.1",
    "model.visual.attn_drop_rate=0.1",
    "model.head_dropout=0.3",
    "model.audio.mode=official",
]


@functools.cache
def _model(overrides: tuple[str, ...]):
    config = load_config("tiny", list(overrides))
    torch.manual_seed(0)
    model = build_model(config.model)
    model.set_memory_bank(torch.randn(3, 4, 768, generator=torch.Generator().manual_seed(2)))
    return config, model, {k: v.clone() for k, v in model.state_dict().items()}


def _step(overrides: list[str], parts, seed: int):
    """One training forward + backward of the tiny model at `seed`: (loss, grads, BN state)."""
    config, model, initial = _model(tuple(overrides))
    model.load_state_dict(initial)  # BatchNorm statistics as built
    model.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(2, 3, 64, 64, generator=generator)
    logmel = torch.randn(2, 87, 64, generator=generator) * 10 - 40
    target = torch.randint(0, 3, (2, 64, 64), generator=generator)
    model.set_activation_checkpointing(parts)
    model.train()
    torch.manual_seed(seed)
    loss, _ = SegmentationLoss(config.loss, 3)(model(image, logmel), target)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    bn = model.decode_head.linear_fuse.bn
    return loss.detach(), grads, (bn.running_mean.clone(), bn.running_var.clone())


def _assert_same(a, b) -> None:
    (loss_a, grads_a, bn_a), (loss_b, grads_b, bn_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        scale = grads_a[name].abs().max().item()
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6 * scale + 1e-12, msg=name)
    torch.testing.assert_close(bn_a, bn_b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("overrides", [[], STOCHASTIC], ids=["tiny", "drop-path-0.5"])
def test_checkpointed_gradients_equal_the_plain_ones(overrides):
    plain = _step(overrides, (), seed=7)
    _assert_same(plain, _step(overrides, CHECKPOINT_PARTS, seed=7))
    if overrides:  # the usual GPU choice (blocks, aligners, head; no whole stages)
        _assert_same(plain, _step(overrides, ("visual_blocks", "aligners", "head"), seed=7))
    # the draws matter: another seed moves the gradients (so equality above is a real check)
    other = _step(overrides, (), seed=8)
    differs = [n for n in plain[1] if not torch.allclose(plain[1][n], other[1][n], rtol=1e-3, atol=0)]
    assert len(differs) > 10


def test_parts_are_checked_and_reported():
    model = build_model(load_config("tiny").model)
    assert model.activation_checkpointing() == ()
    model.set_activation_checkpointing(["head", "visual_blocks"])
    assert model.activation_checkpointing() == ("visual_blocks", "head")
    with pytest.raises(DDESegError, match="unknown part"):
        model.set_activation_checkpointing(["visual_block"])
