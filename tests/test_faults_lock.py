"""One writer per output folder (`ddeseg.runlock`): a live holder is refused with its pid, host and
start time; a dead one's lock is taken over with a warning; `prepare`, `build-memory-bank` and
`train` hold the lock while they write."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ddeseg.config import load_config
from ddeseg.distributed import DistributedContext
from ddeseg.pipelines.build_memory_bank import MemoryBankPaths, build_memory_bank
from ddeseg.pipelines.prepare import PreparePaths, prepare
from ddeseg.pipelines.train import TrainRequest, train
from ddeseg.runlock import LOCK_FILE, FolderLockedError, acquire, read_lock, release, writer_lock
from ddeseg.stage import RunOptions


@pytest.fixture
def live_process():
    """Another live process on this host (the would-be holder of a lock)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield process
    process.kill()
    process.wait()


def _lock_for(folder: Path, pid: int, host: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_FILE).write_text(
        json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-02 03:04:05 UTC", "command": "ddeseg train"})
    )


def test_a_live_holder_is_refused_naming_pid_host_and_start(tmp_path, live_process):
    _lock_for(tmp_path / "run", live_process.pid)
    with pytest.raises(FolderLockedError, match=rf"pid {live_process.pid} on {socket.gethostname()}, started 2026-01-02 03:04:05 UTC"):
        acquire(tmp_path / "run", "ddeseg train")
    assert read_lock(tmp_path / "run")["pid"] == live_process.pid  # not taken


def test_a_dead_holders_lock_is_taken_over_with_a_warning(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _lock_for(tmp_path / "run", dead.pid)
    record = acquire(tmp_path / "run", "ddeseg train")
    assert "taking over the lock of a process that is gone" in capsys.readouterr().err
    assert read_lock(tmp_path / "run")["started"] == record["started"]
    release(tmp_path / "run", record)
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_a_lock_from_another_host_is_refused_with_the_file_to_delete(tmp_path):
    _lock_for(tmp_path / "run", 1, host="some-other-node")
    with pytest.raises(FolderLockedError, match=rf"on some-other-node.*delete {tmp_path / 'run' / LOCK_FILE}"):
        acquire(tmp_path / "run", "ddeseg train")


def test_the_lock_is_released_and_a_created_empty_folder_removed(tmp_path):
    with writer_lock(tmp_path / "new", "ddeseg prepare"):
        assert (tmp_path / "new" / LOCK_FILE).is_file()
        with pytest.raises(FolderLockedError):  # the same process, a second writer
            acquire(tmp_path / "new", "ddeseg prepare")
    assert not (tmp_path / "new").exists()


def test_train_prepare_and_memory_bank_refuse_a_folder_a_live_process_writes(
    tmp_path, live_process, prepared_synthetic, micro_config_overrides
):
    bank = tmp_path / "bank.npy"
    np.save(bank, np.zeros((3, 2, 192), dtype=np.float32))
    config = load_config(prepared_synthetic.config, micro_config_overrides + ["train.steps=2"])

    _lock_for(tmp_path / "run", live_process.pid)
    request = TrainRequest(shards_dir=prepared_synthetic.shards, memory_bank=bank, out_dir=tmp_path / "run")
    with pytest.raises(FolderLockedError, match=f"pid {live_process.pid}"):
        train(config, request, DistributedContext())
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_FILE]  # nothing written

    _lock_for(tmp_path / "shards", live_process.pid)
    with pytest.raises(FolderLockedError, match=f"pid {live_process.pid}"):
        prepare(config, PreparePaths(layout="ddeseg", root=prepared_synthetic.raw, out=tmp_path / "shards", tasks=["v2"]), RunOptions(progress=False))
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [LOCK_FILE]

    _lock_for(tmp_path / "bank", live_process.pid)
    with pytest.raises(FolderLockedError, match=f"pid {live_process.pid}"):
        build_memory_bank(config, MemoryBankPaths(shards=prepared_synthetic.shards, out=tmp_path / "bank"), RunOptions(progress=False))
    assert sorted(p.name for p in (tmp_path / "bank").iterdir()) == [LOCK_FILE]
