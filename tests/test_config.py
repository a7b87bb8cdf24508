"""Profiles and overrides; every bad value is a ConfigError naming the field."""

from __future__ import annotations

import pytest

from medlora_lib.config import ExperimentConfig, config_hash, get_config
from medlora_lib.errors import ConfigError


@pytest.mark.parametrize(
    ("profile", "size", "image_size"),
    [
        ("smoke", "small", (32, 32, 8)),
        ("cpu", "small", (48, 48, 8)),
        ("paper", "base", (192, 192, 16)),
    ],
)
def test_profiles(profile, size, image_size):
    cfg = get_config(profile)
    assert cfg.model.size == size
    assert cfg.data.image_size == image_size


def test_overrides_and_roundtrip():
    cfg = get_config(
        "cpu", overrides=["train.lr=3e-4", "data.heterogeneity=0.5"], seed=3
    )
    assert cfg.train.lr == 3e-4 and cfg.data.heterogeneity == 0.5 and cfg.seed == 3
    again = ExperimentConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(get_config("cpu", seed=4)) != config_hash(cfg)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"overrides": ["data.heterogeneity=1.5"]}, "data.heterogeneity"),
        ({"overrides": ["train.lr=0"]}, "train.lr"),
        ({"overrides": ["fed.num_rounds=0"]}, "fed.num_rounds"),
        ({"overrides": ["train.nope=1"]}, "train.nope"),
        ({"overrides": ["model.size=huge"]}, "model.size"),
        ({"overrides": ["lr"]}, "lr"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field.split(".")[-1]):
        get_config("cpu", **kwargs)


def test_unknown_profile():
    with pytest.raises(ConfigError, match="unknown profile"):
        get_config("laptop")
