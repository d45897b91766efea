"""bf16 autocast on the trainable parts, testable on the CPU; SyncBatchNorm and compile switches.

The tolerance: bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2%); through the tiny
model's ~20 matmul/conv layers and the loss, the measured loss difference is below 1%, and we
allow 2%. Gradients: the direction of the whole gradient vector within cosine 0.98.
"""

from __future__ import annotations

import functools

import pytest
import torch
from test_model_behaviour import single_threaded_torch  # noqa: F401 (autouse fixture)
from torch import nn

from ddeseg.config import load_config
from ddeseg.errors import DDESegError
from ddeseg.losses import SegmentationLoss
from ddeseg.models import build_model
from ddeseg.training import memory_plan as memory
from ddeseg.training.precision import autocast

LOSS_RTOL = 2e-2
GRAD_COSINE = 0.98


def deterministic_tiny():
    """The tiny model with every random part off (noise-free clustering, no dropout, no
    drop-path): two runs see the same function. Returns (config, model)."""
    config = load_config("tiny", ["model.head_dropout=0.0", "model.visual.drop_path_rate=0.0"])
    torch.manual_seed(0)
    model = build_model(config.model)
    model.set_memory_bank(torch.randn(3, 4, 768, generator=torch.Generator().manual_seed(1)))
    model.set_clustering_noise(False)
    return config, model


@functools.cache
def _tiny():
    config, model = deterministic_tiny()
    generator = torch.Generator().manual_seed(2)
    batch = (torch.randn(2, 3, 64, 64, generator=generator), torch.randn(2, 87, 64, generator=generator) * 10 - 40,
             torch.randint(0, 3, (2, 64, 64), generator=generator))
    return config, model, batch


def _loss_and_grad(precision: str, model: nn.Module | None = None):
    config, tiny_model, (image, logmel, target) = _tiny()
    model = model or tiny_model
    model.train()
    model.zero_grad(set_to_none=True)
    with autocast("cpu", precision):
        intermediates = model.forward_intermediates(image, logmel)
    loss, _ = SegmentationLoss(config.loss, 3)(intermediates["logits"].float(), target)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in tiny_model.parameters() if p.grad is not None])
    return loss.detach(), grad, intermediates


def test_bf16_loss_within_tolerance_of_float32():
    loss32, grad32, out32 = _loss_and_grad("fp32")
    loss16, grad16, out16 = _loss_and_grad("bf16")
    cosine = torch.nn.functional.cosine_similarity(grad32.double(), grad16.double(), dim=0)
    print(f"tiny config: loss fp32 {loss32:.6f}, bf16 {loss16:.6f}, relative {abs(loss16 - loss32) / loss32:.2e}; "
          f"gradient cosine {cosine:.4f}")
    torch.testing.assert_close(loss16, loss32, rtol=LOSS_RTOL, atol=0)
    assert cosine > GRAD_COSINE
    assert loss16 != loss32  # autocast did act
    # the trainable parts ran in bf16, the frozen audio backbone in float32 (bit-identical latent)
    assert out16["logits"].dtype == torch.bfloat16 and out16["stage_features"][0].dtype == torch.bfloat16
    assert out16["audio_latent"].dtype == torch.float32
    torch.testing.assert_close(out16["audio_latent"], out32["audio_latent"], rtol=0, atol=0)
    assert grad16.dtype == torch.float32  # float32 master weights and gradients


def test_autocast_precisions():
    assert isinstance(autocast("cpu", "bf16"), torch.autocast)
    with pytest.raises(DDESegError, match="fp16 needs a CUDA device"):
        autocast("cpu", "fp16")
    with pytest.raises(DDESegError, match="train.precision must be one of"):
        autocast("cuda", "bf8")


def test_sync_batchnorm_conversion_keeps_weights_and_numbers():
    config, model, (image, logmel, _) = _tiny()
    model.eval()
    with torch.no_grad():
        expected = model(image, logmel)
    assert memory.convert_sync_batchnorm(model, False) is model
    import copy

    converted = memory.convert_sync_batchnorm(copy.deepcopy(model), True)
    kinds = {type(m).__name__ for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert kinds == {"SyncBatchNorm"}
    assert not converted.audio_model.bn0.weight.requires_grad  # frozen stays frozen
    converted.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(image, logmel), expected, rtol=0, atol=0)


def test_compile_matches_eager():
    """`train.compile` on the tiny model in training mode: the whole forward is captured as one
    graph (`fullgraph=True`: no graph break) and gives the eager loss and gradients. The backend
    is Dynamo's `eager` (seconds): inductor's C++ code generation takes minutes on 2 CPU cores and
    is not exercised here (run `maybe_compile(model, True)` once on the target machine)."""
    config, model, (image, logmel, target) = _tiny()
    assert memory.maybe_compile(model, False) is model
    compiled = memory.maybe_compile(model, True, backend="eager", fullgraph=True)
    loss_fn = SegmentationLoss(config.loss, 3)
    results = []
    for module in (model, compiled):
        model.train()
        model.zero_grad(set_to_none=True)
        loss, _ = loss_fn(module(image, logmel), target)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=0)
    for eager, compiled_grad in zip(eager_grads, compiled_grads, strict=True):
        torch.testing.assert_close(compiled_grad, eager, rtol=1e-4, atol=1e-6 * float(eager.abs().max()) + 1e-12)
