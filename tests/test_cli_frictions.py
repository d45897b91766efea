"""Small command-line frictions: --version, --print-config on every command that reads a config,
bundled configs by name, the `--set key value` hint, inspect's per-task classes."""

from __future__ import annotations

import sys

import pytest
import yaml
from conftest import invoke_cli as invoke
from typer.testing import CliRunner

import ddeseg
from ddeseg.cli import app as app_module
from ddeseg.cli.app import app
from ddeseg.config import config_from_dict, load_config, to_dict
from ddeseg.training.checkpoint import FORMAT, atomic_torch_save


def test_version():
    assert invoke("--version").strip() == f"ddeseg {ddeseg.__version__}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, prepared_synthetic, micro_config_overrides):
    """A checkpoint in our format (weights are not read by --print-config)."""
    config = load_config(prepared_synthetic.config, micro_config_overrides)
    payload = {"format": FORMAT, "model": {}, "config": to_dict(config), "classes": [], "step": 0}
    return atomic_torch_save(payload, tmp_path_factory.mktemp("ckpt") / "best.pt")


def test_print_config_loads_back_as_the_config_each_command_would_use(prepared_synthetic, checkpoint, micro_config_overrides, tmp_path):
    shards, out = str(prepared_synthetic.shards), str(tmp_path / "out")
    stored = load_config(prepared_synthetic.config, [])
    cases = [
        (["prepare", "--layout", "ddeseg", "--root", str(prepared_synthetic.raw), "--out", out, "--config", "v1s", "--workers", "3"],
         load_config("v1s", ["prepare.workers=3"])),
        (["build-memory-bank", "--shards", shards, "--out", out, "--config", "tiny", "--k", "7"], load_config("tiny", ["memory_bank.k=7"])),
        (["pretrain-audio", "--shards", shards, "--out", out, "--config", "demo", "--steps", "9"], load_config("demo", ["pretrain_audio.steps=9"])),
        (["train", "--config", "v2", "--set", "train.base_lr=0.25"], load_config("v2", ["train.base_lr=0.25"])),
        (["evaluate", "--checkpoint", str(checkpoint), "--shards", shards, "--out", out, "--split", "val"],
         load_config(prepared_synthetic.config, [*micro_config_overrides, "eval.split=val"])),
        (["predict", "--checkpoint", str(checkpoint), "video.mp4", "--out", out, "--config", "VPO-SS", "--batch-size", "3"],
         load_config("VPO-SS", ["predict.batch_size=3"])),
    ]
    for args, expected in cases:
        printed = invoke(*args, "--print-config")
        assert config_from_dict(yaml.safe_load(printed)) == expected, args[0]
        assert expected != stored or args[0] == "evaluate"
    assert not (tmp_path / "out").exists()  # nothing ran
    demo = yaml.safe_load(invoke("demo", "--out", out, "--print-config", "--set", "train.seed=5"))
    assert demo["train"]["seed"] == 5 and not (tmp_path / "out").exists()


def test_a_missing_bundled_name_is_a_one_line_error():
    from ddeseg.config import ConfigError

    result = CliRunner().invoke(app, ["train", "--config", "no-such-config", "--print-config"])
    assert isinstance(result.exception, ConfigError) and "bundled configs: v1s" in str(result.exception)


def test_set_key_space_value_says_how_to_write_it(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["ddeseg", "train", "--config", "demo", "--set", "train.steps", "10"])
    with pytest.raises(SystemExit) as exit_info:
        app_module.main()
    assert exit_info.value.code == 2
    assert "write --set train.steps=VALUE" in capsys.readouterr().err
    assert app_module.set_without_equals(["--set", "train.steps=10", "--set=x", "--steps", "3"]) is None


def test_inspect_lists_each_tasks_own_classes(prepared_synthetic):
    import json

    output = invoke("inspect", str(prepared_synthetic.shards))
    classes = json.loads((prepared_synthetic.shards / "classes.json").read_text())
    own = [classes["names"][i] for i in classes["tasks"]["v2"]["ids"]]
    assert len(own) < len(classes["names"])  # the 2-class set: not the unified list
    assert f"v2: {len(own)} classes (with background): {', '.join(own)}" in output
