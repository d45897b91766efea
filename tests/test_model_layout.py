"""The paper configuration has exactly the official state-dict layout and parameter counts."""

import json
from pathlib import Path

import pytest
import torch
from test_model_behaviour import single_threaded_torch  # noqa: F401 (autouse fixture)

from ddeseg.config import ModelConfig, load_config
from ddeseg.models import build_model

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _layout(model: torch.nn.Module) -> list[list]:
    return [[key, list(t.shape), str(t.dtype).removeprefix("torch.")] for key, t in model.state_dict().items()]


def _first_difference(mine: list[list], reference: list[list]) -> str:
    for index, (a, b) in enumerate(zip(mine, reference, strict=False)):
        if a != b:
            return f"entry {index}: ours {a} vs official {b}"
    return f"lengths {len(mine)} vs {len(reference)}"


@pytest.fixture(scope="module")
def b5_model():
    # Built on the meta device: shapes and dtypes without 133M parameters of memory or init time.
    with torch.device("meta"):
        return build_model(load_config(CONFIGS / "v2.yaml").model)


def test_paper_config_state_dict_is_the_official_layout(b5_model):
    reference = json.loads((REFERENCE / "ddeseg_b5_state_dict_layout.json").read_text())
    mine = _layout(b5_model)
    assert mine == reference["state_dict"], _first_difference(mine, reference["state_dict"])


def test_paper_config_parameter_counts(b5_model):
    reference = json.loads((REFERENCE / "ddeseg_b5_state_dict_layout.json").read_text())
    total = sum(p.numel() for p in b5_model.parameters())
    trainable = sum(p.numel() for p in b5_model.parameters() if p.requires_grad)
    assert (total, trainable) == (reference["total_params"], reference["trainable_params"])
    assert not any(p.requires_grad for p in b5_model.audio_model.parameters())


def test_defaults_equal_the_paper_config():
    assert load_config(CONFIGS / "v2.yaml").model == ModelConfig()


def test_tiny_config_is_the_fixture_layout():
    reference = json.loads((REFERENCE / "tiny_layout.json").read_text())
    model_cfg = load_config(CONFIGS / "tiny.yaml").model
    fixture = reference["config"]
    assert model_cfg.visual.depths == tuple(fixture["visual_depths"])
    assert model_cfg.audio.depths == tuple(fixture["audio_depths"])
    assert (model_cfg.frontend.fmin, model_cfg.frontend.fmax) == (fixture["fmin"], fixture["fmax"])
    with torch.device("meta"):
        model = build_model(model_cfg)
    mine = _layout(model)
    assert mine == reference["state_dict"], _first_difference(mine, reference["state_dict"])


@pytest.mark.parametrize(
    ("name", "task", "classes"),
    [("v1s", "v1s", 1), ("v1m", "v1m", 1), ("v2", "v2", 71), ("VPO-SS", "VPO-SS", 22), ("VPO-MS", "VPO-MS", 22),
     ("VPO-MSMI", "VPO-MSMI", 22)],
)
def test_task_configs_differ_from_the_paper_model_only_in_classes(name, task, classes):
    config = load_config(CONFIGS / f"{name}.yaml")
    assert config.task == task and config.model.num_classes == classes
    assert config.model == ModelConfig(num_classes=classes)
    assert config.train.base_lr == pytest.approx(1e-4) and config.data.batch_size == 50


def test_weighted_head_layout_and_dict_config():
    with torch.device("meta"):
        model = build_model({"head_type": "weighted", "num_classes": 3, "head_embedding_dim": 32,
                             "visual": {"depths": [1, 1, 1, 1]}, "audio": {"depths": [1, 1, 1, 1]}})
    keys = [k for k in model.state_dict() if k.startswith("decode_head.")]
    expected_order = ["linear_c4", "linear_c3", "linear_c2", "linear_c1", "weight_c4", "weight_c3", "weight_c2",
                      "weight_c1", "linear_fuse", "weight_levels", "linear_pred"]
    seen = list(dict.fromkeys(k.split(".")[1] for k in keys))
    assert seen == expected_order
    assert model.state_dict()["decode_head.weight_levels.weight"].shape == (4, 128, 1, 1)
