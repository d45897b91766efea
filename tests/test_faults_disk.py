"""A full disk (ENOSPC) while writing: one line naming the folder (and the bytes needed where
known), the earlier files intact and no temporary file left, and a re-run with space resumes.
The disk is "full" at the N-th flush of a chosen file (`os.fsync` raising ENOSPC, as a real file
system may report it there or at the write); test_faults_train.py covers the training checkpoints."""

from __future__ import annotations

import errno
import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pytest
from test_memory_bank import CountingEmbedder, build_bank, write_tiny_shards

from ddeseg.config import load_config
from ddeseg.fileio import DiskFullError, write_bytes_atomic
from ddeseg.pipelines.prepare import PreparePaths, prepare
from ddeseg.stage import RunOptions


def _fsync_fails_for(monkeypatch, marker: str, on_call: int) -> None:
    """`os.fsync` raises ENOSPC on its `on_call`-th call for a file whose path holds `marker`."""
    original = os.fsync
    calls = {"n": 0}

    def fsync(descriptor: int) -> None:
        if marker in os.readlink(f"/proc/self/fd/{descriptor}"):
            calls["n"] += 1
            if calls["n"] == on_call:
                raise OSError(errno.ENOSPC, "No space left on device")
        original(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_an_atomic_write_on_a_full_disk_keeps_the_old_file_and_says_what_it_needed(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    target.write_bytes(b"the good checkpoint")
    _fsync_fails_for(monkeypatch, "last.pt", on_call=1)
    with pytest.raises(DiskFullError, match=rf"disk full writing last\.pt in {re.escape(str(tmp_path))}, needs 2\.0 KiB, .* free"):
        write_bytes_atomic(target, b"x" * 2048)
    assert target.read_bytes() == b"the good checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_prepare_on_a_full_disk_keeps_finished_shards_and_a_rerun_completes_them(
    tmp_path, monkeypatch, prepared_synthetic, micro_config_overrides
):
    config = load_config(prepared_synthetic.config, micro_config_overrides)
    out = tmp_path / "shards"
    paths = PreparePaths(layout="ddeseg", root=prepared_synthetic.raw, out=out, tasks=["v2"])
    _fsync_fails_for(monkeypatch, ".tar.", on_call=2)  # the second shard tar (not its state file)
    with pytest.raises(DiskFullError, match=rf"disk full writing shard-\d+\.tar in {re.escape(str(out))}/v2/\w+, .*run the same command again"):
        prepare(config, paths, RunOptions(progress=False))
    finished = sorted(p.name for p in out.rglob("shard-*.tar"))
    assert len(finished) == 1
    assert not [p for p in out.rglob("*") if ".tmp" in p.name], "no temporary file is left on the full disk"
    first = _hashes(out)
    monkeypatch.undo()
    result = prepare(config, paths, RunOptions(progress=False))
    assert result.shards_kept == 1
    after = _hashes(out)
    assert {name: after[name] for name in first if name.endswith(".tar")} == {name: first[name] for name in first if name.endswith(".tar")}
    reference = _hashes(prepared_synthetic.shards)
    tars = [name for name in reference if name.endswith(".tar")]
    assert {name: after[name] for name in tars} == {name: reference[name] for name in tars}  # the same shards as one clean run
    assert after["manifest.parquet"] == reference["manifest.parquet"]


def test_memory_bank_on_a_full_disk_keeps_the_earlier_bank(tmp_path, monkeypatch):
    shards, bank_dir = tmp_path / "shards", tmp_path / "bank"
    write_tiny_shards(shards, per_class=6)
    settings = {"k": 2, "task": "v2", "embed_fingerprint": "proj-1", "batch_size": 4, "device": "cpu", "progress": False}
    build_bank(shards, bank_dir, embed_fn=CountingEmbedder(), **settings)
    before = _hashes(bank_dir)
    _fsync_fails_for(monkeypatch, "/.bank.npy", on_call=1)
    with pytest.raises(DiskFullError, match=rf"in {re.escape(str(bank_dir))}"):
        build_bank(shards, bank_dir, embed_fn=CountingEmbedder(), seed=1, **settings)
    assert {name: _hashes(bank_dir)[name] for name in ("bank.npy", "bank.json")} == {name: before[name] for name in ("bank.npy", "bank.json")}
    assert not [p for p in bank_dir.iterdir() if ".tmp" in p.name]
    monkeypatch.undo()
    build_bank(shards, bank_dir, embed_fn=CountingEmbedder(), seed=1, **settings)
    assert np.load(bank_dir / "bank.npy").shape == (4, 2, 5)
