"""Faults while `ddeseg train` runs: preemption (SIGTERM in the middle of a step, SIGKILL in the
middle of a checkpoint write), divergence (a non-finite loss), a full disk at a checkpoint.
Each case checks what must survive (bytes of the last good checkpoint) and that a resumed run
ends with the weights of an uninterrupted one."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from test_faults_disk import _fsync_fails_for

from ddeseg.config import load_config
from ddeseg.distributed import DistributedContext
from ddeseg.errors import DDESegError
from ddeseg.fileio import DiskFullError
from ddeseg.pipelines import train as train_module
from ddeseg.pipelines.train import TrainRequest, is_new_best, train
from ddeseg.training.checkpoint import load_training_checkpoint


@pytest.fixture(scope="module")
def bank_path(tmp_path_factory, prepared_synthetic) -> Path:
    path = tmp_path_factory.mktemp("bank") / "bank.npy"
    np.save(path, np.random.default_rng(0).standard_normal((3, 2, 192)).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def straight_8(tmp_path_factory, prepared_synthetic, bank_path, micro_config_overrides) -> Path:
    """An uninterrupted 8-step run: what every interrupted-then-resumed run must equal."""
    out = tmp_path_factory.mktemp("straight") / "run"
    _train(prepared_synthetic, bank_path, out, micro_config_overrides, steps=8)
    return out


def _train(prepared, bank, out: Path, overrides: list[str], steps: int, resume: str | None = None, stop_at: int | None = None):
    config = load_config(prepared.config, overrides + [f"train.steps={steps}"])
    request = TrainRequest(shards_dir=prepared.shards, memory_bank=bank, out_dir=out, resume=resume, stop_at=stop_at)
    return train(config, request, DistributedContext())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_weights(a_run: Path, b_run: Path) -> None:
    a = load_training_checkpoint(a_run / "last.pt")["model"]
    b = load_training_checkpoint(b_run / "last.pt")["model"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def _logged_steps(run: Path) -> list[tuple[str, int]]:
    return [(r.get("split", "train"), r["step"]) for r in _records(run) if "step" in r]


def test_sigterm_inside_the_optimizer_step_stops_at_the_boundary_and_resumes_exactly(
    tmp_path, monkeypatch, prepared_synthetic, bank_path, micro_config_overrides, straight_8
):
    """SIGTERM arrives while step 6's optimizer update is under way (after the weights moved,
    before the step is counted): the step must complete, last.pt must be step 6, and the resumed
    run must end with the uninterrupted run's weights and log the same steps once each."""
    original = torch.amp.GradScaler.step
    calls = {"n": 0}

    def step_then_preempted(self, optimizer, *args, **kwargs):
        result = original(self, optimizer, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(torch.amp.GradScaler, "step", step_then_preempted)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # the CLI turns it into exit status 130
        _train(prepared_synthetic, bank_path, run, micro_config_overrides, steps=8)
    assert load_training_checkpoint(run / "last.pt")["step"] == 6
    monkeypatch.setattr(torch.amp.GradScaler, "step", original)
    _train(prepared_synthetic, bank_path, run, micro_config_overrides, steps=8, resume="latest")
    _assert_same_weights(straight_8, run)
    assert _logged_steps(run) == _logged_steps(straight_8)


def test_sigkill_during_a_checkpoint_write_keeps_the_last_one_and_resume_is_exact(
    tmp_path, prepared_synthetic, bank_path, micro_config_overrides, straight_8
):
    """The process is SIGKILLed half-way through writing its third last.pt (step 6): the step-4
    last.pt must be intact (same sha256), loadable, and the resumed run exact with no step
    logged twice (the log ran ahead of the checkpoint)."""
    run = tmp_path / "run"
    script = tmp_path / "dies.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys
        from pathlib import Path
        import ddeseg.training.checkpoint as checkpoint
        written = checkpoint.write_bytes_atomic
        calls = {{"n": 0}}
        def dying(path, data):
            if Path(path).name == "last.pt":
                calls["n"] += 1
                if calls["n"] == 2:  # the step-4 last.pt: record its hash for the test
                    written(path, data)
                    import hashlib
                    Path({str(tmp_path / "step4.sha256")!r}).write_text(hashlib.sha256(Path(path).read_bytes()).hexdigest())
                    return
                if calls["n"] == 3:
                    partial = Path(path).with_name("." + Path(path).name + ".partial")
                    partial.write_bytes(bytes(data[: len(data) // 2]))
                    os.kill(os.getpid(), signal.SIGKILL)
            written(path, data)
        checkpoint.write_bytes_atomic = dying
        from ddeseg.cli.app import main
        sys.argv = ["ddeseg"] + sys.argv[1:]
        main()
    """))
    command = [
        sys.executable, str(script), "train", "--config", str(prepared_synthetic.config),
        "--shards", str(prepared_synthetic.shards), "--memory-bank", str(bank_path), "--out", str(run),
        "--steps", "8", "--device", "cpu",
    ]
    for item in micro_config_overrides + ["train.checkpoint_every=2"]:  # the last --set wins
        command += ["--set", item]
    killed = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert _sha256(run / "last.pt") == (tmp_path / "step4.sha256").read_text()
    assert load_training_checkpoint(run / "last.pt")["step"] == 4
    assert any(step == 6 for _, step in _logged_steps(run)), "the log should have run ahead of last.pt"
    # The resumed run: checkpoint_every may differ on resume; the weights may not.
    _train(prepared_synthetic, bank_path, run, micro_config_overrides + ["train.checkpoint_every=2"], steps=8, resume="latest")
    _assert_same_weights(straight_8, run)
    assert _logged_steps(run) == _logged_steps(straight_8)


def _nan_loss_from(monkeypatch, first_call: int, last_call: int | None = None) -> None:
    """The training loss becomes NaN on its `first_call`-th to `last_call`-th forward."""
    original = train_module.SegmentationLoss.forward
    calls = {"n": 0}

    def forward(self, logits, target):
        loss, parts = original(self, logits, target)
        if not torch.is_grad_enabled():
            return loss, parts  # not a training step
        calls["n"] += 1
        if calls["n"] >= first_call and (last_call is None or calls["n"] <= last_call):
            loss = loss * float("nan")
        return loss, parts

    monkeypatch.setattr(train_module.SegmentationLoss, "forward", forward)


def test_a_nan_loss_stops_at_its_step_and_writes_nothing_over_the_last_checkpoint(
    tmp_path, monkeypatch, prepared_synthetic, bank_path, micro_config_overrides
):
    run = tmp_path / "run"
    _train(prepared_synthetic, bank_path, run, micro_config_overrides, steps=4)
    before = {name: _sha256(run / name) for name in ("last.pt", "best.pt")}
    _nan_loss_from(monkeypatch, first_call=2)  # the 2nd training forward of the resumed run: step 6
    with pytest.raises(DDESegError, match=r"non-finite loss or gradient at step 6 .*loss nan.*lr .*last good checkpoint"):
        _train(prepared_synthetic, bank_path, run, micro_config_overrides, steps=8, resume="latest")
    assert {name: _sha256(run / name) for name in before} == before
    assert max(step for _, step in _logged_steps(run)) <= 6


def test_skip_policy_skips_counts_and_stops_after_too_many_in_a_row(
    tmp_path, monkeypatch, prepared_synthetic, bank_path, micro_config_overrides
):
    skip = micro_config_overrides + ["train.on_nonfinite=skip", "train.max_nonfinite_in_a_row=3"]
    _nan_loss_from(monkeypatch, first_call=3, last_call=4)  # steps 3 and 4 are skipped
    run = tmp_path / "skip"
    summary = _train(prepared_synthetic, bank_path, run, skip, steps=8)
    assert summary["steps"] == 8
    skipped = {r["step"]: r["skipped_steps"] for r in _records(run) if "skipped_steps" in r}
    assert skipped == {4: 2}
    weights = load_training_checkpoint(run / "last.pt")["model"]
    assert all(torch.isfinite(value).all() for value in weights.values() if value.is_floating_point())

    _nan_loss_from(monkeypatch, first_call=1)  # every step from now on (patched twice: counts restart)
    with pytest.raises(DDESegError, match="3 steps in a row were non-finite"):
        _train(prepared_synthetic, bank_path, tmp_path / "diverged", skip, steps=8)


def test_best_checkpoint_is_never_chosen_on_a_non_finite_metric():
    best = {"miou": -1.0, "fscore": 0.0, "step": -1}
    assert not is_new_best({"miou": float("nan"), "fscore": 0.0}, best)
    assert not is_new_best({"miou": float("inf"), "fscore": 0.0}, best)
    assert is_new_best({"miou": 0.2, "fscore": 0.0}, best)
    assert not is_new_best({"miou": 0.2, "fscore": 0.0}, {"miou": 0.3})


def test_a_full_disk_at_a_checkpoint_keeps_the_last_one_and_a_rerun_resumes(
    tmp_path, monkeypatch, prepared_synthetic, bank_path, micro_config_overrides, straight_8
):
    run = tmp_path / "run"
    _train(prepared_synthetic, bank_path, run, micro_config_overrides, steps=8, stop_at=4)  # the 8-step schedule
    before = _sha256(run / "last.pt")
    _fsync_fails_for(monkeypatch, "/.last.pt.", on_call=1)  # the resumed run's first last.pt write
    with pytest.raises(DiskFullError, match=rf"disk full writing last\.pt in {re.escape(str(run))}, needs [0-9.]+ [KM]iB, .* free"):
        _train(prepared_synthetic, bank_path, run, micro_config_overrides, steps=8, resume="latest")
    assert _sha256(run / "last.pt") == before
    assert not list(run.glob(".*.tmp")), "the temporary file must not be left to fill the disk"
    monkeypatch.undo()
    _train(prepared_synthetic, bank_path, run, micro_config_overrides, steps=8, resume="latest")
    _assert_same_weights(straight_8, run)
