"""Self-describing run folders: RUN_DIR/config.yaml names every input (absolute, fingerprinted),
run.json and train.log describe the start, and `ddeseg train --config RUN_DIR/config.yaml --out NEW`
reruns the run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import invoke_cli as cli
from typer.testing import CliRunner

from ddeseg.cli.app import app
from ddeseg.config import load_config
from ddeseg.models import build_model

STEPS = 4


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """The micro model on one thread (conftest)."""


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r and r.get("split") is None]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, prepared_synthetic, micro_config_overrides) -> dict[str, Path]:
    """A 4-step micro run from the CLI, with an --init file (the visual backbone of another seed:
    the losses depend on it, so a rerun that lost it would not repeat them)."""
    root = tmp_path_factory.mktemp("run-folder")
    bank = root / "bank.npy"
    np.save(bank, np.random.default_rng(0).standard_normal((3, 2, 192)).astype(np.float32))
    config = load_config(prepared_synthetic.config, micro_config_overrides)
    torch.manual_seed(1)
    visual = {k: v for k, v in build_model(config.model).state_dict().items() if k.startswith("backbone.")}
    init = root / "backbone_init.pt"
    torch.save(visual, init)
    sets = [item for override in micro_config_overrides for item in ("--set", override)]
    cli(
        "train", "--config", str(prepared_synthetic.config), *sets, "--steps", str(STEPS),
        "--set", f"train.eval_every={STEPS}", "--set", f"train.checkpoint_every={STEPS}",
        "--shards", str(prepared_synthetic.shards), "--memory-bank", str(bank), "--init", str(init),
        "--out", str(root / "run"),
    )  # fmt: skip
    return {"root": root, "run": root / "run", "bank": bank, "init": init, "shards": prepared_synthetic.shards}


def test_the_run_folder_names_its_inputs_and_how_it_was_started(first_run):
    run = first_run["run"]
    saved = yaml.safe_load((run / "config.yaml").read_text())["inputs"]
    assert saved["shards"] == str(first_run["shards"].resolve())
    assert saved["memory_bank"] == str(first_run["bank"].resolve())
    assert saved["init"] == [str(first_run["init"].resolve())]
    assert saved["fingerprints"] == {
        str(first_run["shards"].resolve()): sha256(first_run["shards"] / "manifest.parquet"),
        str(first_run["bank"].resolve()): sha256(first_run["bank"]),
        str(first_run["init"].resolve()): sha256(first_run["init"]),
    }
    start = json.loads((run / "run.json").read_text())["starts"][0]
    import ddeseg

    assert start["ddeseg_version"] == ddeseg.__version__
    assert start["git_commit"] is None or len(start["git_commit"].split("+")[0]) == 40
    assert "train samples" in start["startup_table"] and "precision" in start["startup_table"]
    log = (run / "train.log").read_text()
    assert "train samples" in log and "done" in log and "\x1b[" not in log  # plain text, the end summary too


def test_a_rerun_from_the_run_folders_config_repeats_the_first_steps(first_run):
    rerun = first_run["root"] / "rerun"
    cli("train", "--config", str(first_run["run"] / "config.yaml"), "--out", str(rerun))
    before, after = train_losses(first_run["run"]), train_losses(rerun)
    assert len(before) >= 2 and before == after  # bit-identical losses at every logged step
    assert yaml.safe_load((rerun / "config.yaml").read_text())["inputs"]["init"] == [str(first_run["init"].resolve())]


def test_a_rerun_warns_when_a_recorded_input_is_missing(first_run, tmp_path):
    config = yaml.safe_load((first_run["run"] / "config.yaml").read_text())
    config["inputs"]["init"] = [str(tmp_path / "gone.pt")]  # as if the audio checkpoint was deleted
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    output = cli("train", "--config", str(tmp_path / "config.yaml"), "--out", str(tmp_path / "run"), "--stop-at", "1")
    assert "gone.pt" in output and "is missing" in output
    assert "is missing" in (tmp_path / "run" / "train.log").read_text()


def test_print_config_prints_the_resolved_config_and_writes_nothing(first_run, tmp_path):
    args = ["--config", str(first_run["run"] / "config.yaml"), "--set", "train.base_lr=0.5", "--steps", "7"]
    printed = yaml.safe_load(cli("train", *args, "--out", str(tmp_path / "run"), "--print-config"))
    expected = load_config(first_run["run"] / "config.yaml", ["train.base_lr=0.5", "train.steps=7", "train.epochs_equivalent=null"])
    assert load_config(None, []) != expected
    from ddeseg.config import config_from_dict

    assert config_from_dict(printed) == expected
    assert not (tmp_path / "run").exists()


def test_evaluate_records_absolute_paths(first_run, tmp_path, monkeypatch):
    monkeypatch.chdir(first_run["root"])  # relative paths on the command line
    cli("evaluate", "--checkpoint", "run/best.pt", "--shards", str(first_run["shards"]), "--out", str(tmp_path / "eval"),
        "--split", "val", "--pictures", "0", "--worst", "0", "--quiet")  # fmt: skip
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["checkpoint"] == str((first_run["run"] / "best.pt").resolve())


def test_best_pt_holds_the_weights_only_and_checkpoints_are_readable(first_run):
    from ddeseg.errors import DDESegError
    from ddeseg.training.checkpoint import load_training_checkpoint

    run = first_run["run"]
    best, last = load_training_checkpoint(run / "best.pt"), load_training_checkpoint(run / "last.pt")
    assert {"optimizer", "lr_scheduler", "scaler", "rng"} <= set(last) and not {"optimizer", "lr_scheduler", "scaler", "rng"} & set(best)
    assert best["model"].keys() == last["model"].keys() and best["config"] == last["config"]
    # AdamW keeps two float32 moments per trainable weight: that is what best.pt saves.
    model = build_model(load_config(run / "config.yaml").model)
    moments_bytes = 2 * 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (run / "last.pt").stat().st_size - (run / "best.pt").stat().st_size > 0.95 * moments_bytes
    assert (run / "best.pt").stat().st_mode & 0o777 == 0o644 and (run / "last.pt").stat().st_mode & 0o777 == 0o644
    result = CliRunner().invoke(app, ["train", "--config", str(run / "config.yaml"), "--out", str(run), "--resume", str(run / "best.pt")])
    assert isinstance(result.exception, DDESegError) and "resume from last.pt" in str(result.exception)
