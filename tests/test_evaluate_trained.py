"""`ddeseg evaluate` on a briefly trained tiny checkpoint and the synthetic dataset of `conftest.py`
(the real `synth` -> `prepare` -> `train` stages): the numbers agree with the trainer's validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ddeseg.cli.app import app
from ddeseg.config import load_config
from ddeseg.distributed import DistributedContext
from ddeseg.pipelines.train import TrainRequest, train
from ddeseg.training.checkpoint import load_training_checkpoint
from ddeseg.visualize import frame_layout, sheet_size

STEPS = 4


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, prepared_synthetic, micro_config_overrides):
    root = tmp_path_factory.mktemp("trained")
    bank = root / "bank.npy"
    np.save(bank, np.random.default_rng(0).standard_normal((3, 2, 192)).astype(np.float32))
    overrides = [*micro_config_overrides, f"train.steps={STEPS}", f"train.eval_every={STEPS}", f"train.checkpoint_every={STEPS}"]
    config = load_config(prepared_synthetic.config, overrides)
    train(config, TrainRequest(shards_dir=prepared_synthetic.shards, memory_bank=bank, out_dir=root / "run"), DistributedContext())
    return root / "run"


def evaluate(*args: str) -> None:
    result = CliRunner().invoke(app, ["evaluate", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output


def test_evaluating_the_best_checkpoint_on_val_gives_the_trainers_validation(trained_run, prepared_synthetic, tmp_path):
    best = load_training_checkpoint(trained_run / "best.pt")
    validation = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    validation = [r for r in validation if r.get("split") == "val" and r["step"] == best["best"]["step"]]
    evaluate("--checkpoint", str(trained_run / "best.pt"), "--shards", str(prepared_synthetic.shards),
             "--split", "val", "--out", str(tmp_path / "val"), "--pictures", "0", "--worst", "0")
    report = json.loads((tmp_path / "val" / "eval.json").read_text())
    assert report["miou"] == best["best"]["miou"] == validation[0]["miou"]
    assert report["fscore"] == validation[0]["fscore"] and report["avsbench_miou"] == validation[0]["avsbench_miou"]


def test_test_split_metrics_and_pictures(trained_run, prepared_synthetic, tmp_path):
    out = tmp_path / "test"
    evaluate("--checkpoint", str(trained_run / "last.pt"), "--shards", str(prepared_synthetic.shards),
             "--task", "v2", "--out", str(out), "--pictures", "2", "--worst", "3")
    report = json.loads((out / "eval.json").read_text())
    assert set(report) >= {"miou", "fscore", "f1", "per_class", "avsbench_miou", "avsbench_fscore", "counts"}
    assert report["counts"]["frames"] == report["counts"]["frames_in_manifest"] > 0
    classes = json.loads((prepared_synthetic.shards / "classes.json").read_text())
    names = [classes["names"][i] for i in classes["tasks"]["v2"]["ids"]]
    assert list(report["per_class"]) == names
    size = load_training_checkpoint(trained_run / "last.pt")["config"]["data"]["image_size"]
    samples = sorted((out / "pictures").glob("sample-*.png"))
    assert len(samples) == 2 and all(Image.open(p).size == (frame_layout(size).width, frame_layout(size).height) for p in samples)
    assert Image.open(out / "pictures" / "worst-frames.png").size == sheet_size(3, size, 2)
    assert (out / "eval.md").read_text().startswith("# Evaluation: v2 / test")
