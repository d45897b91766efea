"""The memory plan (ddeseg/training/memory_plan.py): saved-tensor counts, the plan, the micro-batch choice,
and the BatchNorm caveat of gradient accumulation, measured."""

from __future__ import annotations

import pytest
import torch
from test_bf16 import deterministic_tiny
from test_model_behaviour import single_threaded_torch  # noqa: F401 (autouse fixture)
from torch import nn

from ddeseg import units
from ddeseg.config import load_config
from ddeseg.errors import DDESegError
from ddeseg.losses import SegmentationLoss
from ddeseg.models import build_model
from ddeseg.models.layers import run_checkpointed
from ddeseg.training import memory_plan as memory

GPU_PARTS = ("visual_blocks", "aligners", "head")


def test_parse_bytes():
    assert units.parse_bytes("24GiB") == 24 * 2**30
    assert units.parse_bytes("40 GB") == 40 * 10**9
    assert units.parse_bytes("512mib") == 512 * 2**20
    assert units.parse_bytes("1.5GiB") == 3 * 2**29
    assert units.parse_bytes(4096) == 4096
    for bad in ("24 parsecs", "GiB", "-1GiB", "0GB", ""):
        with pytest.raises(DDESegError, match="memory size"):
            units.parse_bytes(bad)


class _Toy(nn.Module):
    """x [B, 4] -> fc1 -> ReLU -> mid (a checkpointable segment) -> fc2 -> [B, 2]."""

    def __init__(self, checkpointed: bool):
        super().__init__()
        self.fc1, self.mid, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.checkpointed = checkpointed

    def _segment(self, x):
        return self.mid(torch.relu(self.fc1(x)))

    def forward(self, image, audio):
        return self.fc2(run_checkpointed(self._segment, image, enabled=self.checkpointed))


class _SumLoss(nn.Module):
    def forward(self, logits, target):
        return logits.sum(), {}


@pytest.mark.parametrize("batch", [1, 3])
def test_saved_tensor_count_by_hand(batch):
    # Saved for backward (float32, 4 bytes): fc1 its input x (4 per sample), ReLU its output (8),
    # mid the same ReLU output (one storage, counted once), fc2 mid's output (8); weights excluded.
    x = torch.randn(batch, 4)
    plain = memory.count_saved_tensors(_Toy(False), x, x, None, _SumLoss())
    assert plain == memory.SavedTensorCount(4 * batch * (4 + 8 + 8), 4 * batch * (4 + 8 + 8), 0)
    # Checkpointing the segment keeps its input x and fc2's input; the ReLU output is rebuilt.
    checkpointed = memory.count_saved_tensors(_Toy(True), x, x, None, _SumLoss())
    assert checkpointed == memory.SavedTensorCount(4 * batch * 20, 4 * batch * (4 + 8), 4 * batch * 8)
    # A real checkpointed forward (no probe) saves exactly what the probe calls kept: the
    # segment's input (torch saves it for the recompute) and fc2's input.
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        out = _Toy(True)(x, x).sum()
    out.backward()
    assert [tuple(t.shape) for t in seen if t.ndim == 2 and t.shape[0] == batch] == [(batch, 4), (batch, 8)]


class _FreedSegmentInput(nn.Module):
    """A segment whose input autograd does not save (`z * 3` saves nothing): the input is freed
    after the segment, and a tensor of the same size made next often gets its address."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.ones(4096)), nn.Parameter(torch.ones(4096))

    def forward(self, image, audio):
        inside = image * self.w1  # saves image (w1 is a parameter: excluded)
        out = run_checkpointed(lambda z: z * 3, inside, enabled=True)
        del inside
        after = image * self.w2
        return out + torch.sin(after)  # sin saves `after`


def test_a_freed_segment_input_is_not_merged_with_a_later_tensor():
    # The flaky [checkpointed] plan test: storages were keyed by address without being held, so
    # a reused address merged two tensors and the count depended on the allocator's history.
    x = torch.randn(2, 4096)
    one = 4 * x.numel()  # float32 bytes of each [2, 4096] tensor
    for _ in range(20):  # the old code lost `inside` in most of these
        count = memory.count_saved_tensors(_FreedSegmentInput(), x, x, None, _SumLoss())
        # kept: image, the segment's input, `after`; without checkpointing: image and `after`
        assert count == memory.SavedTensorCount(2 * one, 3 * one, 0)


class _ExpOfScaled(nn.Module):
    """exp(image * w), w [n] a parameter: a step whose every allocation can be counted by hand."""

    def __init__(self, n: int):
        super().__init__()
        self.w = nn.Parameter(torch.ones(n))

    def forward(self, image, audio):
        return torch.exp(image * self.w)


@pytest.mark.parametrize("batch", [1, 3])
def test_step_peak_by_hand(batch):
    # S = one float32 [batch, n] tensor. Forward: image * w (S) and its exp (S) are both live
    # while exp runs; then the product is freed (mul saves its inputs, exp its output) and the
    # loss adds 4 bytes: peak 2S, end S + 4. Backward, on top of that: the loss's gradient
    # (4 bytes), exp's input gradient (S), w's unreduced gradient grad * image (S) and its sum
    # over the batch (4n bytes); w.grad exists beforehand (the plan counts gradients as held).
    n = 4096
    size = 4 * batch * n
    x = torch.randn(batch, n)
    model = _ExpOfScaled(n)
    peak = memory.measure_step_peak(model, x, x, None, _SumLoss())
    assert peak == memory.StepPeak(2 * size, size + 4, (size + 4) + 4 + 2 * size + 4 * n)
    assert peak.peak_bytes == max(2 * size, 3 * size + 4 * n + 8)
    assert model.w.grad is None  # the gradients it allocated for the measurement are gone again


def test_transient_line_by_hand():
    assert memory._rising_line(10.0, 30.0, 1, 2) == (-10.0, 20.0)
    # falling: a kernel choice at the smaller size, kept flat at the larger measurement
    assert memory._rising_line(30.0, 10.0, 1, 2) == (30.0, 0.0)
    profile = memory.ActivationProfile("fp32", (), 0, 0, 0, 0, {}, transient_forward=(5.0, 1.0),
                                       transient_backward=(-10.0, 4.0))
    assert [profile.transient_bytes(b) for b in (1, 2, 5, 10)] == [6, 7, 10, 30]
    assert memory.ActivationProfile("fp32", (), 0, 0, 0, 0, {}, transient_forward=(-9.0, 1.0)).transient_bytes(1) == 0


@pytest.fixture(scope="module")
def tiny():
    return load_config("tiny", ["data.image_size=32"])  # 32 px: the plan's arithmetic at a quarter of the cost


@pytest.fixture(scope="module")
def tiny_model(tiny):
    model = build_model(tiny.model)
    model.set_memory_bank(torch.randn(3, 10, 768))
    return model


@pytest.mark.parametrize("parts", [(), GPU_PARTS], ids=["plain", "checkpointed"])
def test_plan_is_within_10_percent_of_the_count_and_monotone(tiny, tiny_model, parts):
    profile = memory.profile_activations(tiny, "fp32", parts, model=tiny_model)
    model = tiny_model
    model.set_activation_checkpointing(parts)
    batch = memory._measurement_batch(tiny, 3, torch.device("cpu"), torch.Generator().manual_seed(5))
    counted = memory.count_saved_tensors(model, *batch, SegmentationLoss(tiny.loss, 3))
    if parts:  # a real checkpointed forward, no probe: autograd keeps exactly the probe's `kept`
        excluded = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        real = memory._SavedTensorCounter(excluded)
        with torch.autograd.graph.saved_tensors_hooks(real.pack, lambda t: t):
            SegmentationLoss(tiny.loss, 3)(model(*batch[:2]), batch[2])
        assert real.count().kept_bytes == counted.kept_bytes
    model.set_activation_checkpointing(())
    planned = memory.plan(tiny, 3, "fp32", parts, profile=profile)
    assert abs(planned.activation_bytes - counted.kept_bytes) <= 0.1 * counted.kept_bytes
    assert abs(planned.recompute_bytes - counted.recompute_bytes) <= 0.1 * max(counted.recompute_bytes, 1)
    peaks = [memory.plan(tiny, b, "fp32", parts, profile=profile) for b in range(1, 9)]
    assert all(a.activation_bytes < b.activation_bytes for a, b in zip(peaks, peaks[1:], strict=False))
    assert all(a.peak_bytes < b.peak_bytes for a, b in zip(peaks, peaks[1:], strict=False))
    # fixed parts: float32 weights, gradients and AdamW moments of the tiny model (hand count)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert planned.gradient_bytes == 4 * trainable and planned.optimizer_bytes == 8 * trainable
    if parts:
        assert planned.activation_bytes < 0.5 * memory.plan(tiny, 3, "fp32", ()).activation_bytes
    text = planned.text()
    assert "does not reproduce large-batch BatchNorm statistics" in text and "planned peak" in text


@pytest.mark.parametrize("parts", [(), GPU_PARTS], ids=["plain", "checkpointed"])
def test_plan_covers_a_measured_step_it_did_not_measure(tiny, tiny_model, parts):
    # The plan's lines come from micro-batches 1 and 2; a real step at 4 (its own measurement)
    # must land within 10%. Without the transient term the tiny config's plan is a fraction of
    # the step (its frozen audio forward on a 256 x 256 spectrogram outweighs the saved tensors).
    profile = memory.profile_activations(tiny, "fp32", parts, model=tiny_model)
    assert set(profile.peaks) == {1, 2}
    tiny_model.set_activation_checkpointing(parts)
    try:
        batch = memory._measurement_batch(tiny, 4, torch.device("cpu"), torch.Generator().manual_seed(9))
        measured = memory.measure_step_peak(tiny_model, *batch, SegmentationLoss(tiny.loss, 3)).peak_bytes
    finally:
        tiny_model.set_activation_checkpointing(())
    planned = memory.plan(tiny, 4, "fp32", parts, profile=profile)
    print(f"tiny 32 px, micro-batch 4, {parts or 'plain'}: measured {measured}, planned {planned.step_bytes} "
          f"(without the transient term {planned.step_bytes - planned.transient_bytes})")
    assert abs(planned.step_bytes - measured) <= 0.1 * measured
    assert planned.peak_bytes == (planned.parameter_bytes + planned.gradient_bytes + planned.optimizer_bytes
                                  + planned.step_bytes)
    assert "transient (audio, loss, backward)" in planned.text()


def test_measuring_leaves_the_model_and_rng_alone(tiny, tiny_model):
    model = tiny_model
    first = next(p for p in model.parameters() if p.requires_grad)
    first.grad = torch.full_like(first, 0.5)  # a gradient being accumulated stays as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    memory.profile_activations(tiny, "fp32", ("head",), model=model, batches=(1, 3))
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)
    after = model.state_dict()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)
    assert model.activation_checkpointing() == ()
    assert torch.equal(first.grad, torch.full_like(first, 0.5))
    assert all(p.grad is None for p in model.parameters() if p is not first)
    first.grad = None


@pytest.mark.parametrize("batch_size, world_size", [(8, 1), (12, 2), (50, 1), (50, 2), (7, 1)])
def test_choose_micro_batch_keeps_the_batch(tiny, tiny_model, batch_size, world_size):
    profile = memory.profile_activations(tiny, "fp32", (), model=tiny_model)
    fixed = memory.plan(tiny, 1, world_size=world_size, profile=profile)
    per_sample = profile.kept_per_sample
    for fits in (1, 2, 3, 5, 25):  # a budget room for about `fits` samples after the headroom
        budget = int((fixed.peak_bytes + (fits - 0.5) * per_sample) / 0.9)
        micro, accum = memory.choose_micro_batch(tiny, budget, batch_size, world_size)
        per_rank = batch_size // world_size
        assert micro * accum * world_size == batch_size and per_rank % micro == 0
        assert memory.plan(tiny, micro, world_size=world_size, profile=profile).peak_bytes <= 0.9 * budget
        larger = [d for d in range(micro + 1, per_rank + 1) if per_rank % d == 0]
        if larger:  # the next divisor would not fit: micro is the largest that does
            assert memory.plan(tiny, larger[0], world_size=world_size, profile=profile).peak_bytes > 0.9 * budget


def test_choose_micro_batch_refuses_clearly(tiny):
    with pytest.raises(DDESegError, match="even micro-batch 1 does not fit.*try train.precision=bf16"):
        memory.choose_micro_batch(tiny, units.parse_bytes("100MiB"), 8)
    with pytest.raises(DDESegError, match="does not divide over 3 ranks"):
        memory.choose_micro_batch(tiny, units.parse_bytes("80GiB"), 8, 3)


def test_render_plans(tiny):
    from rich.console import Console

    plans = [memory.plan(tiny, 4, "fp32", parts) for parts in ((), GPU_PARTS)]
    console = Console(width=160, record=True)
    console.print(memory.render_plans(plans))
    text = console.export_text()
    assert "planned peak" in text and "ckpt on" in text and "BatchNorm" in text


def _accumulation_gap(bn_train: bool) -> float:
    """Relative L2 difference of one step's gradients: batch 8 vs 4 x micro-batch 2 accumulated.
    Randomness off (noise-free clustering, no dropout, no drop-path) so BatchNorm is the only
    coupling between samples."""
    config, model = deterministic_tiny()
    generator = torch.Generator().manual_seed(2)
    image, logmel = torch.randn(8, 3, 32, 32, generator=generator), torch.randn(8, 87, 64, generator=generator) - 30
    target = torch.randint(0, 3, (8, 32, 32), generator=generator)
    loss_fn = SegmentationLoss(config.loss, 3)

    def gradients(micro: int) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        model.train()
        model.decode_head.linear_fuse.bn.train(bn_train)
        for start in range(0, 8, micro):
            part = slice(start, start + micro)
            loss, _ = loss_fn(model(image[part], logmel[part]), target[part])
            (loss * micro / 8).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    full, accumulated = gradients(8), gradients(2)
    return float((full - accumulated).norm() / full.norm())


def test_gradient_accumulation_is_not_large_batch_batchnorm():
    gap_train, gap_eval = _accumulation_gap(True), _accumulation_gap(False)
    print(f"batch 8 vs 2 x 4 accumulation, relative gradient difference: BN train {gap_train:.3g}, eval {gap_eval:.3g}")
    assert gap_train > 1e-3  # the head's batch statistics differ per micro-batch
    assert gap_eval < 1e-5  # with BN statistics fixed, accumulation is exact up to rounding
