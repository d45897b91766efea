"""The two larger official fixtures (../shared/reference/README.md), also with checkpointing on.

- `tiny_large_forward*.npz`: the tiny model filled at weight scale 0.1, where the aligners'
  clustering and audio-token scoring change the logits (they do not at the tiny fixture's
  scale); eval mode; float64 against the float64 companion at 1e-6, float32 at the README's
  per-array tolerances.
- `train_step.npz`: one official training step in float64 (forward in training mode with the
  noise-free clustering, the official loss 5 CE + 5 Dice + 2 IoU, backward): every loss term, the
  total, the logits, the gradients of 21 named parameters, every trainable parameter's gradient
  norm and the global norm; four variants (AVSS / binary x audio backbone in train / eval mode).

Each runs with activation checkpointing off and with every part on: the recompute must not
change a number (and must not update the head's BatchNorm statistics twice).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference_data import reference_file
from test_model_behaviour import single_threaded_torch  # noqa: F401 (autouse fixture)

from ddeseg.config import LossConfig, load_config
from ddeseg.losses import SegmentationLoss
from ddeseg.models import build_model
from ddeseg.models.ddeseg import CHECKPOINT_PARTS
from ddeseg.models.reference import LARGE_SCALE, fill_reference_weights

CHECKPOINTING = {"plain": (), "checkpointed": CHECKPOINT_PARTS}
ARRAYS = ("audio_latent", "enhanced_stage1", "enhanced_tokens", "logits") + tuple(
    f"stage{i}_features" for i in range(4)
)


def _large_model(overrides: list[str], dtype: torch.dtype):
    torch.manual_seed(0)
    model = build_model(load_config("tiny", overrides).model)
    fill_reference_weights(model, scale=LARGE_SCALE)
    model.set_memory_bank(np.load(reference_file("tiny_large_bank.npy")))
    return model.to(dtype)


def _intermediates(model, image: torch.Tensor, audio: torch.Tensor) -> dict[str, np.ndarray]:
    outputs = model.forward_intermediates(image, audio)
    arrays = {k: outputs[k] for k in ("audio_latent", "enhanced_stage1", "enhanced_tokens", "logits")}
    arrays.update({f"stage{i}_features": f for i, f in enumerate(outputs["stage_features"])})
    return {k: v.detach().numpy() for k, v in arrays.items()}


@pytest.fixture(scope="module")
def large_forward_f64():
    return dict(np.load(reference_file("tiny_large_forward_f64.npz")))


@pytest.mark.parametrize("parts", CHECKPOINTING.values(), ids=CHECKPOINTING.keys())
def test_large_forward_float64_matches_the_official_model(large_forward_f64, parts):
    fixture = large_forward_f64
    model = _large_model([], torch.float64)
    model.set_activation_checkpointing(parts)
    image = torch.from_numpy(fixture["image"]).double().requires_grad_()  # grad on: segments are live
    ours = _intermediates(model, image, torch.from_numpy(fixture["logmel"]).double())
    for name in ARRAYS:
        np.testing.assert_allclose(ours[name], fixture[name], atol=1e-6, rtol=1e-6, err_msg=name)
    with torch.no_grad():  # our front end from the waveform, in float64
        logmel = model.audio_model.logmel(torch.from_numpy(fixture["waveform"]).double())
    np.testing.assert_allclose(logmel.numpy(), fixture["logmel"], atol=1e-4, rtol=0)


def test_large_forward_float32_from_the_waveform():
    fixture = dict(np.load(reference_file("tiny_large_forward.npz")))
    model = _large_model([], torch.float32)
    with torch.no_grad():
        ours = _intermediates(model, torch.from_numpy(fixture["image"]), torch.from_numpy(fixture["waveform"]))
        logmel = model.audio_model.logmel(torch.from_numpy(fixture["waveform"]))
    np.testing.assert_allclose(logmel.numpy(), fixture["logmel"], atol=1e-3, rtol=0)
    for name in ARRAYS:
        diff, ref = ours[name] - fixture[name], fixture[name]
        assert np.abs(diff).max() <= 5e-3 * np.abs(ref).max(), name
        assert np.linalg.norm(diff) <= 1e-3 * np.linalg.norm(ref), name


# ---- one training step

VARIANTS = {  # variant -> (segmentation classes, audio backbone in eval mode)
    "v2": (3, False),
    "v2_audio_eval": (3, True),
    "v1s": (1, False),
    "v1s_audio_eval": (1, True),
}
# The fixture's determinism choices (README "Determinism choices"), as configuration.
TRAIN_STEP_OVERRIDES = [
    "model.audio.mode=official",
    "model.audio.spec_augment=false",
    "model.audio.drop_path_rate=0.0",
    "model.visual.drop_path_rate=0.0",
    "model.head_dropout=0.0",
]


@pytest.fixture(scope="module")
def train_step():
    return dict(np.load(reference_file("train_step.npz")))


@pytest.fixture(scope="module")
def step_models():
    """One float64 model per class count, and its filled state (restored before every step: a
    train-mode step updates the BatchNorm running statistics)."""
    models = {}
    for classes in (3, 1):
        model = _large_model(TRAIN_STEP_OVERRIDES + [f"model.num_classes={classes}"], torch.float64)
        model.set_clustering_noise(False)  # the fixture's noise-free clustering in training
        models[classes] = (model, {k: v.clone() for k, v in model.state_dict().items()})
    return models


def _max_rel(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-300))


@pytest.mark.parametrize("parts", CHECKPOINTING.values(), ids=CHECKPOINTING.keys())
@pytest.mark.parametrize("variant", VARIANTS)
def test_one_training_step_matches_the_official_step(train_step, step_models, variant, parts):
    fixture, prefix = train_step, f"{variant}/f64/"
    classes, audio_eval = VARIANTS[variant]
    model, filled = step_models[classes]
    model.load_state_dict(filled)
    model.zero_grad(set_to_none=True)
    model.set_activation_checkpointing(parts)
    model.train()
    if audio_eval:
        model.audio_model.eval()
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert names == list(fixture["trainable_param_names"])

    image = torch.from_numpy(fixture["image"]).double()
    logmel = torch.from_numpy(fixture[prefix + "logmel"])  # the official front end's output
    target = torch.from_numpy(fixture["mask" if classes > 1 else "mask_binary"])
    logits = model(image, logmel)
    loss_fn = SegmentationLoss(LossConfig(ce_weight=5, dice_weight=5, iou_weight=2, focal_weight=0), classes)
    total, terms = loss_fn(logits, target)
    total.backward()

    assert _max_rel(logits.detach().numpy(), fixture[prefix + "logits"]) <= 1e-8
    # Binary CE: like the official code, ours passes a float32 target and torch returns a
    # float32-rounded loss; the README's check is the literal rounded value at rtol 1e-7.
    rtol = {"ce_loss": 1e-7 if classes == 1 else 1e-10, "dice_loss": 1e-10, "iou_loss": 1e-10}
    for ours, theirs in (("ce_loss", "ce_loss"), ("dice_loss", "dice_loss"), ("iou_loss", "iou")):
        reference = fixture[f"{prefix}loss/{theirs}"]
        np.testing.assert_allclose(float(terms[ours]), reference, rtol=rtol[ours], err_msg=ours)
    np.testing.assert_allclose(total.detach().item(), fixture[f"{prefix}total_loss"], rtol=1e-7 if classes == 1 else 1e-10)

    parameters = dict(model.named_parameters())
    grad_keys = list(fixture["named_grad_keys"]) + (list(fixture["named_grad_keys_v2_extra"]) if variant == "v2" else [])
    assert len(grad_keys) == (21 if variant == "v2" else 20)
    for key in grad_keys:
        ours = parameters[key].grad.numpy()
        reference = fixture[f"{prefix}grad/{key}"]
        assert _max_rel(ours, reference) <= 1e-8, key
    norms = np.array([0.0 if parameters[n].grad is None else float(parameters[n].grad.norm()) for n in names])
    assert _max_rel(norms, fixture[prefix + "param_grad_norms"]) <= 1e-8
    np.testing.assert_allclose(np.sqrt((norms**2).sum()), fixture[prefix + "global_grad_norm"], rtol=1e-8)
    for key in ("audio_model.bn0.running_mean", "audio_model.bn0.running_var",
                "decode_head.linear_fuse.bn.running_mean", "decode_head.linear_fuse.bn.running_var"):
        np.testing.assert_allclose(model.state_dict()[key].numpy(), fixture[f"{prefix}after/{key}"],
                                   rtol=1e-10, atol=1e-12, err_msg=key)
