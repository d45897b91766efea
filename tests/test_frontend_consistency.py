"""`ddeseg prepare --audio-checkpoint`: shards whose log-mels use a checkpoint's filterbank.

The official model's mel filterbank comes from the HTS-AT checkpoint it loads (its yaml's
`fmax: 50` gives NaNs), so shards for a model initialised from that checkpoint must be made with
the checkpoint's filterbank. The fake HTS-AT checkpoint here is our micro model's audio backbone
with another filterbank (fmax 4 kHz instead of Nyquist) and halved STFT kernels, saved under the
key names of each format `load_checkpoint` reads. Expected log-mels come from the model itself
after `load_checkpoint` of that file; expected fingerprints from hashlib over numpy bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import DEMO_CONFIG, MICRO_OVERRIDES
from typer.testing import CliRunner

from ddeseg.config import load_config
from ddeseg.data import schema
from ddeseg.data.schema import decode_array
from ddeseg.data.shards import ShardIndex, check_frontend
from ddeseg.data.stream import read_shard_samples
from ddeseg.errors import CheckpointError, DDESegError
from ddeseg.models import build_model, load_checkpoint
from ddeseg.models.frontend import mel_filterbank
from ddeseg.models.weights import frontend_state_from_checkpoint
from ddeseg.pipelines.prepare import PreparePaths, prepare
from ddeseg.stage import RunOptions

CONFIG = load_config(DEMO_CONFIG, MICRO_OVERRIDES)


def _sha256(array: np.ndarray | torch.Tensor) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(array), dtype=np.float32).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def htsat_state() -> dict[str, torch.Tensor]:
    """Bare HTS-AT keys (`layers.*`, `logmel_extractor.melW`, ...): a foreign filterbank and STFT."""
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in build_model(CONFIG.model).audio_model.state_dict().items()}
    other = dataclasses.replace(CONFIG.model.frontend, fmax=4000.0)
    state["logmel_extractor.melW"] = torch.from_numpy(mel_filterbank(other))
    for part in ("conv_real", "conv_imag"):
        state[f"spectrogram_extractor.stft.{part}.weight"] *= 0.5  # -6.02 dB on every log-mel
    return state


@pytest.fixture(scope="module")
def htsat_checkpoint(tmp_path_factory, htsat_state):
    path = tmp_path_factory.mktemp("ckpt") / "HTSAT.ckpt"
    torch.save(htsat_state, path)
    return path


def _prepare(raw, out, audio_checkpoint=None):
    paths = PreparePaths(layout="ddeseg", root=raw, out=out, tasks=["v2"], audio_checkpoint=audio_checkpoint)
    return prepare(CONFIG, paths, RunOptions(device="cpu", progress=False))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, prepared_synthetic, htsat_checkpoint):
    """The same raw data prepared with the config's filterbank and with the checkpoint's."""
    root = tmp_path_factory.mktemp("frontend")
    _prepare(prepared_synthetic.raw, root / "config")
    _prepare(prepared_synthetic.raw, root / "checkpoint", htsat_checkpoint)
    return root


def _stored(shards_dir) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """All samples' audio [N, samples] and log-mel [N, frames, mel] (float32), and tar sha256s."""
    audio, logmel, tars = [], [], {}
    for tar in sorted(shards_dir.glob("*/*/shard-*.tar")):
        tars[tar.relative_to(shards_dir).as_posix()] = hashlib.sha256(tar.read_bytes()).hexdigest()
        for sample in read_shard_samples(tar):
            audio.append(decode_array(sample[schema.AUDIO]))
            logmel.append(decode_array(sample[schema.LOGMEL]).astype(np.float32))
    assert audio, f"no samples in {shards_dir}"
    return np.stack(audio), np.stack(logmel), tars


def _model(checkpoint=None):
    model = build_model(CONFIG.model)
    if checkpoint is not None:
        assert load_checkpoint(model, checkpoint).filterbank_replaced
    return model


def test_checkpoint_logmels_are_what_the_loaded_model_computes(prepared, htsat_checkpoint):
    audio, stored, _ = _stored(prepared / "checkpoint")
    with torch.no_grad():
        expected = _model(htsat_checkpoint).frontend()(torch.from_numpy(audio)).numpy()
        config_made = _model().frontend()(torch.from_numpy(audio)).numpy()
    assert stored.shape == expected.shape == (audio.shape[0], expected.shape[1], 32)
    np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=2e-2)  # stored as float16
    # the two filterbanks differ by far more than float16 rounding: the test can fail
    assert np.abs(config_made - expected).max() > 10.0
    _, config_stored, _ = _stored(prepared / "config")
    np.testing.assert_allclose(config_stored, config_made, rtol=2e-3, atol=2e-2)


def test_prepare_json_records_the_filterbank_and_its_source(prepared, htsat_checkpoint, htsat_state):
    config_entry = json.loads((prepared / "config" / schema.PREPARE_FILE).read_text())["frontend"]
    checkpoint_entry = json.loads((prepared / "checkpoint" / schema.PREPARE_FILE).read_text())["frontend"]
    assert config_entry["source"] == "config" and config_entry["stft"] == "config"
    assert config_entry["filterbank_sha256"] == _sha256(mel_filterbank(CONFIG.model.frontend))
    assert checkpoint_entry["source"] == str(htsat_checkpoint.resolve())
    assert checkpoint_entry["stft"] == "checkpoint"
    assert checkpoint_entry["filterbank_sha256"] == _sha256(htsat_state["logmel_extractor.melW"])
    assert checkpoint_entry["filterbank_sha256"] != config_entry["filterbank_sha256"]
    assert checkpoint_entry["stft_sha256"] != config_entry["stft_sha256"]


def test_check_frontend_accepts_the_matching_model_and_refuses_the_other(prepared, htsat_checkpoint):
    plain, loaded = _model(), _model(htsat_checkpoint)
    ShardIndex(prepared / "config").check_frontend(plain)
    ShardIndex(prepared / "checkpoint").check_frontend(loaded)
    ShardIndex(prepared / "checkpoint").check_frontend(loaded.audio_model)  # the backbone alone
    with pytest.raises(DDESegError, match=r"--audio-checkpoint .*HTSAT\.ckpt") as refused:
        ShardIndex(prepared / "config").check_frontend(loaded, checkpoint=htsat_checkpoint)
    assert "\n" not in str(refused.value)
    with pytest.raises(DDESegError, match="HTSAT.ckpt"):  # names the checkpoint the shards need
        ShardIndex(prepared / "checkpoint").check_frontend(plain)


def test_shards_from_before_the_record_only_warn(prepared, tmp_path, htsat_checkpoint):
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(prepared / "config" / schema.MANIFEST_FILE, old)
    report = json.loads((prepared / "config" / schema.PREPARE_FILE).read_text())
    del report["frontend"]
    (old / schema.PREPARE_FILE).write_text(json.dumps(report))
    with pytest.warns(UserWarning, match="--audio-checkpoint"):
        ShardIndex(old).check_frontend(_model(htsat_checkpoint))


def test_check_needs_only_prepare_json(prepared, tmp_path, htsat_checkpoint):
    """The memory bank stage reads shard folders without a manifest: the check works there too."""
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(prepared / "checkpoint" / schema.PREPARE_FILE, bare)
    check_frontend(bare, _model(htsat_checkpoint))
    with pytest.raises(DDESegError, match="HTSAT.ckpt"):
        check_frontend(bare, _model())
    with pytest.warns(UserWarning, match="does not record"):
        check_frontend(tmp_path / "nothing", _model())


@pytest.mark.parametrize("form", ["htsat", "htsat-lightning", "ddeseg", "ddp"])
def test_the_filterbank_is_found_under_every_key_form(tmp_path, htsat_state, form):
    prefix = {
        "htsat": "",
        "htsat-lightning": "sed_model.",
        "ddeseg": "audio_model.",
        "ddp": "module.audio_model.",
    }
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {prefix[form] + k: v for k, v in htsat_state.items()}}, path)
    frontend = frontend_state_from_checkpoint(path)
    assert sorted(frontend) == [
        "logmel_extractor.melW",
        "spectrogram_extractor.stft.conv_imag.weight",
        "spectrogram_extractor.stft.conv_real.weight",
    ]
    for key, value in frontend.items():
        torch.testing.assert_close(value, htsat_state[key], rtol=0, atol=0)


def test_unusable_checkpoints_are_clear_errors(tmp_path, prepared_synthetic, htsat_state):
    no_filterbank = {k: v for k, v in htsat_state.items() if not k.startswith("logmel_extractor.")}
    wrong_shape = dict(htsat_state, **{"logmel_extractor.melW": torch.rand(513, 64)})
    nan = dict(
        htsat_state,
        **{"logmel_extractor.melW": torch.full_like(htsat_state["logmel_extractor.melW"], np.nan)},
    )
    cases = {
        "no_filterbank": (no_filterbank, r"no logmel_extractor\.melW"),
        "wrong_shape": (wrong_shape, r"shape \[513, 64\].*mel_bins 32\) needs \[513, 32\]"),
        "nan": (nan, "NaN"),
    }
    for name, (state, message) in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save(state, path)
        with pytest.raises(CheckpointError, match=message):
            _prepare(prepared_synthetic.raw, tmp_path / f"out_{name}", path)
        assert not (tmp_path / f"out_{name}").exists(), "refused before writing anything"
    with pytest.raises(CheckpointError, match="not found"):
        _prepare(prepared_synthetic.raw, tmp_path / "out_missing", tmp_path / "missing.pt")


def test_rerun_with_another_filterbank_rebuilds_the_shards(
    prepared, prepared_synthetic, tmp_path, htsat_checkpoint
):
    out = tmp_path / "shards"
    shutil.copytree(prepared / "config", out)
    _, config_logmel, config_tars = _stored(out)
    again = _prepare(prepared_synthetic.raw, out)
    assert (again.shards_written, again.shards_kept) == (0, len(config_tars))

    switched = _prepare(prepared_synthetic.raw, out, htsat_checkpoint)
    assert (switched.shards_written, switched.shards_kept) == (len(config_tars), 0)
    _, switched_logmel, switched_tars = _stored(out)
    _, _, checkpoint_tars = _stored(prepared / "checkpoint")
    assert switched_tars == checkpoint_tars  # the same bytes as a fresh run with that checkpoint
    assert np.abs(switched_logmel - config_logmel).max() > 10.0
    report = json.loads((out / schema.PREPARE_FILE).read_text())
    assert report["frontend"]["source"] == str(htsat_checkpoint.resolve())

    moved = tmp_path / "moved.ckpt"  # where the filterbank came from is no input of the shards
    shutil.copy(htsat_checkpoint, moved)
    assert _prepare(prepared_synthetic.raw, out, moved).shards_written == 0


def test_cli_passes_the_option_to_the_stage(tmp_path, prepared_synthetic, htsat_checkpoint):
    from ddeseg.cli.app import app

    args = [
        "prepare",
        "--layout",
        "ddeseg",
        "--root",
        str(prepared_synthetic.raw),
        "--tasks",
        "v2",
        "--quiet",
        "--device",
        "cpu",
        "--config",
        str(DEMO_CONFIG),
        *[f"--set={o}" for o in MICRO_OVERRIDES],
    ]
    result = CliRunner().invoke(
        app, [*args, "--out", str(tmp_path / "out"), "--audio-checkpoint", str(htsat_checkpoint)]
    )
    assert result.exit_code == 0, result.output
    entry = json.loads((tmp_path / "out" / schema.PREPARE_FILE).read_text())["frontend"]
    assert entry["source"] == str(htsat_checkpoint.resolve())
    help_text = CliRunner().invoke(app, ["prepare", "--help"], env={"COLUMNS": "200"}).output
    assert "HTS-AT checkpoint" in help_text
