"""The typed config: defaults, YAML inheritance, overrides and errors."""

import pytest

from ddeseg.config import Config, ConfigError, load_config, save_config


def test_defaults_are_the_paper_configuration():
    config = Config()
    assert config.model.visual.depths == (3, 6, 40, 3)
    assert config.model.audio.depths == (2, 2, 6, 2)
    assert config.loss.ce_weight == 5.0


def test_base_inheritance_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("task: v2\ntrain:\n  steps: 10\n  base_lr: 4e-6\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain:\n  steps: 20\n")
    config = load_config(tmp_path / "child.yaml", ["data.batch_size=3"])
    assert config.train.steps == 20
    assert config.train.base_lr == pytest.approx(4e-6)  # YAML reads 4e-6 as a string
    assert config.data.batch_size == 3
    save_config(config, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == config


def test_unknown_key_is_an_error(tmp_path):
    (tmp_path / "bad.yaml").write_text("train:\n  stepz: 10\n")
    with pytest.raises(ConfigError, match="stepz"):
        load_config(tmp_path / "bad.yaml")


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(None, ["train.steps=many"])
