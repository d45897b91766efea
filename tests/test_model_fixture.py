"""The tiny configuration, filled by the reference recipe, computes the official numbers.

`../shared/reference/tiny_forward.npz` holds the activations of the official DDESeg code (eval
mode, deterministic clustering) on fixed inputs; we reproduce every array from the waveform and,
separately, from the fixture's log-mel, with both attention paths. The weights are filled by the
recipe of the reference README (`ddeseg.models.reference.fill_reference_weights`).
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from reference_data import reference_file
from test_model_behaviour import single_threaded_torch  # noqa: F401 (autouse fixture)

from ddeseg.config import load_config
from ddeseg.models import LogMelFrontend, build_model, frames_for
from ddeseg.models.reference import ATOL, LOGMEL_ATOL, RTOL, fill_reference_weights

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def fixture():
    return dict(np.load(reference_file("tiny_forward.npz")))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = build_model(load_config(CONFIGS / "tiny.yaml").model)
    fill_reference_weights(model)  # before the bank: the official state dict has none
    model.set_memory_bank(np.load(reference_file("tiny_bank.npy")))
    return model


def _compare(outputs: dict, fixture: dict) -> dict[str, float]:
    arrays = {k: outputs[k] for k in ("audio_latent", "enhanced_stage1", "enhanced_tokens", "logits")}
    arrays.update({f"stage{i}_features": f for i, f in enumerate(outputs["stage_features"])})
    errors = {}
    for name, tensor in arrays.items():
        ours = tensor.detach().numpy()
        assert ours.shape == fixture[name].shape, name
        np.testing.assert_allclose(ours, fixture[name], atol=ATOL, rtol=RTOL, err_msg=name)
        errors[name] = float(np.abs(ours - fixture[name]).max())
    return errors


def test_frontend_reproduces_the_fixture_logmel(fixture):
    frontend = LogMelFrontend(load_config(CONFIGS / "tiny.yaml").model.frontend)
    waveform = torch.from_numpy(fixture["waveform"])
    with torch.no_grad():
        logmel = frontend(waveform)
    assert logmel.shape == (2, frames_for(load_config(None).model.frontend, waveform.shape[1]), 64)
    np.testing.assert_allclose(logmel.numpy(), fixture["logmel"][:, 0], atol=LOGMEL_ATOL, rtol=0)


@pytest.mark.parametrize("fused_attn", [False, True], ids=["explicit", "fused"])
@pytest.mark.parametrize("audio_input", ["waveform", "logmel"])
def test_tiny_forward_matches_the_official_model(model, fixture, audio_input, fused_attn):
    model.set_fused_attn(fused_attn)
    image = torch.from_numpy(fixture["image"])
    audio = torch.from_numpy(fixture[audio_input])  # waveform [2, 22050] or log-mel [2, 1, 87, 64]
    with torch.no_grad():
        outputs = model.forward_intermediates(image, audio)
        logits = model(image, audio)
    _compare(outputs, fixture)
    torch.testing.assert_close(logits, outputs["logits"], rtol=0, atol=0)


def test_model_frontend_is_the_pipeline_frontend(model, fixture):
    waveform = torch.from_numpy(fixture["waveform"])
    frontend = LogMelFrontend(load_config(CONFIGS / "tiny.yaml").model.frontend)
    with torch.no_grad():
        torch.testing.assert_close(model.frontend()(waveform), frontend(waveform), rtol=0, atol=0)
        # a squeezed [B, frames, mel] log-mel gives the same latent as the waveform
        latent_from_logmel = model.embed_audio(frontend(waveform))
        latent_from_waveform = model.embed_audio(waveform)
    torch.testing.assert_close(latent_from_logmel, latent_from_waveform, rtol=0, atol=0)
    np.testing.assert_allclose(latent_from_waveform.numpy(), fixture["audio_latent"], atol=ATOL, rtol=RTOL)
