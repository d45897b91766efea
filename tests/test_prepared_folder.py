"""A broken prepared folder is one line naming the file and what to do, exit 2, in every command
that reads it (they all read it through `ddeseg.data.shards.ShardIndex`); and a `--device` that
is no device or a GPU this machine lacks is refused the same way, before any work."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddeseg.config import load_config, to_dict
from ddeseg.data import schema
from ddeseg.data.shards import ShardIndex, read_classes_file
from ddeseg.data.stream import read_shard_samples
from ddeseg.errors import DataError
from ddeseg.models import build_model
from ddeseg.training.checkpoint import FORMAT, atomic_torch_save


def run_main(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """`ddeseg ARGV` through the real entry point: (exit code, stderr)."""
    from ddeseg.cli.app import main

    monkeypatch.setattr(sys, "argv", ["ddeseg", *argv])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main()
    code = exit_info.value.code
    return (0 if code is None else int(code)), capsys.readouterr().err


def assert_one_line_naming(code: int, err: str, path: Path) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and str(path) in lines[0], err
    assert "Traceback" not in err


def _delete(path: Path) -> None:
    path.unlink()


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BREAKAGES = {
    "classes.json deleted": (schema.CLASSES_FILE, _delete),
    "classes.json truncated": (schema.CLASSES_FILE, _cut_in_half),
    "classes.json empty": (schema.CLASSES_FILE, _empty),
    "manifest.parquet empty": (schema.MANIFEST_FILE, _empty),
    "manifest.parquet truncated": (schema.MANIFEST_FILE, _cut_in_half),
}


@pytest.fixture
def folder(prepared_synthetic, tmp_path) -> Path:
    """A private copy of the session's prepared folder, free to break."""
    return Path(shutil.copytree(prepared_synthetic.shards, tmp_path / "shards"))


@pytest.fixture(scope="module")
def checkpoint(prepared_synthetic, micro_config_overrides, tmp_path_factory) -> Path:
    """An untrained checkpoint of the micro model for the prepared synthetic v2 task."""
    config = load_config(prepared_synthetic.config, micro_config_overrides)
    torch.manual_seed(0)
    model = build_model(config.model)
    model.set_memory_bank(np.zeros((3, 2, config.model.audio_embed_dim), dtype=np.float32))
    payload = {"format": FORMAT, "model": model.state_dict(), "config": to_dict(config), "classes": [], "step": 0}
    return atomic_torch_save(payload, tmp_path_factory.mktemp("checkpoint") / "last.pt")


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_inspect_names_the_broken_file(breakage, folder, monkeypatch, capsys):
    name, damage = BREAKAGES[breakage]
    damage(folder / name)
    code, err = run_main(["inspect", str(folder)], monkeypatch, capsys)
    assert_one_line_naming(code, err, folder / name)


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_pretrain_audio_names_the_broken_file(breakage, folder, prepared_synthetic, tmp_path, monkeypatch, capsys):
    name, damage = BREAKAGES[breakage]
    damage(folder / name)
    argv = ["pretrain-audio", "--shards", str(folder), "--config", str(prepared_synthetic.config),
            "--out", str(tmp_path / "run"), "--device", "cpu"]  # fmt: skip
    code, err = run_main(argv, monkeypatch, capsys)
    assert_one_line_naming(code, err, folder / name)
    assert not (tmp_path / "run").exists()  # refused before any work


@pytest.mark.parametrize("breakage", ["classes.json deleted", "classes.json truncated", "manifest.parquet truncated"])
def test_evaluate_names_the_broken_file(breakage, folder, checkpoint, tmp_path, monkeypatch, capsys):
    name, damage = BREAKAGES[breakage]
    damage(folder / name)
    argv = ["evaluate", "--checkpoint", str(checkpoint), "--shards", str(folder), "--out", str(tmp_path / "eval"),
            "--split", "val", "--device", "cpu"]  # fmt: skip
    code, err = run_main(argv, monkeypatch, capsys)
    assert_one_line_naming(code, err, folder / name)
    assert not (tmp_path / "eval" / "eval.json").exists()


def test_the_untouched_copy_evaluates(folder, checkpoint, tmp_path, monkeypatch, capsys):
    """The control for the cases above: the same command on the intact copy succeeds."""
    argv = ["evaluate", "--checkpoint", str(checkpoint), "--shards", str(folder), "--out", str(tmp_path / "eval"),
            "--split", "val", "--device", "cpu", "--pictures", "0", "--worst", "0"]  # fmt: skip
    code, err = run_main(argv, monkeypatch, capsys)
    assert code == 0, err
    assert (tmp_path / "eval" / "eval.json").is_file()


def test_build_memory_bank_names_a_truncated_class_list(folder, tmp_path, monkeypatch, capsys):
    _cut_in_half(folder / schema.CLASSES_FILE)
    argv = ["build-memory-bank", "--shards", str(folder), "--k", "2", "--out", str(tmp_path / "bank"), "--device", "cpu"]
    code, err = run_main(argv, monkeypatch, capsys)
    assert_one_line_naming(code, err, folder / schema.CLASSES_FILE)


@pytest.mark.parametrize("command", ["prepare", "pretrain-audio"])
@pytest.mark.parametrize("device", ["gpu", "cuda:3"])
def test_a_device_that_is_not_there_is_refused_before_work(
    command, device, prepared_synthetic, tmp_path, monkeypatch, capsys
):
    # Pretend a machine without CUDA whatever this one has, so `cuda:3` is always missing.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    out = tmp_path / "out"
    if command == "prepare":
        argv = ["prepare", "--layout", "ddeseg", "--root", str(prepared_synthetic.raw), "--out", str(out), "--tasks", "v2"]
    else:
        argv = ["pretrain-audio", "--shards", str(prepared_synthetic.shards), "--config", str(prepared_synthetic.config),
                "--out", str(out)]  # fmt: skip
    code, err = run_main([*argv, "--device", device], monkeypatch, capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and f"--device {device!r}" in err, err
    assert "cpu" in err  # says what to use instead
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# The reader's own answers
# --------------------------------------------------------------------------------------------


def test_the_index_answers_the_task_protocol(prepared_synthetic):
    index = ShardIndex(prepared_synthetic.shards)
    doc = read_classes_file(prepared_synthetic.shards / schema.CLASSES_FILE)
    ids = doc["tasks"]["v2"]["ids"]
    assert index.num_outputs("v2") == len(ids) == doc["tasks"]["v2"]["num_classes"]
    assert index.task_class_names("v2") == [doc["names"][i] for i in ids]
    lut = index.label_lut("v2")
    assert [int(lut[unified]) for unified in ids] == list(range(len(ids)))
    assert lut[schema.IGNORE_INDEX] == schema.IGNORE_INDEX
    # one output: every class is foreground, background and ignore stay
    binary = index.label_lut("v2", num_classes=1)
    assert binary[0] == 0 and binary[schema.IGNORE_INDEX] == schema.IGNORE_INDEX
    assert {int(binary[unified]) for unified in ids[1:]} == {1}
    with pytest.raises(DataError, match="task 'VPO-SS' was not prepared"):
        index.protocol("VPO-SS")


def test_one_tar_path_reads_every_sample_and_names_a_cut_shard(folder):
    index = ShardIndex(folder)
    shards = index.shards("v2", "train")
    keys = [sample["__key__"] for sample in read_shard_samples(shards)]
    expected = [row["key"] for row in index.manifest_rows(["key", "split"]) if row["split"] == "train"]
    assert expected and sorted(keys) == sorted(expected)
    _cut_in_half(Path(shards[0]))
    with pytest.raises(DataError, match=rf"{shards[0]}.*truncated tar"):
        list(read_shard_samples(shards))


def test_predict_class_files_go_through_the_same_parser(tmp_path):
    names = tmp_path / "names.json"
    names.write_text('["background", "dog"]')
    assert read_classes_file(names, allow_name_list=True) == ["background", "dog"]
    assert read_classes_file(names) == {"names": ["background", "dog"]}
    names.write_text('{"names": ["background"')
    with pytest.raises(DataError, match=rf"{names} is not valid JSON"):
        read_classes_file(names, allow_name_list=True)
    names.write_text('{"labels": []}')
    with pytest.raises(DataError, match="not a class list"):
        read_classes_file(names)
