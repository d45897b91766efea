"""The training metrics log: JSON lines always, TensorBoard and W&B when asked, clear errors."""

from __future__ import annotations

import json
import sys
import types

import pytest

from ddeseg.errors import DDESegError
from ddeseg.training.run_log import RunLog


def test_jsonl_is_written_and_a_new_run_starts_a_new_log(tmp_path):
    log = RunLog(tmp_path)
    log.log({"step": 1, "loss": 2.0})
    log.log({"step": 2, "split": "val", "miou": 0.5})
    log.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    RunLog(tmp_path, resume=True).log({"step": 3, "loss": 1.0})
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    RunLog(tmp_path)  # not a resume: starts over
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_tensorboard_receives_prefixed_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = RunLog(tmp_path, tensorboard=True)
    log.log({"step": 5, "epoch": 0, "loss": 1.5, "lr": 1e-3})
    log.log({"step": 5, "split": "val", "miou": 0.25, "per_class": {"ignored": 1}})
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"train/loss", "train/lr", "val/miou"}
    assert events.Scalars("val/miou")[0].step == 5 and events.Scalars("val/miou")[0].value == pytest.approx(0.25)


def test_wandb_gets_the_same_scalars(tmp_path, monkeypatch):
    calls: list[tuple] = []

    class Run:
        def log(self, values, step):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(init=lambda **kwargs: calls.append(("init", kwargs)) or Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = RunLog(tmp_path, wandb=True, wandb_project="p", config={"task": "v2"})
    log.log({"step": 3, "loss": 0.5})
    log.close()
    assert calls[0][0] == "init" and calls[0][1]["project"] == "p" and calls[0][1]["config"] == {"task": "v2"}
    assert calls[1] == ("log", {"train/loss": 0.5}, 3) and calls[2] == ("finish",)


def test_missing_wandb_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    with pytest.raises(DDESegError, match="pip install wandb"):
        RunLog(tmp_path, wandb=True)
