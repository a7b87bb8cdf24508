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
        ({"overrides": ["data.label_shift=2"]}, "data.label_shift"),
        ({"overrides": ["data.appearance_shift=-1"]}, "data.appearance_shift"),
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


# ------------------------------------------------------------- typed adapter section
def test_adapter_section_is_typed_and_keeps_its_defaults():
    cfg = get_config("cpu", overrides=["adapter.lora_rank=4"])
    assert cfg.adapter.lora_rank == 4
    # the other defaults stay (they used to vanish from the saved config and its hash)
    assert cfg.adapter.target_modules == ("attn.q", "attn.kv", "attn.proj")
    assert cfg.to_dict()["adapter"]["lora_alpha"] == 16.0
    assert config_hash(cfg) != config_hash(get_config("cpu"))
    from medlora_lib.adapters import AdapterConfig

    # one source of the defaults: AdapterConfig is the section plus the method
    assert AdapterConfig().lora_rank == get_config("cpu").adapter.lora_rank


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"overrides": ["adapter.lora_rnk=4"]}, "did you mean `adapter.lora_rank`"),
        ({"overrides": ["fed.num-rnds=3"]}, "did you mean `fed.num_rounds`"),
        ({"overrides": ["trian.lr=1"]}, "did you mean `train.lr`"),
        ({"overrides": ["train.lr=abc"]}, "`train.lr`: expected a number"),
        ({"overrides": ["adapter.lora_rank=0"]}, "`adapter.lora_rank`"),
        ({"seed": "x"}, "`seed`: expected an integer"),
        ({"method": "fedbn"}, "`method`"),
    ],
)
def test_mistakes_name_the_field_and_the_nearest_key(kwargs, needle):
    with pytest.raises(ConfigError) as err:
        get_config("cpu", **kwargs)
    assert needle in str(err.value)


# ------------------------------------------------------------- Flower run config
def test_pyproject_app_config_equals_the_typed_defaults():
    import tomllib
    from pathlib import Path

    from flwr.common.config import flatten_dict

    from medlora_lib.config import run_config_defaults

    root = Path(__file__).resolve().parent.parent
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    app = meta["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "medlora_lib.fl.server_app:app",
        "clientapp": "medlora_lib.fl.client_app:app",
    }
    assert flatten_dict(app["config"]) == run_config_defaults()


def test_run_config_round_trips_every_profile_and_override():
    from medlora_lib.config import from_run_config, run_config_defaults, to_run_config

    for cfg in (
        get_config("cpu"),
        get_config("smoke", method="fedsa_lora", seed=4),
        # equal to the cpu default but not to paper's: must survive the round trip
        get_config("paper", overrides={"train.batch_size": 16, "adapter.lora_rank": 4}),
        get_config(
            "cpu", overrides=["adapter.adapted_blocks=[-2,-1]", "fed.exclude=GE"]
        ),
        get_config("cpu", overrides=["data.label_shift=0", "data.appearance_shift=1"]),
    ):
        again, _ = from_run_config(to_run_config(cfg))
        assert again == cfg
    # with profile-defaults (the project's default), keys left alone follow the profile
    rc = {**run_config_defaults(), "profile": "paper", "fed.num-rounds": 3}
    cfg, options = from_run_config(rc)
    assert cfg.data.image_size == (192, 192, 16) and cfg.model.size == "base"
    assert cfg.fed.num_rounds == 3 and options.resume == "auto"


def test_run_config_unknown_key_names_the_nearest():
    from medlora_lib.config import from_run_config

    with pytest.raises(ConfigError, match="did you mean `fed.num-rounds`"):
        from_run_config({"fed.num-rnds": 3})
    with pytest.raises(ConfigError, match="run.resume"):
        from_run_config({"run.resume": "sometimes"})
