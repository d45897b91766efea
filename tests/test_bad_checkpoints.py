"""Files that are not checkpoints, given wherever a command reads one: one `CheckpointError` line
naming the file (exit 2 through the CLI), never a traceback and never PyTorch's advice to retry
with `weights_only=False` (which would run a stranger's code).

Commands: evaluate, predict, train --init, prepare --audio-checkpoint, build-memory-bank
--audio-checkpoint. Each reads through `ddeseg.models.weights.read_checkpoint_file`.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from ddeseg.cli.app import _one_line, app
from ddeseg.errors import CheckpointError, DDESegError
from ddeseg.models.weights import read_checkpoint_file
from ddeseg.training.checkpoint import load_training_checkpoint

REPO = Path(__file__).resolve().parents[1]
ADVICE = "weights_only=False"


class _Gadget:  # a pickled object: what a weights-only load must refuse
    pass


def write_bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the message must say about it)."""
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, tuple[Path, str]] = {}

    def add(name: str, path: Path, says: str) -> None:
        files[name] = (path, says)

    text = folder / "notes.txt"
    text.write_text("these are my notes\nnot a checkpoint\n")
    add("text", text, "not a PyTorch checkpoint (a text file")
    yaml = folder / "config.yaml"
    yaml.write_text((REPO / "configs" / "tiny.yaml").read_text())
    add("config.yaml", yaml, "not a PyTorch checkpoint (a text file")
    noise = folder / "noise.pt"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    add("random bytes", noise, "not a PyTorch checkpoint (binary data")
    array = folder / "bank.npy"
    np.save(array, np.zeros((3, 2, 4), np.float32))
    add(".npy", array, "not a PyTorch checkpoint (a NumPy .npy array")
    table = folder / "manifest.parquet"
    pq.write_table(pa.table({"key": ["a", "b"]}), table)
    add(".parquet", table, "not a PyTorch checkpoint (a Parquet table")
    empty = folder / "empty.pt"
    empty.write_bytes(b"")
    add("empty", empty, "empty file (0 bytes)")
    whole = folder / "whole.pt"
    torch.save({"model": {"w": torch.arange(4096.0)}}, whole)
    truncated = folder / "truncated.pt"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    add("truncated", truncated, "truncated or corrupt PyTorch checkpoint")
    gadget = folder / "gadget.pth"
    with gadget.open("wb") as handle:
        pickle.dump({"model": _Gadget()}, handle, protocol=2)
    add("pickled object", gadget, "pickled Python object")
    directory = folder / "run"
    directory.mkdir(exist_ok=True)
    add("directory", directory, "a folder, not a checkpoint file")
    return files


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    return write_bad_files(tmp_path_factory.mktemp("bad-checkpoints"))


def test_the_safe_loader_names_the_file_and_what_it_is(bad_files):
    for name, (path, says) in bad_files.items():
        for load in (read_checkpoint_file, load_training_checkpoint):
            with pytest.raises(CheckpointError) as caught:
                load(path)
            message = str(caught.value)
            assert message.startswith(f"{path}: "), (name, message)
            assert says in message, (name, message)
            assert "\n" not in message and ADVICE not in message and "weights_only" not in message, (name, message)


def test_a_good_checkpoint_still_loads(tmp_path):
    path = tmp_path / "ok.pt"
    torch.save({"model": {"w": torch.ones(3)}, "array": np.arange(3)}, path)
    payload = read_checkpoint_file(path)
    assert torch.equal(payload["model"]["w"], torch.ones(3)) and payload["array"].tolist() == [0, 1, 2]


def invoke(*args: str) -> tuple[int, str]:
    """`ddeseg ARGS` as `ddeseg.cli.app.main` runs it: a `DDESegError` is exit 2 and one line."""
    result = CliRunner().invoke(app, list(args), catch_exceptions=True)
    if isinstance(result.exception, DDESegError):
        return 2, f"error: {_one_line(result.exception)}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def command_lines(tmp_path_factory, prepared_synthetic, micro_config_overrides) -> dict[str, Callable[[str], list[str]]]:
    """Per command, a function of the checkpoint path giving a command line that reads it first."""
    root = tmp_path_factory.mktemp("commands")
    bank = root / "bank.npy"
    np.save(bank, np.random.default_rng(0).standard_normal((3, 2, 192)).astype(np.float32))
    micro = [arg for override in micro_config_overrides for arg in ("--set", override)]
    shards, config, out = str(prepared_synthetic.shards), str(prepared_synthetic.config), root / "out"
    return {
        "evaluate": lambda ckpt: ["evaluate", "--checkpoint", ckpt, "--shards", shards, "--out", str(out / "eval")],
        "predict": lambda ckpt: ["predict", "--checkpoint", ckpt, str(root / "clip.mp4"), "--out", str(out / "pred"),
                                 "--quiet"],
        "train --init": lambda ckpt: ["train", "--config", config, *micro, "--shards", shards, "--memory-bank",
                                      str(bank), "--out", str(out / "run"), "--steps", "1", "--init", ckpt,
                                      "--device", "cpu"],
        "prepare --audio-checkpoint": lambda ckpt: ["prepare", "--layout", "ddeseg", "--root",
                                                    str(prepared_synthetic.raw), "--out", str(out / "shards"),
                                                    "--tasks", "v2", "--config", config, *micro,
                                                    "--audio-checkpoint", ckpt],
        "build-memory-bank --audio-checkpoint": lambda ckpt: ["build-memory-bank", "--shards", shards, "--task", "v2",
                                                              "--k", "2", "--config", config, *micro, "--out",
                                                              str(out / "bank"), "--audio-checkpoint", ckpt,
                                                              "--device", "cpu"],
    }


# train, prepare and build-memory-bank declare their checkpoint option `dir_okay=False`: Typer
# refuses a folder itself (exit 2, naming it) before ddeseg runs.
TYPER_CHECKS_FOLDERS = {"train --init", "prepare --audio-checkpoint", "build-memory-bank --audio-checkpoint"}


@pytest.mark.parametrize(
    "command",
    ["evaluate", "predict", "train --init", "prepare --audio-checkpoint", "build-memory-bank --audio-checkpoint"],
)
def test_every_command_refuses_a_file_that_is_not_a_checkpoint(command, command_lines, bad_files, prepared_synthetic):
    before = tree_digest(prepared_synthetic.shards)
    for name, (path, says) in bad_files.items():
        if name == "directory" and command in TYPER_CHECKS_FOLDERS:
            continue
        code, output = invoke(*command_lines[command](str(path)))
        assert code == 2, (command, name, output)
        lines = [line for line in output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"error: {path}: ") and says in lines[0], (command, name, output)
        assert ADVICE not in output, (command, name, output)
    line = command_lines[command]("x")
    out = Path(line[line.index("--out") + 1])
    assert not out.exists(), f"{command} created {out} for a bad checkpoint"
    assert tree_digest(prepared_synthetic.shards) == before


def test_through_the_real_entry_point(bad_files, tmp_path):
    """`python -m ddeseg predict` with a PyTorch-advice-provoking file: stderr is one line, exit 2."""
    path, says = bad_files[".npy"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    finished = subprocess.run(
        [sys.executable, "-m", "ddeseg", "predict", "--checkpoint", str(path), "clip.mp4", "--out", str(tmp_path / "p")],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO,
    )
    assert finished.returncode == 2, finished.stderr
    (line,) = finished.stderr.strip().splitlines()
    assert line.startswith(f"error: {path}: ") and says in line and ADVICE not in finished.stderr + finished.stdout
    assert not (tmp_path / "p").exists()
