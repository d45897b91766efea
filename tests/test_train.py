"""`ddeseg train` end to end on a prepared synthetic dataset: loss goes down, outputs are written,
resume is exact, torchrun with 2 CPU ranks takes equal steps, a truncated shard is skipped."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddeseg.config import load_config
from ddeseg.distributed import DistributedContext
from ddeseg.errors import DDESegError
from ddeseg.pipelines.train import TrainRequest, learning_rate_factor, train
from ddeseg.training.checkpoint import load_training_checkpoint


@pytest.fixture(scope="module")
def bank_path(tmp_path_factory, prepared_synthetic) -> Path:
    # A fixed random bank: what the trainer does with it is tested here, how it is built elsewhere.
    path = tmp_path_factory.mktemp("bank") / "bank.npy"
    np.save(path, np.random.default_rng(0).standard_normal((3, 2, 192)).astype(np.float32))
    return path


def _train(prepared, bank, out: Path, overrides: list[str], steps: int, resume: str | None = None, stop_at: int | None = None):
    config = load_config(prepared.config, overrides + [f"train.steps={steps}"])
    request = TrainRequest(shards_dir=prepared.shards, memory_bank=bank, out_dir=out, resume=resume, stop_at=stop_at)
    return train(config, request, DistributedContext())


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_reduces_the_loss_and_writes_the_run(tmp_path, prepared_synthetic, bank_path, micro_config_overrides):
    summary = _train(prepared_synthetic, bank_path, tmp_path / "run", micro_config_overrides, steps=16)
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt"):
        assert (run / name).is_file(), name
    losses = [r["loss"] for r in _records(run) if "loss" in r]
    assert len(losses) == 8
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2]), losses
    validations = [r for r in _records(run) if r.get("split") == "val"]
    assert [r["step"] for r in validations] == [4, 8, 12, 16]
    best = load_training_checkpoint(run / "best.pt")
    assert best["best"]["miou"] == max(r["miou"] for r in validations)
    assert summary["steps"] == 16 and summary["skipped_samples"] == 0
    last = load_training_checkpoint(run / "last.pt")
    assert last["step"] == 16 and "memory_bank" in last["model"]


def test_resume_gives_identical_weights(tmp_path, prepared_synthetic, bank_path, micro_config_overrides):
    straight = tmp_path / "straight"
    _train(prepared_synthetic, bank_path, straight, micro_config_overrides, steps=8)
    resumed = tmp_path / "resumed"
    _train(prepared_synthetic, bank_path, resumed, micro_config_overrides, steps=8, stop_at=5)
    assert load_training_checkpoint(resumed / "last.pt")["step"] == 5  # mid-epoch, between evaluations
    _train(prepared_synthetic, bank_path, resumed, micro_config_overrides, steps=8, resume="latest")
    a = load_training_checkpoint(straight / "last.pt")["model"]
    b = load_training_checkpoint(resumed / "last.pt")["model"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_a_truncated_shard_is_skipped_and_reported(tmp_path, prepared_synthetic, bank_path, micro_config_overrides):
    shards = tmp_path / "shards"
    shutil.copytree(prepared_synthetic.shards, shards)
    victim = sorted((shards / "v2" / "train").glob("shard-*.tar"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    broken = type(prepared_synthetic)(raw=prepared_synthetic.raw, shards=shards, config=prepared_synthetic.config)
    summary = _train(broken, bank_path, tmp_path / "run", micro_config_overrides, steps=6)
    assert summary["steps"] == 6
    assert summary["skipped_samples"] >= 1
    reasons = [json.loads(line) for f in (tmp_path / "run" / "data_errors").glob("*.jsonl") for line in f.read_text().splitlines()]
    assert any(victim.name in r["shard"] for r in reasons)


def test_a_bank_of_the_wrong_shape_is_a_clear_error(tmp_path, prepared_synthetic, micro_config_overrides):
    bank = tmp_path / "bank.npy"
    np.save(bank, np.zeros((5, 2, 192), dtype=np.float32))
    with pytest.raises(DDESegError, match="has 5 classes, but task v2 of .* needs 3"):
        _train(prepared_synthetic, bank, tmp_path / "run", micro_config_overrides, steps=2)


def test_schedule_warms_up_then_decays_to_min_lr(micro_config_overrides):
    config = load_config(Path(__file__).parents[1] / "configs" / "demo.yaml", ["train.steps=100", "train.warmup_steps=10"])
    base = config.train.base_lr
    assert learning_rate_factor(0, config) * base == pytest.approx(config.train.warmup_lr)
    assert learning_rate_factor(10, config) == pytest.approx(1.0)
    assert learning_rate_factor(100, config) * base == pytest.approx(config.train.min_lr)
    factors = [learning_rate_factor(s, config) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(factors, factors[1:], strict=False))


def test_torchrun_two_cpu_ranks_take_equal_steps(tmp_path, prepared_synthetic, bank_path, micro_config_overrides):
    """Unequal shards (16/16/.../rest samples) split over 2 gloo ranks: the run must finish (a
    rank taking fewer steps would hang DDP's all-reduce) and rank 0's checkpoint must load."""
    sizes = {p.name: p.stat().st_size for p in (prepared_synthetic.shards / "v2" / "train").glob("*.tar")}
    assert len(set(sizes.values())) > 1, "the fixture should have shards of unequal sizes"
    run = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
        "-m", "ddeseg", "train", "--config", str(prepared_synthetic.config), "--shards", str(prepared_synthetic.shards),
        "--memory-bank", str(bank_path), "--out", str(run), "--steps", "6", "--device", "cpu",
    ]
    for item in micro_config_overrides:
        command += ["--set", item]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    end = [r for r in _records(run) if r.get("event") == "end"]
    assert end and end[0]["steps"] == 6
    checkpoint = load_training_checkpoint(run / "last.pt")
    assert checkpoint["step"] == 6 and isinstance(checkpoint["rng"], list) and len(checkpoint["rng"]) == 2


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_saves_last_checkpoint_and_says_how_to_resume(
    signal_name, tmp_path, prepared_synthetic, bank_path, micro_config_overrides
):
    import signal
    import time

    run = tmp_path / "run"
    command = [
        sys.executable, "-m", "ddeseg", "train", "--config", str(prepared_synthetic.config),
        "--shards", str(prepared_synthetic.shards), "--memory-bank", str(bank_path), "--out", str(run),
        "--steps", "100000", "--device", "cpu",
    ]
    for item in micro_config_overrides + ["train.eval_every=100000", "train.checkpoint_every=100000"]:
        command += ["--set", item]
    # A shell without job control starts background jobs with SIGINT ignored, and Python then
    # never installs its Ctrl-C handler: give the child the default disposition, as a terminal would.
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip()):
            time.sleep(0.2)
        process.send_signal(getattr(signal, signal_name))
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr[-2000:]
    checkpoint = load_training_checkpoint(run / "last.pt")
    assert 2 <= checkpoint["step"] < 100000
    assert "continue with --resume latest" in stderr.replace("\n", " ")
