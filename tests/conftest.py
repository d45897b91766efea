"""Shared fixtures: one tiny synthetic dataset, prepared once per test session.

`prepared_synthetic` runs the real stages (`ddeseg synth` layout `ddeseg`, task v2, 2 classes,
64 px frames; `ddeseg prepare`) so the trainer, evaluation and demo tests read what users read.
`micro_config_overrides` shrinks `configs/demo.yaml` to a model that steps in tens of ms.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"

# Every module of DDESeg at small widths (see tests/test_model_behaviour.py's MICRO).
MICRO_OVERRIDES = [
    "model.num_classes=3",
    "model.audio_embed_dim=192",
    "model.derived_semantics=2",
    "model.head_embedding_dim=16",
    "model.frontend.mel_bins=32",
    "model.audio.spec_size=64",
    "model.audio.embed_dim=24",
    "model.audio.num_classes=2",
    "model.visual.in_channels=[16,32,64,128]",
    "model.visual.num_heads=[1,2,4,8]",
    "data.image_size=32",
    "data.batch_size=4",
    "data.eval_batch_size=4",
    "data.num_workers=0",
    "data.shuffle_buffer=8",
    "data.samples_per_shard=16",
    "train.warmup_steps=2",
    "train.base_lr=1e-3",
    "train.log_every=2",
    "train.eval_every=4",
    "train.checkpoint_every=4",
]


@dataclass(frozen=True)
class PreparedDataset:
    raw: Path
    shards: Path
    config: Path  # configs/demo.yaml; use with MICRO_OVERRIDES


@pytest.fixture(scope="session")
def micro_config_overrides() -> list[str]:
    return list(MICRO_OVERRIDES)


@pytest.fixture(scope="session")
def prepared_synthetic(tmp_path_factory) -> PreparedDataset:
    from ddeseg.config import load_config
    from ddeseg.pipelines.prepare import PreparePaths, prepare
    from ddeseg.pipelines.synth import generate
    from ddeseg.stage import RunOptions

    root = tmp_path_factory.mktemp("synthetic")
    raw = generate("ddeseg", root / "raw", videos=8, classes=2, seed=3, image_size=64, tasks=["v2"])
    config = load_config(DEMO_CONFIG, MICRO_OVERRIDES)
    prepare(config, PreparePaths(layout="ddeseg", root=raw, out=root / "shards", tasks=["v2"]), RunOptions(progress=False))
    return PreparedDataset(raw=raw, shards=root / "shards", config=DEMO_CONFIG)


@pytest.fixture(scope="module")
def one_torch_thread():
    """The micro model is fastest on one thread: on a shared 2-core machine a second OpenMP
    thread that waits for a busy core makes a forward pass much slower (see tests/test_predict.py)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def invoke_cli(*args: str) -> str:
    """Run `ddeseg ARGS` in-process; re-raise an error it raised, require exit 0; its output."""
    from typer.testing import CliRunner

    from ddeseg.cli.app import app

    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.output
