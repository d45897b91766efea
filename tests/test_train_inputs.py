"""Every bad input of `ddeseg train` / `ddeseg pretrain-audio` is refused before any work: exit 2,
one line naming the file or option, and nothing the user did not ask to replace is changed
(issue 14: a second train into a run folder, a config whose classes do not fit the task,
`--resume` under another config, an `--out` that is a file, out-of-range training keys)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ddeseg.config import ConfigError, load_config, to_dict
from ddeseg.distributed import DistributedContext
from ddeseg.errors import DDESegError
from ddeseg.pipelines.train import RUN_OUTPUTS, TrainRequest, check_resume_config, train
from ddeseg.training.checkpoint import load_training_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bank_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bank") / "bank.npy"
    np.save(path, np.random.default_rng(0).standard_normal((3, 2, 192)).astype(np.float32))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ddeseg", *args], capture_output=True, text=True, timeout=300, env=environment)


def _train_args(prepared, bank: Path, out: Path, overrides: list[str], *extra: str) -> list[str]:
    args = ["train", "--config", str(prepared.config), "--shards", str(prepared.shards), "--memory-bank", str(bank), "--out", str(out), "--device", "cpu", *extra]
    for item in overrides:
        args += ["--set", item]
    return args


def _error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-3000:]  # one line, no traceback
    assert lines[0].startswith("error: ")
    return lines[0]


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _train(prepared, bank: Path, out: Path, overrides: list[str], steps: int, **request) -> dict:
    config = load_config(prepared.config, overrides + [f"train.steps={steps}"])
    return train(config, TrainRequest(shards_dir=prepared.shards, memory_bank=bank, out_dir=out, **request), DistributedContext())


def _old_run(folder: Path, names=RUN_OUTPUTS) -> Path:
    """A run folder as a previous run left it (contents need not be real: the check is up front)."""
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).write_bytes(f"previous run's {name}".encode())
    (folder / "config.yaml").write_text("task: v2\n")
    return folder


# --------------------------------------------------------------------------------------------
# 1. a second train into a run folder needs --resume or --overwrite
# --------------------------------------------------------------------------------------------


def test_cli_train_into_an_existing_run_is_refused_and_changes_nothing(tmp_path, prepared_synthetic, bank_path, micro_config_overrides):
    run = _old_run(tmp_path / "run")
    before = _hashes(run)
    result = _cli(*_train_args(prepared_synthetic, bank_path, run, micro_config_overrides, "--steps", "2"))
    assert result.returncode == 2, result.stderr[-3000:]
    line = _error_line(result)
    assert str(run) in line and "--resume" in line and "--overwrite" in line
    assert _hashes(run) == before


@pytest.mark.parametrize("name", RUN_OUTPUTS)
def test_any_run_output_makes_the_folder_a_run(name, tmp_path, prepared_synthetic, bank_path, micro_config_overrides):
    run = _old_run(tmp_path / "run", names=(name,))
    before = _hashes(run)
    with pytest.raises(DDESegError, match=f"already holds a run \\({name}\\)"):
        _train(prepared_synthetic, bank_path, run, micro_config_overrides, steps=2)
    assert _hashes(run) == before


def test_overwrite_replaces_the_old_run(tmp_path, prepared_synthetic, bank_path, micro_config_overrides):
    run = _old_run(tmp_path / "run")
    (run / "data_errors").mkdir()
    (run / "data_errors" / "rank0-worker0.jsonl").write_text(json.dumps({"key": "old", "shard": "old.tar", "reason": "old"}) + "\n")
    summary = _train(prepared_synthetic, bank_path, run, micro_config_overrides, steps=2, overwrite=True)
    assert summary["steps"] == 2 and summary["skipped_samples"] == 0  # the old run's report is gone
    assert load_training_checkpoint(run / "last.pt")["step"] == 2
    assert "previous run" not in (run / "metrics.jsonl").read_text()


def test_resume_and_overwrite_together_are_refused(tmp_path, prepared_synthetic, bank_path, micro_config_overrides):
    with pytest.raises(DDESegError, match="--resume and --overwrite"):
        _train(prepared_synthetic, bank_path, tmp_path / "run", micro_config_overrides, steps=2, resume="latest", overwrite=True)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# 2. the config's classes must be the task's
# --------------------------------------------------------------------------------------------


def test_cli_a_config_with_other_classes_than_the_task_is_refused(tmp_path, prepared_synthetic, bank_path, micro_config_overrides):
    # The fixture's task v2 has 3 classes (background + 2); a 5-class config would skip nothing
    # here but report numbers of a model the task cannot score.
    run = tmp_path / "run"
    result = _cli(*_train_args(prepared_synthetic, bank_path, run, micro_config_overrides + ["model.num_classes=5"], "--steps", "2"))
    assert result.returncode == 2, result.stderr[-3000:]
    line = _error_line(result)
    assert "model.num_classes is 5" in line and "model.num_classes=3" in line and str(prepared_synthetic.shards) in line
    assert not run.exists()


@pytest.fixture(scope="module")
def prepared_binary(tmp_path_factory):
    """A binary task (v1s) prepared from a synthetic ddeseg layout."""
    from conftest import DEMO_CONFIG, MICRO_OVERRIDES, PreparedDataset

    from ddeseg.pipelines.prepare import PreparePaths, prepare
    from ddeseg.pipelines.synth import generate
    from ddeseg.stage import RunOptions

    root = tmp_path_factory.mktemp("binary")
    raw = generate("ddeseg", root / "raw", videos=4, classes=2, seed=3, image_size=64, tasks=["v1s"])
    prepare(load_config(DEMO_CONFIG, MICRO_OVERRIDES), PreparePaths(layout="ddeseg", root=raw, out=root / "shards", tasks=["v1s"]), RunOptions(progress=False))
    return PreparedDataset(raw=raw, shards=root / "shards", config=DEMO_CONFIG)


def test_a_multiclass_config_on_a_binary_task_is_refused(tmp_path, prepared_binary, bank_path, micro_config_overrides):
    with pytest.raises(DDESegError, match=r"model.num_classes is 3 but task 'v1s' .* binary .* set model.num_classes=1"):
        _train(prepared_binary, bank_path, tmp_path / "run", micro_config_overrides + ["task=v1s"], steps=2)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# 3. --resume under another config
# --------------------------------------------------------------------------------------------


def test_cli_resume_with_other_overrides_names_the_keys(tmp_path, prepared_synthetic, bank_path, micro_config_overrides):
    run = tmp_path / "run"
    _train(prepared_synthetic, bank_path, run, micro_config_overrides, steps=4, stop_at=2)
    before = _hashes(run)
    changed = micro_config_overrides + ["model.head_embedding_dim=8", "train.base_lr=5e-4"]
    result = _cli(*_train_args(prepared_synthetic, bank_path, run, changed, "--steps", "4", "--resume", "latest"))
    assert result.returncode == 2, result.stderr[-3000:]
    line = _error_line(result)
    assert "--resume" in line and str(run / "last.pt") in line
    assert "model.head_embedding_dim (16 -> 8)" in line and "train.base_lr (0.001 -> 0.0005)" in line
    assert _hashes(run) == before


def test_resume_may_extend_the_schedule_and_change_the_cadence(tmp_path, prepared_synthetic, bank_path, micro_config_overrides):
    run = tmp_path / "run"
    _train(prepared_synthetic, bank_path, run, micro_config_overrides, steps=4, stop_at=2)
    summary = _train(prepared_synthetic, bank_path, run, micro_config_overrides + ["train.log_every=1", "eval.pictures=0"], steps=3, resume="latest")
    assert summary["steps"] == 3 and load_training_checkpoint(run / "last.pt")["step"] == 3


def test_check_resume_config_compares_only_keys_both_sides_know(prepared_synthetic, micro_config_overrides):
    config = load_config(prepared_synthetic.config, micro_config_overrides)
    saved = to_dict(config)
    check_resume_config(saved, config, Path("last.pt"))  # the same config resumes
    saved["model"]["removed_in_a_later_version"] = 1  # unknown to this version: not compared
    del saved["loss"]["focal_weight"]  # a key added after the run was saved: not compared
    check_resume_config(saved, config, Path("last.pt"))
    saved["train"]["seed"] = 7
    saved["data"]["image_size"] = 48
    with pytest.raises(DDESegError, match=r"data.image_size \(48 -> 32\), train.seed \(7 -> 0\)"):
        check_resume_config(saved, config, Path("last.pt"))


# --------------------------------------------------------------------------------------------
# 4. --out that is a file
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["train", "pretrain-audio"])
def test_cli_out_that_is_a_file_is_refused(command, tmp_path, prepared_synthetic, bank_path, micro_config_overrides):
    out = tmp_path / "notes.txt"
    out.write_text("a user's file\n")
    if command == "train":
        args = _train_args(prepared_synthetic, bank_path, out, micro_config_overrides, "--steps", "2")
    else:
        args = ["pretrain-audio", "--shards", str(prepared_synthetic.shards), "--config", str(prepared_synthetic.config), "--out", str(out), "--steps", "2", "--device", "cpu"]
        for item in micro_config_overrides:
            args += ["--set", item]
    result = _cli(*args)
    assert result.returncode == 2, result.stderr[-3000:]
    line = _error_line(result)
    assert f"--out {out} is a file" in line
    assert out.read_text() == "a user's file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# --------------------------------------------------------------------------------------------
# 5. out-of-range training keys
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.samples_per_shard=0", "data.samples_per_shard must be >= 1, got 0"),
        ("data.batch_size=0", "data.batch_size must be >= 1, got 0"),
        ("data.eval_batch_size=-2", "data.eval_batch_size must be >= 1, got -2"),
        ("data.num_workers=-1", "data.num_workers must be >= 0, got -1"),
        ("train.steps=0", "train.steps must be >= 1, got 0"),
        ("train.epochs_equivalent=0", "train.epochs_equivalent must be >= 1, got 0"),
        ("train.base_lr=0", "train.base_lr must be > 0, got 0.0"),
        ("train.min_lr=-1e-6", "train.min_lr must be >= 0, got -1e-06"),
        ("train.warmup_steps=-1", "train.warmup_steps must be >= 0, got -1"),
        ("train.weight_decay=-0.1", "train.weight_decay must be >= 0, got -0.1"),
        ("train.grad_accum=0", "train.grad_accum must be >= 1, got 0"),
        ("train.log_every=0", "train.log_every must be >= 1, got 0"),
        ("train.eval_every=0", "train.eval_every must be >= 1, got 0"),
        ("train.checkpoint_every=0", "train.checkpoint_every must be >= 1, got 0"),
        ("train.betas=[0.9,1.0]", "train.betas must be two numbers in [0, 1), got [0.9, 1.0]"),
        ("train.precision=fp8", "train.precision must be one of bf16, fp16, fp32, got 'fp8'"),
        ("pretrain_audio.steps=0", "pretrain_audio.steps must be >= 1, got 0"),
        ("pretrain_audio.batch_size=0", "pretrain_audio.batch_size must be >= 1, got 0"),
        ("pretrain_audio.base_lr=-1", "pretrain_audio.base_lr must be > 0, got -1.0"),
    ],
)
def test_out_of_range_training_keys_are_config_errors(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config(REPO / "configs" / "tiny.yaml", [override])
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "override",
    ["train.warmup_steps=0", "train.grad_clip=null", "train.grad_clip=0", "data.num_workers=0", "train.min_lr=0", "train.epochs_equivalent=null"],
)
def test_boundary_values_stay_valid(override):
    load_config(REPO / "configs" / "tiny.yaml", [override])


def test_cli_an_invalid_set_value_is_one_line_naming_the_key(tmp_path, prepared_synthetic, bank_path, micro_config_overrides):
    run = tmp_path / "run"
    result = _cli(*_train_args(prepared_synthetic, bank_path, run, micro_config_overrides + ["data.samples_per_shard=0"], "--steps", "2"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "data.samples_per_shard must be >= 1, got 0" in _error_line(result)
    assert not run.exists()
