"""The CUDA paths, marked `cuda`: skipped (with the reason) where `torch.cuda.is_available()` is
False, run by `benchmarks/gpu_check.py` (`pytest -m cuda`) on the first GPU.

- bf16 autocast on CUDA: the tiny config's loss within the CPU test's tolerance of float32
  (test_bf16.py: 2%, gradient cosine 0.98);
- activation checkpointing on CUDA: the gradients equal the plain ones (test_checkpointing.py's
  tolerances), with every random part live;
- FAISS on the GPU: the memory bank has the CPU bank's shape and its inertia within 1% per class,
  from the same points, k and iterations;
- the training loader pins its batches on a CUDA machine and they equal the unpinned ones bit for
  bit, also after the non-blocking copy to the GPU;
- the reference fixtures on CUDA: float64 within their float64 tolerances (1e-6 forward, 1e-8
  training step), float32 within the README's per-array tolerances (TF32 convolutions included);
- the memory plan's transient term is measured with `torch.cuda.max_memory_allocated`, and the
  plan covers the measured peak of a real step at a micro-batch it did not measure.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not CUDA, reason="needs CUDA (torch.cuda.is_available() is False on this machine)"),
]
DEVICE = torch.device("cuda") if CUDA else torch.device("cpu")


def _faiss_gpus() -> int:
    try:
        import faiss
    except ImportError:
        return 0
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def test_bf16_autocast_loss_close_to_float32_on_cuda():
    from test_bf16 import GRAD_COSINE, LOSS_RTOL, deterministic_tiny

    from ddeseg.losses import SegmentationLoss
    from ddeseg.training.precision import autocast

    config, model = deterministic_tiny()
    model = model.to(DEVICE).train()
    generator = torch.Generator().manual_seed(2)
    image = torch.randn(2, 3, 64, 64, generator=generator).to(DEVICE)
    logmel = (torch.randn(2, 87, 64, generator=generator) * 10 - 40).to(DEVICE)
    target = torch.randint(0, 3, (2, 64, 64), generator=generator).to(DEVICE)
    results = {}
    for precision in ("fp32", "bf16"):
        model.zero_grad(set_to_none=True)
        with autocast("cuda", precision):
            logits = model(image, logmel)
        loss, _ = SegmentationLoss(config.loss, 3)(logits.float(), target)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[precision] = (loss.detach(), grad, logits.dtype)
    (loss32, grad32, _), (loss16, grad16, dtype16) = results["fp32"], results["bf16"]
    assert dtype16 == torch.bfloat16  # autocast acted on the trainable parts
    torch.testing.assert_close(loss16, loss32, rtol=LOSS_RTOL, atol=0)
    assert torch.nn.functional.cosine_similarity(grad32.double(), grad16.double(), dim=0) > GRAD_COSINE


def test_checkpointed_gradients_equal_the_plain_ones_on_cuda():
    from test_checkpointing import STOCHASTIC

    from ddeseg.config import load_config
    from ddeseg.losses import SegmentationLoss
    from ddeseg.models import build_model

    config = load_config("tiny", STOCHASTIC)
    torch.manual_seed(0)
    model = build_model(config.model)
    model.set_memory_bank(torch.randn(3, 4, 768, generator=torch.Generator().manual_seed(2)))
    model = model.to(DEVICE)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(2, 3, 64, 64, generator=generator).to(DEVICE)
    logmel = (torch.randn(2, 87, 64, generator=generator) * 10 - 40).to(DEVICE)
    target = torch.randint(0, 3, (2, 64, 64), generator=generator).to(DEVICE)

    def step(parts, seed: int) -> dict[str, torch.Tensor]:
        model.load_state_dict(initial)
        model.zero_grad(set_to_none=True)
        model.set_activation_checkpointing(parts)
        model.train()
        torch.manual_seed(seed)  # seeds the CUDA generators too: the recompute replays them
        loss, _ = SegmentationLoss(config.loss, 3)(model(image, logmel), target)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = step((), 7)
    checkpointed = step(("visual_blocks", "aligners", "head"), 7)
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6 * scale + 1e-12, msg=name)
    other = step((), 8)  # the draws matter: the equality above is not vacuous
    assert any(not torch.allclose(plain[n], other[n], rtol=1e-3, atol=0) for n in plain)


@pytest.mark.skipif(_faiss_gpus() == 0, reason="FAISS sees no GPU (faiss.get_num_gpus() == 0: a CPU-only faiss build?)")
def test_faiss_gpu_bank_matches_the_cpu_bank():
    from ddeseg.pipelines.build_memory_bank import cluster_class_embeddings

    rng = np.random.default_rng(0)
    by_class = {}
    for class_id in (1, 2, 3):  # a few modes per class, overlapping: Lloyd has work to do
        modes = rng.normal(0, 1, (16, 64))
        by_class[class_id] = (modes[rng.integers(0, 16, 800)] + rng.normal(0, 0.5, (800, 64))).astype(np.float32)
    cpu_bank, cpu_stats = cluster_class_embeddings(by_class, 8, niter=20, seed=0, gpu=None)
    gpu_bank, gpu_stats = cluster_class_embeddings(by_class, 8, niter=20, seed=0, gpu=0)
    assert gpu_bank.shape == cpu_bank.shape == (3, 8, 64) and gpu_bank.dtype == np.float32
    for cpu_row, gpu_row in zip(cpu_stats, gpu_stats, strict=True):
        assert gpu_row.class_id == cpu_row.class_id and gpu_row.fill == cpu_row.fill == "kmeans"
        assert gpu_row.inertia <= 1.01 * cpu_row.inertia, (gpu_row, cpu_row)


def test_pinned_loader_batches_equal_the_unpinned_ones(prepared_synthetic, micro_config_overrides, monkeypatch):
    from ddeseg.config import load_config
    from ddeseg.data import stream

    config = load_config(prepared_synthetic.config, micro_config_overrides + ["data.num_workers=2"])
    shards = prepared_synthetic.shards / "v2" / "train"

    def batches() -> list[dict]:
        return list(stream.make_train_loader(shards, config, seed=0, num_batches=3))

    pinned = batches()
    with monkeypatch.context() as patch:  # the loader pins exactly when CUDA is available
        patch.setattr(stream.torch.cuda, "is_available", lambda: False)
        plain = batches()
    assert len(pinned) == len(plain) == 3
    for a, b in zip(pinned, plain, strict=True):
        assert a["key"] == b["key"]
        for name in ("image", "mask", "logmel"):
            assert a[name].is_pinned() and not b[name].is_pinned(), name
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
            on_gpu = a[name].to(DEVICE, non_blocking=True)
            torch.cuda.synchronize()
            torch.testing.assert_close(on_gpu.cpu(), b[name], rtol=0, atol=0)


def test_reference_forward_fixtures_on_cuda():
    from reference_data import reference_file
    from test_reference_fixtures import ARRAYS, _large_model

    def intermediates(model, image, audio) -> dict[str, np.ndarray]:
        out = model.forward_intermediates(image.to(DEVICE), audio.to(DEVICE))
        arrays = {k: out[k] for k in ("audio_latent", "enhanced_stage1", "enhanced_tokens", "logits")}
        arrays.update({f"stage{i}_features": f for i, f in enumerate(out["stage_features"])})
        return {k: v.detach().cpu().numpy() for k, v in arrays.items()}

    f64 = dict(np.load(reference_file("tiny_large_forward_f64.npz")))
    model = _large_model([], torch.float64).to(DEVICE)
    with torch.no_grad():
        ours = intermediates(model, torch.from_numpy(f64["image"]).double(), torch.from_numpy(f64["logmel"]).double())
    for name in ARRAYS:
        np.testing.assert_allclose(ours[name], f64[name], atol=1e-6, rtol=1e-6, err_msg=name)

    f32 = dict(np.load(reference_file("tiny_large_forward.npz")))
    model = _large_model([], torch.float32).to(DEVICE)
    with torch.no_grad():
        ours = intermediates(model, torch.from_numpy(f32["image"]), torch.from_numpy(f32["waveform"]))
    for name in ARRAYS:  # the README's float32 tolerances (test_reference_fixtures.py)
        diff, ref = ours[name] - f32[name], f32[name]
        assert np.abs(diff).max() <= 5e-3 * np.abs(ref).max(), name
        assert np.linalg.norm(diff) <= 1e-3 * np.linalg.norm(ref), name


@pytest.mark.parametrize("parts", [(), ("visual_blocks", "aligners", "head")], ids=["plain", "checkpointed"])
def test_reference_training_step_on_cuda(parts):
    from reference_data import reference_file
    from test_reference_fixtures import TRAIN_STEP_OVERRIDES, _large_model, _max_rel

    from ddeseg.config import LossConfig
    from ddeseg.losses import SegmentationLoss

    fixture, prefix = dict(np.load(reference_file("train_step.npz"))), "v2/f64/"
    model = _large_model(TRAIN_STEP_OVERRIDES + ["model.num_classes=3"], torch.float64).to(DEVICE)
    model.set_clustering_noise(False)
    model.set_activation_checkpointing(parts)
    model.train()
    logits = model(torch.from_numpy(fixture["image"]).double().to(DEVICE), torch.from_numpy(fixture[prefix + "logmel"]).to(DEVICE))
    loss_fn = SegmentationLoss(LossConfig(ce_weight=5, dice_weight=5, iou_weight=2, focal_weight=0), 3)
    total, _ = loss_fn(logits, torch.from_numpy(fixture["mask"]).to(DEVICE))
    total.backward()
    assert _max_rel(logits.detach().cpu().numpy(), fixture[prefix + "logits"]) <= 1e-8
    np.testing.assert_allclose(total.item(), fixture[prefix + "total_loss"], rtol=1e-10)
    parameters = dict(model.named_parameters())
    for key in list(fixture["named_grad_keys"]) + list(fixture["named_grad_keys_v2_extra"]):
        assert _max_rel(parameters[key].grad.cpu().numpy(), fixture[f"{prefix}grad/{key}"]) <= 1e-8, key


def test_memory_plan_measures_and_covers_a_cuda_step():
    from ddeseg.config import load_config
    from ddeseg.losses import SegmentationLoss
    from ddeseg.models import build_model
    from ddeseg.training import memory_plan as memory

    config = load_config("tiny")
    model = build_model(config.model)
    model.set_memory_bank(torch.randn(3, 10, 768))
    model = model.to(DEVICE)
    profile = memory.profile_activations(config, "fp32", (), model=model)
    assert set(profile.peaks) == {1, 2} and all(p.peak_bytes > 0 for p in profile.peaks.values())
    # A real step at micro-batch 4 (not measured): the plan's step bytes cover its peak, within 10%.
    batch = memory._measurement_batch(config, 4, DEVICE, torch.Generator().manual_seed(1))
    measured = memory.measure_step_peak(model, *batch, SegmentationLoss(config.loss, 3).to(DEVICE))
    planned = memory.plan(config, 4, profile=profile, model=model)
    print(f"cuda, tiny config, micro-batch 4: measured {measured.peak_bytes}, planned {planned.step_bytes}")
    assert abs(planned.step_bytes - measured.peak_bytes) <= 0.1 * measured.peak_bytes
