"""Every checkpoint format loads into DDESeg; files that match nothing are errors.

The files are written here from our own tiny model's state dict under the foreign key names of
each format (official DDESeg, DDP, MiT ImageNet, mmseg SegFormer, HTS-AT Lightning and clean).
"""

import pickle

import numpy as np
import pytest
import torch
from test_model_behaviour import MICRO, MICRO_DIM, single_threaded_torch  # noqa: F401 (autouse fixture)

from ddeseg.errors import CheckpointError
from ddeseg.models import build_model, load_checkpoint

BANK = np.random.default_rng(0).standard_normal((3, 4, MICRO_DIM)).astype(np.float32)


@pytest.fixture(scope="module")
def source():
    """A trained-looking model: random init, a bank, and a distinctive (but valid) filterbank."""
    torch.manual_seed(1)
    model = build_model(MICRO)
    model.set_memory_bank(BANK)
    with torch.no_grad():
        model.audio_model.logmel_extractor.melW.mul_(2.0)
    return model


@pytest.fixture(scope="module")
def _target_model():
    torch.manual_seed(2)
    model = build_model(MICRO)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def target(_target_model):
    """A freshly initialised model (built once per module, reset before each test)."""
    model, initial = _target_model
    model.memory_bank = None
    model.load_state_dict(initial, strict=True)
    return model


def _part(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v.clone() for k, v in state.items() if k.startswith(prefix)}


def _assert_loaded(target, source, prefix: str, skip: tuple[str, ...] = ()) -> None:
    theirs = source.state_dict()
    for key, value in target.state_dict().items():
        if key.startswith(prefix) and key != "memory_bank" and not key.startswith(skip):
            torch.testing.assert_close(value, theirs[key], rtol=0, atol=0, msg=key)


def test_our_training_checkpoint_restores_weights_and_bank(tmp_path, source, target):
    path = tmp_path / "last.pt"
    torch.save(
        {"format": "ddeseg-train-1", "model": source.state_dict(), "step": 3, "config": {"task": "v2"}}, path
    )
    report = load_checkpoint(target, path, strict=True)
    assert report.format == "ddeseg" and report.loaded[0] == "memory_bank"
    assert not report.missing and not report.unexpected and not report.mismatched
    assert report.filterbank_replaced
    _assert_loaded(target, source, "")
    torch.testing.assert_close(target.memory_bank, torch.from_numpy(BANK), rtol=0, atol=0)


@pytest.mark.parametrize("ddp", [False, True], ids=["plain", "module-prefix"])
def test_official_full_checkpoint(tmp_path, source, target, ddp):
    weights = {k: v for k, v in source.state_dict().items() if k != "memory_bank"}
    if ddp:
        weights = {"module." + k: v for k, v in weights.items()}
    path = tmp_path / "ck_epoch_3_maxmiou0.412_fscore0.501.pth"
    torch.save(
        {
            "model": weights,
            "optimizer": {"state": {}, "param_groups": []},
            "lr_scheduler": {"last_epoch": 9},
            "config": {"task": "v2", "num_classes": 3},
            "miou": 0.412,
            "fscore": 0.501,
            "epoch": 3,
        },
        path,
    )
    target.set_memory_bank(BANK[::-1].copy())
    report = load_checkpoint(target, path, strict=True)
    assert report.format == "ddeseg" and len(report.loaded) == len(weights)
    assert "memory_bank" not in report.missing
    _assert_loaded(target, source, "")
    torch.testing.assert_close(target.memory_bank, torch.from_numpy(BANK[::-1].copy()), rtol=0, atol=0)


def test_mit_imagenet_backbone(tmp_path, source, target):
    backbone = _part(source.state_dict(), "backbone.")
    mit = {k: v for k, v in backbone.items() if not k.startswith(("aud_projs.", "av_aligners."))}
    mit["head.weight"], mit["head.bias"] = torch.zeros(1000, 128), torch.zeros(1000)
    path = tmp_path / "mit_b5.pth"
    torch.save(mit, path)
    before = target.state_dict()["decode_head.linear_pred.weight"].clone()
    report = load_checkpoint(target, path)
    assert report.format == "mit"
    assert len(report.loaded) == len(mit) - 2 and sorted(report.unexpected) == ["head.bias", "head.weight"]
    assert report.missing and all(
        k.startswith(("backbone.aud_projs.", "backbone.av_aligners.")) for k in report.missing
    )
    _assert_loaded(target, source, "backbone.", skip=("backbone.aud_projs.", "backbone.av_aligners."))
    torch.testing.assert_close(target.state_dict()["decode_head.linear_pred.weight"], before, rtol=0, atol=0)


def test_mit_file_with_numpy_arrays(tmp_path, source, target):
    backbone = _part(source.state_dict(), "backbone.")
    path = tmp_path / "mit_numpy.pth"
    torch.save({k: v.numpy() for k, v in backbone.items() if k.startswith("block1.")}, path)
    report = load_checkpoint(target, path)
    assert report.format == "mit" and len(report.loaded) == sum(k.startswith("block1.") for k in backbone)
    _assert_loaded(target, source, "backbone.block1.")


def test_mmseg_segformer_drops_the_decode_head(tmp_path, source, target):
    segformer = ("backbone.aud_projs.", "backbone.av_aligners.")  # SegFormer has no aligners
    state = {
        k: v
        for k, v in source.state_dict().items()
        if k.startswith("backbone.") and not k.startswith(segformer)
    }
    state.update(
        {k: torch.zeros_like(v) for k, v in source.state_dict().items() if k.startswith("decode_head.")}
    )
    state["decode_head.conv_seg.weight"] = torch.zeros(150, 16, 1, 1)
    path = tmp_path / "segformer.mit-b5_ade.pth"
    torch.save({"state_dict": state, "meta": {"CLASSES": ["wall", "building"], "epoch": 160}}, path)
    before = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("decode_head.")}
    report = load_checkpoint(target, path)
    assert report.format == "mmseg-backbone" and not report.unexpected
    assert report.missing and all(k.startswith(segformer) for k in report.missing)
    _assert_loaded(target, source, "backbone.", skip=segformer)
    for key, value in before.items():
        torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("layout", ["lightning", "clean"])
def test_htsat_checkpoint_replaces_the_filterbank(tmp_path, source, target, layout):
    audio = _part(source.state_dict(), "audio_model.")
    # the AudioSet checkpoint's token-semantic head has 527 classes: skipped, reported
    audio["tscam_conv.weight"], audio["tscam_conv.bias"] = torch.zeros(527, MICRO_DIM, 1, 3), torch.zeros(527)
    audio["head.weight"], audio["head.bias"] = torch.zeros(527, 527), torch.zeros(527)
    path = tmp_path / "HTSAT_AudioSet_Saved_1.ckpt"
    if layout == "lightning":
        torch.save({"state_dict": {"sed_model." + k: v for k, v in audio.items()}, "epoch": 30}, path)
    else:
        torch.save(audio, path)
    assert not torch.equal(target.audio_model.logmel_extractor.melW, source.audio_model.logmel_extractor.melW)
    report = load_checkpoint(target, path)
    assert report.format == ("htsat-lightning" if layout == "lightning" else "htsat")
    assert report.filterbank_replaced and "mel filterbank replaced" in report.summary()
    assert sorted(m[0] for m in report.mismatched) == sorted(
        f"audio_model.{k}" for k in ("tscam_conv.weight", "tscam_conv.bias", "head.weight", "head.bias")
    )
    assert not report.missing  # in the file, only of another shape
    _assert_loaded(target, source, "audio_model.", skip=("audio_model.tscam_conv.", "audio_model.head."))
    assert not any(p.requires_grad for p in target.audio_model.parameters())  # still frozen


def test_files_that_match_nothing_are_errors(tmp_path, target):
    unknown = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 2048)}, unknown)
    with pytest.raises(CheckpointError, match="no key matches"):
        load_checkpoint(target, unknown)

    wrong_size = tmp_path / "mit_b0.pth"  # a MiT of other widths: recognised, but nothing fits
    torch.save(
        {"patch_embed1.proj.weight": torch.zeros(64, 3, 7, 7), "norm1.weight": torch.zeros(64)}, wrong_size
    )
    with pytest.raises(CheckpointError, match="no key matches the model"):
        load_checkpoint(target, wrong_size)

    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(target, tmp_path / "missing.pth")

    empty = tmp_path / "empty.pth"
    torch.save({"epoch": 3}, empty)
    with pytest.raises(CheckpointError, match="no tensors"):
        load_checkpoint(target, empty)


class _Payload:  # not loadable with weights_only: a checkpoint must not run code
    pass


def test_pickled_objects_are_refused(tmp_path, target):
    path = tmp_path / "unsafe.pth"
    with path.open("wb") as handle:
        pickle.dump({"model": _Payload()}, handle, protocol=2)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_checkpoint(target, path)


def test_strict_load_reports_what_is_missing(source, target):
    partial = {k: v for k, v in source.state_dict().items() if not k.startswith("decode_head.")}
    with pytest.raises(CheckpointError, match="strict load failed"):
        load_checkpoint(target, partial, strict=True)
    report = load_checkpoint(target, partial)
    assert report.missing and all(k.startswith("decode_head.") for k in report.missing)
