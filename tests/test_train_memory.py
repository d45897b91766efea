"""`ddeseg train` and GPU memory: the memory plan in the start-up table, `train.gpu_memory`
choosing the micro-batch and accumulation (kept by --resume), the run's precision on the CPU,
activation checkpointing, SyncBatchNorm and compile wiring. On the micro config (tens of ms a
step); the plan's own arithmetic is tested in test_memory_plan.py."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from ddeseg import progress
from ddeseg.config import ConfigError, load_config
from ddeseg.distributed import DistributedContext
from ddeseg.errors import DDESegError
from ddeseg.models import build_model
from ddeseg.pipelines.train import (
    TrainRequest,
    build_run,
    check_inputs,
    plan_memory,
    save_checkpoint,
    setup_model,
    train,
)
from ddeseg.training import memory_plan as memory
from ddeseg.training.checkpoint import load_training_checkpoint
from ddeseg.training.precision import run_precision


@pytest.fixture(scope="module")
def bank_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bank") / "bank.npy"
    np.save(path, np.random.default_rng(0).standard_normal((3, 2, 192)).astype(np.float32))
    return path


def _config(prepared, overrides: list[str], steps: int = 8):
    return load_config(prepared.config, overrides + [f"train.steps={steps}"])


def _train(prepared, bank, out: Path, overrides: list[str], steps: int = 8, **request):
    config = _config(prepared, overrides, steps)
    return train(config, TrainRequest(shards_dir=prepared.shards, memory_bank=bank, out_dir=out, **request), DistributedContext())


def _trainer_model(config, bank_path: Path) -> torch.nn.Module:
    model = build_model(config.model)
    model.set_memory_bank(np.load(bank_path))
    return model


def _budget_between(config, model, low: int, high: int, world_size: int = 1) -> str:
    """A budget (bytes, as text) whose usable 90% lies halfway between the planned peaks of
    micro-batches `low` and `high`: `low` fits, `high` does not."""
    profile = memory.profile_activations(config, "fp32", (), model=model)
    peaks = [memory.plan(config, b, world_size=world_size, profile=profile, model=model).peak_bytes for b in (low, high)]
    return f"{int(sum(peaks) / 2 / 0.9)}B"


def _assert_same_weights(a: Path, b: Path) -> None:
    first, second = load_training_checkpoint(a / "last.pt")["model"], load_training_checkpoint(b / "last.pt")["model"]
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0, msg=key)


def test_gpu_memory_keeps_the_batch_and_resumes_exactly(
    tmp_path, prepared_synthetic, bank_path, micro_config_overrides, capsys, monkeypatch
):
    # Configured batch: data.batch_size 4 x 1 rank x 1 accumulation. A budget with room for 2
    # (not 4) samples gives micro-batch 2 x accumulation 2. No validation: only weights compared.
    overrides = micro_config_overrides + ["train.eval_every=1000"]
    config = _config(prepared_synthetic, overrides)
    budget = _budget_between(config, _trainer_model(config, bank_path), 2, 4)
    planned = overrides + [f"train.gpu_memory={budget}"]
    straight = tmp_path / "straight"
    monkeypatch.setattr(progress.console, "_width", 300)  # the start-up table on unwrapped lines
    _train(prepared_synthetic, bank_path, straight, planned)
    table = capsys.readouterr().err
    assert "2 x 1 ranks x 2 accumulation = 4 (micro-batch chosen for train.gpu_memory" in table
    assert "planned peak" in table and "does not reproduce large-batch BatchNorm" in table
    stored = load_training_checkpoint(straight / "last.pt")
    assert stored["batch_plan"] == {"micro_batch": 2, "grad_accum": 2, "world_size": 1, "batch": 4, "gpu_memory": budget}
    assert (stored["config"]["data"]["batch_size"], stored["config"]["train"]["grad_accum"]) == (2, 2)
    # The plan only chooses: the same run configured as 2 x 2 by hand steps identically (the
    # measuring forwards left the model, its BatchNorm statistics and the RNG alone).
    by_hand = tmp_path / "by_hand"
    _train(prepared_synthetic, bank_path, by_hand, overrides + ["data.batch_size=2", "train.grad_accum=2"])
    _assert_same_weights(straight, by_hand)
    # 5 steps, then resumed to 8 under a budget where all 4 would fit: the run keeps its 2 x 2
    # (stored in the checkpoint, not planned again) and ends bit-identical to the straight run.
    resumed = tmp_path / "resumed"
    _train(prepared_synthetic, bank_path, resumed, planned, stop_at=5)
    assert load_training_checkpoint(resumed / "last.pt")["step"] == 5
    _train(prepared_synthetic, bank_path, resumed, overrides + ["train.gpu_memory=80GiB"], resume="latest")
    assert load_training_checkpoint(resumed / "last.pt")["batch_plan"]["micro_batch"] == 2
    _assert_same_weights(straight, resumed)


def test_resume_refuses_another_batch(tmp_path, prepared_synthetic, bank_path, micro_config_overrides):
    run = tmp_path / "run"
    _train(prepared_synthetic, bank_path, run, micro_config_overrides, steps=2)
    with pytest.raises(DDESegError, match=r"the run's batch is 4 x 1 rank\(s\) x 1 accumulation = 4, but .* make 8"):
        _train(prepared_synthetic, bank_path, run, micro_config_overrides + ["train.grad_accum=2"], steps=4, resume="latest")


def test_gpu_memory_refuses_when_micro_batch_1_does_not_fit(tmp_path, prepared_synthetic, bank_path, micro_config_overrides):
    out = tmp_path / "run"
    with pytest.raises(DDESegError, match=r"^train.gpu_memory: even micro-batch 1 does not fit: planned peak .* > "):
        _train(prepared_synthetic, bank_path, out, micro_config_overrides + ["train.gpu_memory=64KiB"], steps=2)
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("world_size, batch_size, accum", [(1, 4, 3), (2, 4, 1), (2, 6, 2)])
def test_plan_memory_keeps_micro_x_accum_x_ranks(prepared_synthetic, bank_path, micro_config_overrides, world_size, batch_size, accum):
    # plan_memory alone with a fake multi-rank context (it reads only the world size).
    config = _config(prepared_synthetic, micro_config_overrides + [f"data.batch_size={batch_size}", f"train.grad_accum={accum}"])
    configured = batch_size * world_size * accum
    model = _trainer_model(config, bank_path)
    per_rank = configured // world_size
    fits = max(d for d in range(1, per_rank) if per_rank % d == 0)  # the largest proper divisor fits
    config.train.gpu_memory = _budget_between(config, model, fits, min(d for d in range(fits + 1, per_rank + 1) if per_rank % d == 0), world_size)
    context = DistributedContext(world_size=world_size)
    run = types.SimpleNamespace(
        config=config, context=context, device=context.device, model=model, precision="fp32",
        inputs=types.SimpleNamespace(resume_payload=None), batch_chosen_for=None, memory_plan=None,
    )
    plan_memory(run)
    micro, chosen_accum = config.data.batch_size, config.train.grad_accum
    assert micro * chosen_accum * world_size == configured
    assert micro == fits and run.memory_plan.micro_batch == micro and run.memory_plan.world_size == world_size


def test_the_plan_is_measured_only_when_cheap_or_asked(tmp_path, prepared_synthetic, bank_path, micro_config_overrides):
    def planned(overrides: list[str], device: str = "cpu") -> bool:
        config = _config(prepared_synthetic, micro_config_overrides + overrides)
        run = types.SimpleNamespace(
            config=config, context=DistributedContext(), device=torch.device(device), model=_trainer_model(config, bank_path),
            precision="fp32", inputs=types.SimpleNamespace(resume_payload=None), batch_chosen_for=None, memory_plan=None,
        )
        plan_memory(run)
        return run.memory_plan is not None

    assert not planned([])  # the CPU default: no measuring (the demo, the test suite)
    assert planned(["train.memory_plan=true"])
    assert planned(["train.gpu_memory=80GiB", "train.memory_plan=false"])  # a budget needs the plan
    # On CUDA it is on by default; the model stays on the CPU here, only the switch is tested.
    assert planned([], device="cuda")
    assert not planned(["train.memory_plan=false"], device="cuda")


def test_precision_on_the_cpu_is_float32_unless_asked(prepared_synthetic, micro_config_overrides):
    def precision(overrides: list[str], device: str = "cpu") -> str:
        return run_precision(_config(prepared_synthetic, micro_config_overrides + overrides), torch.device(device))

    assert precision(["train.precision=bf16"]) == "fp32"  # the default: CPU runs are float32, as before
    assert precision(["train.precision=bf16", "train.cpu_autocast=true"]) == "bf16"
    assert precision(["train.precision=fp16"]) == "fp32"
    assert precision(["train.precision=bf16"], "cuda") == "bf16" and precision(["train.precision=fp16"], "cuda") == "fp16"
    with pytest.raises(DDESegError, match="fp16 needs a CUDA device"):
        precision(["train.precision=fp16", "train.cpu_autocast=true"])


def test_cpu_autocast_trains_in_bf16(tmp_path, prepared_synthetic, bank_path, micro_config_overrides):
    # Two steps each: float32 (the default, precision bf16 notwithstanding) vs cpu_autocast. The
    # weights must differ (autocast really ran) but stay close (the same training).
    overrides = micro_config_overrides + ["train.precision=bf16"]
    _train(prepared_synthetic, bank_path, tmp_path / "fp32", overrides, steps=2)
    _train(prepared_synthetic, bank_path, tmp_path / "bf16", overrides + ["train.cpu_autocast=true"], steps=2)
    a = load_training_checkpoint(tmp_path / "fp32" / "last.pt")["model"]
    b = load_training_checkpoint(tmp_path / "bf16" / "last.pt")["model"]
    trained = [k for k in a if a[k].is_floating_point() and k.startswith("decode_head")]
    assert any(not torch.equal(a[k], b[k]) for k in trained)
    for key in trained:
        torch.testing.assert_close(a[key], b[key], rtol=0.05, atol=0.02, msg=key)


def test_setup_model_checkpointing_and_sync_batchnorm(prepared_synthetic, micro_config_overrides):
    config = _config(prepared_synthetic, micro_config_overrides + ["train.activation_checkpointing=[visual_blocks,head]"])
    batchnorms = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in build_model(config.model).modules())
    assert batchnorms >= 1

    def synced(world_size: int, device: str, enabled: bool = True) -> tuple[int, str]:
        config.train.sync_batchnorm = enabled
        model, rows = setup_model(build_model(config.model), config, DistributedContext(world_size=world_size, device=torch.device(device)))
        assert model.activation_checkpointing() == ("visual_blocks", "head")
        assert rows["activation checkpointing"] == "visual_blocks, head"
        return sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()), rows["sync BatchNorm"]

    # Conversion needs no GPU (only running SyncBatchNorm does): every BatchNorm, as the official code.
    assert synced(2, "cuda") == (batchnorms, f"on: {batchnorms} BatchNorm layers over 2 ranks")
    count, why = synced(2, "cpu")
    assert count == 0 and "SyncBatchNorm needs CUDA" in why
    assert synced(1, "cuda") == (0, "off (one rank)")
    assert synced(2, "cuda", enabled=False) == (0, "off (train.sync_batchnorm false)")


def test_compile_wraps_the_training_model_and_checkpoints_save_plain_keys(tmp_path, prepared_synthetic, bank_path, micro_config_overrides):
    # torch.compile is lazy: nothing compiles until the first forward, so this is quick.
    config = _config(prepared_synthetic, micro_config_overrides + ["train.compile=true"])
    request = TrainRequest(shards_dir=prepared_synthetic.shards, memory_bank=bank_path, out_dir=tmp_path / "run")
    context = DistributedContext()
    run = build_run(config, request, context, check_inputs(config, request, context))
    assert isinstance(run.train_model, torch._dynamo.eval_frame.OptimizedModule) and run.train_model._orig_mod is run.model
    (tmp_path / "run").mkdir()
    save_checkpoint(run, "last.pt")
    keys = load_training_checkpoint(tmp_path / "run" / "last.pt")["model"].keys()
    assert keys == run.model.state_dict().keys() and not any(k.startswith("_orig_mod") for k in keys)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.gpu_memory=24 parsecs", "train.gpu_memory: memory size '24 parsecs' is not a size"),
        ("train.activation_checkpointing=[head,decoder]", r"unknown part\(s\) \['decoder'\]"),
    ],
)
def test_memory_keys_are_checked_on_load(prepared_synthetic, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(prepared_synthetic.config, [override])


def test_gpu_memory_option_of_the_cli(tmp_path, prepared_synthetic, bank_path, micro_config_overrides):
    # `--gpu-memory` is `--set train.gpu_memory=...`: a size that is no size, and a budget where
    # nothing fits, are each one line and exit status 2, with nothing written.
    command = [
        sys.executable, "-m", "ddeseg", "train", "--config", str(prepared_synthetic.config), "--shards", str(prepared_synthetic.shards),
        "--memory-bank", str(bank_path), "--out", str(tmp_path / "run"), "--device", "cpu", "--steps", "2",
    ]
    for item in micro_config_overrides:
        command += ["--set", item]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    for budget, message in (("lots", "train.gpu_memory: memory size 'lots' is not a size"),
                            ("1MiB", "train.gpu_memory: even micro-batch 1 does not fit")):
        result = subprocess.run([*command, "--gpu-memory", budget], capture_output=True, text=True, timeout=300, env=environment)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert not (tmp_path / "run").exists()
