"""Config: defaults validate, overrides coerce, every problem is reported at once with the key and range."""

from __future__ import annotations

import pytest

from minioprd.config import Config, load_config, to_yaml, validate
from minioprd.errors import ConfigError


def test_defaults_are_valid_and_every_field_has_help():
    import dataclasses

    cfg = Config()
    assert validate(cfg) == []
    for sec in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, sec.name)):
            assert f.metadata.get("help"), f"{sec.name}.{f.name} has no help"


def test_overrides_are_coerced_from_text():
    cfg = load_config(None, {"train.lr": "3e-4", "train.steps": "7", "lora.gradient_checkpointing": "true",
                             "loss.layers": "[1, 2]", "data.shuffle": "false"})
    assert cfg.train.lr == 3e-4 and cfg.train.steps == 7 and cfg.lora.gradient_checkpointing is True
    assert cfg.loss.layers == [1, 2] and cfg.data.shuffle is False


def test_all_problems_reported_at_once_with_key_value_and_range():
    with pytest.raises(ConfigError) as e:
        load_config(None, {"train.lr": "-1", "rollout.top_p": "1.5", "loss.positions": "middle",
                           "train.stepz": "3", "loss.kind": "l1", "train.steps": "many"})
    msgs = e.value.problems
    assert len(msgs) == 6
    text = " | ".join(msgs)
    assert "train.lr must be > 0" in text and "got -1" in text
    assert "rollout.top_p must be <= 1.0, got 1.5" in text
    assert "loss.positions must be one of all, last, last_k, first_k, got 'middle'" in text
    assert "unknown config key 'train.stepz' (did you mean 'steps'?)" in text
    assert "loss.kind must be one of" in text and "'l1'" in text
    assert "train.steps: expected an integer, got 'many'" in text


def test_recipe_unknown_key_and_section(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("trian:\n  steps: 3\nloss:\n  knd: mse\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    text = " | ".join(e.value.problems)
    assert "unknown config section 'trian'" in text and "did you mean 'train'" in text
    assert "unknown config key 'loss.knd'" in text and "did you mean 'kind'" in text
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_round_trip(tmp_path):
    import yaml

    cfg = load_config(None, {"loss.layers": "[1, 3]", "train.lr": "2e-4"})
    p = tmp_path / "c.yaml"
    p.write_text(to_yaml(cfg))
    assert "# AdamW learning rate" in p.read_text()
    again = load_config(p)
    assert again == cfg
    assert yaml.safe_load(p.read_text())["loss"]["layers"] == [1, 3]
