"""Every stage has the same shape: a config section per stage, `--set section.key=value` on every
command that reads a config, the commands' stage options as aliases of its keys, and the
resolved config in every output folder (`config.yaml`).

Precedence, lowest first: built-in defaults, the config file, `--set`, the command's option.
(evaluate and predict: tests/test_evaluate.py and tests/test_predict.py; the demo's folders:
tests/test_demo.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from conftest import DEMO_CONFIG, MICRO_OVERRIDES
from test_memory_bank import DIM, CountingEmbedder, build_bank, write_tiny_shards

from ddeseg.cli.app import main
from ddeseg.cli.options import stage_overrides
from ddeseg.config import Config, ConfigError, load_config, to_dict
from ddeseg.pipelines.synth import generate


def run_cli(monkeypatch, capsys, *argv: str) -> tuple[int, str]:
    """`ddeseg ARGV` as a user runs it; (exit status, stderr)."""
    monkeypatch.setattr("sys.argv", ["ddeseg", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    code = exit_info.value.code
    return (0 if code is None else code), capsys.readouterr().err


def read_yaml(path) -> dict:
    return yaml.safe_load(path.read_text())


# --------------------------------------------------------------------------------------------
# The sections and the precedence
# --------------------------------------------------------------------------------------------


def test_the_stage_sections_hold_the_options_defaults_of_before():
    """The values the commands' options defaulted to before they became aliases (hand-copied from
    the old option definitions): a user sees no change."""
    config = to_dict(Config())
    assert config["prepare"] == {"workers": 1, "on_error": "skip", "export_bbox_json": False, "avsbench_part": "auto"}
    assert config["memory_bank"] == {
        "k": 128, "niter": 25, "nredo": 1, "seed": 0, "spherical": False, "include_multi_source": False,
        "silence_row": False, "allow_missing_classes": False, "missing_fill": "global_mean", "batch_size": 64,
    }  # fmt: skip
    assert config["eval"] == {"split": "test", "pictures": 16, "worst_frames": 16, "audio_control": "none"}
    assert config["predict"] == {"frames_per_second": 1.0, "batch_size": 8, "allow_no_audio": False, "overlay_video": "source"}


def test_an_option_beats_set_which_beats_the_file_which_beats_the_default(tmp_path):
    file = tmp_path / "cfg.yaml"
    file.write_text("memory_bank:\n  k: 5\n  spherical: true\n")

    def k_of(path, sets, flag):
        return load_config(path, stage_overrides(sets, {"memory_bank.k": flag})).memory_bank.k

    assert k_of(None, [], None) == 128
    assert k_of(file, [], None) == 5
    assert k_of(file, ["memory_bank.k=6"], None) == 6
    assert k_of(file, ["memory_bank.k=6"], 7) == 7
    assert k_of(None, [], 7) == 7
    # an option not given leaves the file's value (a flag that is off is None, not False)
    resolved = load_config(file, stage_overrides([], {"memory_bank.spherical": None, "prepare.on_error": None}))
    assert resolved.memory_bank.spherical is True and resolved.prepare.on_error == "skip"


def test_alias_values_survive_the_round_trip_through_yaml():
    from enum import Enum

    class Choice(str, Enum):
        zeros = "zeros"

    overrides = stage_overrides([], {"memory_bank.missing_fill": Choice.zeros, "predict.frames_per_second": 0.5,
                                     "memory_bank.silence_row": True, "eval.split": "val", "task": "VPO-MS"})  # fmt: skip
    config = load_config(None, overrides)
    assert config.memory_bank.missing_fill == "zeros" and config.predict.frames_per_second == 0.5
    assert config.memory_bank.silence_row is True and config.eval.split == "val" and config.task == "VPO-MS"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("prepare.on_error=maybe", "prepare.on_error must be one of skip, fail"),
        ("prepare.workers=0", "prepare.workers must be >= 1"),
        ("prepare.avsbench_part=both", "prepare.avsbench_part must be one of"),
        ("memory_bank.k=0", "memory_bank.k must be >= 1"),
        ("memory_bank.missing_fill=ones", "memory_bank.missing_fill must be one of global_mean, zeros"),
        ("eval.split=dev", "eval.split must be one of train, val, test"),
        ("eval.audio_control=loud", "eval.audio_control must be one of none, shuffled, silent"),
        ("eval.pictures=-1", "eval.pictures must be >= 0"),
        ("predict.frames_per_second=0", "predict.frames_per_second must be > 0"),
        ("predict.batch_size=0", "predict.batch_size must be >= 1"),
    ],
)
def test_a_bad_stage_value_is_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert key in str(error.value) and "\n" not in str(error.value)


# --------------------------------------------------------------------------------------------
# --set on every command: a bad key is exit 2 with one line, before anything is written
# --------------------------------------------------------------------------------------------


def _command_lines(tmp_path) -> dict[str, list[str]]:
    shards, out = tmp_path / "shards", tmp_path / "out"
    shards.mkdir()
    config = tmp_path / "cfg.yaml"
    config.write_text("task: v2\n")
    bank = tmp_path / "bank.npy"
    np.save(bank, np.zeros((2, 1, 4), np.float32))
    return {
        "prepare": ["prepare", "--layout", "avsbench", "--root", str(tmp_path), "--out", str(out)],
        "build-memory-bank": ["build-memory-bank", "--shards", str(shards), "--out", str(out)],
        "pretrain-audio": ["pretrain-audio", "--shards", str(shards), "--config", str(config), "--out", str(out)],
        "train": ["train", "--config", str(config), "--shards", str(shards), "--memory-bank", str(bank), "--out", str(out)],
        "evaluate": ["evaluate", "--checkpoint", str(tmp_path / "best.pt"), "--shards", str(shards), "--out", str(out)],
        "predict": ["predict", "--checkpoint", str(tmp_path / "best.pt"), str(tmp_path / "clip.mp4"), "--out", str(out)],
        "demo": ["demo", "--out", str(out)],
    }


@pytest.mark.parametrize("command", ["prepare", "build-memory-bank", "pretrain-audio", "train", "evaluate", "predict", "demo"])
@pytest.mark.parametrize("override", ["nosuch.key=1", "eval.nosuch=1", "memory_bank.k=many"])
def test_every_command_refuses_a_bad_set_on_one_line(tmp_path, monkeypatch, capsys, command, override):
    argv = _command_lines(tmp_path)[command]
    code, err = run_cli(monkeypatch, capsys, *argv, "--set", override)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert ("nosuch" in lines[0]) if "nosuch" in override else ("memory_bank.k" in lines[0] and "integer" in lines[0])
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return generate("avsbench", tmp_path_factory.mktemp("raw") / "avsbench", videos=6, classes=3, seed=2, image_size=32, tasks=["v1s"])


def test_prepare_settings_come_from_the_config_set_and_options(raw, tmp_path, monkeypatch, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text("prepare:\n  workers: 2\ndata:\n  samples_per_shard: 8\n")
    base = ["prepare", "--layout", "avsbench", "--root", str(raw), "--config", str(config), "--device", "cpu", "--quiet"]

    # the file decides the workers; --set turns on the bbox export
    first = tmp_path / "first"
    code, err = run_cli(monkeypatch, capsys, *base, "--out", str(first), "--set", "prepare.export_bbox_json=true")
    assert code == 0, err
    assert json.loads((first / "prepare.json").read_text())["workers"] == 2
    assert sorted(p.name for p in (first / "bbox").iterdir()) == ["avss_bbox_orisize.json"]
    written = read_yaml(first / "config.yaml")
    assert written["prepare"] == {"workers": 2, "on_error": "skip", "export_bbox_json": True, "avsbench_part": "auto"}
    assert written["data"]["samples_per_shard"] == 8
    assert load_config(first / "config.yaml") == load_config(config, ["prepare.export_bbox_json=true"])
    assert written == json.loads((first / "prepare.json").read_text())["config"]

    # a re-run into the same folder keeps every byte of config.yaml (idempotent)
    before = (first / "config.yaml").read_bytes()
    code, err = run_cli(monkeypatch, capsys, *base, "--out", str(first), "--set", "prepare.export_bbox_json=true")
    assert code == 0, err
    assert (first / "config.yaml").read_bytes() == before

    # the option beats the file; without the --set there is no bbox export (the default)
    second = tmp_path / "second"
    code, err = run_cli(monkeypatch, capsys, *base, "--out", str(second), "--workers", "1")
    assert code == 0, err
    assert json.loads((second / "prepare.json").read_text())["workers"] == 1
    assert read_yaml(second / "config.yaml")["prepare"]["workers"] == 1 and not (second / "bbox").exists()


# --------------------------------------------------------------------------------------------
# build-memory-bank (re-clustering a cache: no model needed)
# --------------------------------------------------------------------------------------------


def test_memory_bank_settings_come_from_the_config_set_and_options(tmp_path, monkeypatch, capsys):
    shards, bank_dir = tmp_path / "shards", tmp_path / "bank"
    write_tiny_shards(shards, per_class=4)
    build_bank(shards, bank_dir, k=2, task="v2", embed_fn=CountingEmbedder(), device="cpu", progress=False)
    config = tmp_path / "cfg.yaml"
    config.write_text("task: v2\nmemory_bank:\n  k: 1\n")
    base = ["build-memory-bank", "--shards", str(shards), "--out", str(bank_dir), "--reuse-embeddings", "--device", "cpu", "--quiet"]

    def k_after(*extra: str) -> int:
        code, err = run_cli(monkeypatch, capsys, *base, *extra)
        assert code == 0, err
        k = np.load(bank_dir / "bank.npy").shape[1]
        assert json.loads((bank_dir / "bank.json").read_text())["settings"]["k"] == k
        assert load_config(bank_dir / "config.yaml").memory_bank.k == k
        return k

    assert k_after("--task", "v2", "--set", "memory_bank.k=3") == 3
    assert k_after("--config", str(config)) == 1
    assert k_after("--config", str(config), "--k", "2") == 2
    assert k_after("--config", str(config), "--set", "memory_bank.k=3") == 3
    assert k_after("--config", str(config), "--set", "memory_bank.k=3", "--k", "2") == 2
    assert np.load(bank_dir / "bank.npy").shape == (4, 2, DIM)
    # a flag that is off leaves the config's value: spherical from --set is kept
    code, err = run_cli(monkeypatch, capsys, *base, "--config", str(config), "--set", "memory_bank.spherical=true")
    assert code == 0, err
    assert json.loads((bank_dir / "bank.json").read_text())["settings"]["spherical"] is True
    assert np.allclose(np.linalg.norm(np.load(bank_dir / "bank.npy"), axis=-1), 1.0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# pretrain-audio
# --------------------------------------------------------------------------------------------


def test_pretrain_audio_takes_set_and_writes_its_config(prepared_synthetic, tmp_path, monkeypatch, capsys):
    out = tmp_path / "audio"
    sets = [item for override in MICRO_OVERRIDES for item in ("--set", override)]
    code, err = run_cli(
        monkeypatch, capsys, "pretrain-audio", "--shards", str(prepared_synthetic.shards), "--config", str(DEMO_CONFIG),
        "--out", str(out), "--device", "cpu", "--quiet", *sets, "--set", "pretrain_audio.steps=2", "--set", "pretrain_audio.log_every=1",
    )  # fmt: skip
    assert code == 0, err
    steps = [json.loads(line).get("step") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(step for step in steps if step is not None) == 2
    written = load_config(out / "config.yaml")
    assert written.pretrain_audio.steps == 2 and written.pretrain_audio.log_every == 1
