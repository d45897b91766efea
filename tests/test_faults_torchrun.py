"""torchrun with 2 gloo ranks on the CPU: a rank that hangs makes the other fail within the process
group's timeout (`train.collective_timeout_s`) and the job ends instead of waiting forever; a
damaged shard keeps the ranks in step (its samples are skipped, the step counts stay equal)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from ddeseg.training.checkpoint import load_training_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bank_path(tmp_path_factory, prepared_synthetic) -> Path:
    path = tmp_path_factory.mktemp("bank") / "bank.npy"
    np.save(path, np.random.default_rng(0).standard_normal((3, 2, 192)).astype(np.float32))
    return path


def _torchrun(script: Path, prepared, bank: Path, run: Path, port: int, overrides: list[str], timeout: float):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
        str(script), "train", "--config", str(prepared.config), "--shards", str(prepared.shards),
        "--memory-bank", str(bank), "--out", str(run), "--steps", "6", "--device", "cpu",
    ]
    for item in overrides:
        command += ["--set", item]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)


def _script(tmp_path: Path, patch: str = "") -> Path:
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(patch) + textwrap.dedent("""
        import sys
        from ddeseg.cli.app import main
        sys.argv = ["ddeseg"] + sys.argv[1:]
        main()
    """))
    return script


def test_a_hung_rank_makes_the_job_exit_within_the_collective_timeout(
    tmp_path, prepared_synthetic, bank_path, micro_config_overrides
):
    """Rank 1 stops taking part at step 3 (stuck, as in a dead NFS read or a deadlock): rank 0's
    next collective fails after train.collective_timeout_s, and torchrun stops the job."""
    script = _script(tmp_path, """
        import os, time
        import ddeseg.pipelines.train as train
        taken = train.train_step
        def train_step(run, micro_batches):
            if run.context.rank == 1 and run.step == 2:
                while True:
                    time.sleep(1)  # hangs; still ends when torchrun kills the job
            return taken(run, micro_batches)
        train.train_step = train_step
    """)
    started = time.time()
    result = _torchrun(
        script, prepared_synthetic, bank_path, tmp_path / "run", 29541,
        micro_config_overrides + ["train.collective_timeout_s=20"], timeout=240,
    )
    elapsed = time.time() - started
    assert result.returncode != 0
    assert "timed out" in result.stderr.lower() or "timeout" in result.stderr.lower(), result.stderr[-3000:]
    print(f"hung rank: job ended in {elapsed:.0f} s with exit status {result.returncode}")


def test_a_damaged_shard_keeps_two_ranks_in_step(tmp_path, prepared_synthetic, bank_path, micro_config_overrides):
    shards = tmp_path / "shards"
    shutil.copytree(prepared_synthetic.shards, shards)
    victim = sorted((shards / "v2" / "train").glob("shard-*.tar"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    damaged = type(prepared_synthetic)(raw=prepared_synthetic.raw, shards=shards, config=prepared_synthetic.config)
    run = tmp_path / "run"
    result = _torchrun(_script(tmp_path), damaged, bank_path, run, 29543, micro_config_overrides, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    end = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"event": "end"' in line]
    assert end and end[0]["steps"] == 6 and end[0]["skipped_samples"] >= 1
    checkpoint = load_training_checkpoint(run / "last.pt")
    # the checkpoint gathers both ranks' RNG states at step 6: both ranks reached it
    assert checkpoint["step"] == 6 and len(checkpoint["rng"]) == 2
    reports = sorted(p.name for p in (run / "data_errors").glob("train-rank*.jsonl"))
    assert reports, "the skipped samples must be reported"
