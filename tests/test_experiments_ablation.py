"""Chapter 05's ablation configs (``experiments.ablation_configs``)."""

from __future__ import annotations

import pytest

from medlora_lib import experiments as ex
from medlora_lib.config import config_hash
from medlora_lib.errors import ConfigError

OV = {"fed.num_rounds": 3}


def test_ablation_variants_and_overrides():
    variants, configs, keys = ex.ablation_configs("cpu", seeds=[0, 1], overrides=OV)
    # five block choices at rank 8, then the ranks but 8 at the last two blocks
    assert [(v["study"], v["blocks"], v["rank"]) for v in variants] == [
        ("blocks", "last1", 8),
        ("blocks", "last2", 8),
        ("blocks", "last4", 8),
        ("blocks", "all", 8),
        ("blocks", "first2", 8),
        ("rank", "last2", 4),
        ("rank", "last2", 16),
    ]
    assert len(configs) == len(keys) == 14
    for k, c in zip(keys, configs, strict=True):
        a = c.adapter_config()
        assert (a.adapted_blocks, a.lora_rank, c.seed) == (
            k["blocks"],
            k["rank"],
            k["seed"],
        )
        assert a.lora_alpha == 2 * k["rank"] and c.fed.num_rounds == 3
        assert c.method == "med_dual_lora"


def test_the_default_variant_is_the_main_comparison():
    """Same hash as chapter 03's config: its runs are read from the cache."""
    _, configs, keys = ex.ablation_configs("cpu", seeds=[0, 1], overrides=OV)
    main = {
        c.seed: config_hash(c)
        for c in ex.comparison_configs("cpu", ["med_dual_lora"], [0, 1], OV)
    }
    default = [
        c
        for k, c in zip(keys, configs, strict=True)
        if (k["blocks"], k["rank"]) == ("last2", 8)
    ]
    assert len(default) == 2
    assert {c.seed: config_hash(c) for c in default} == main
    # every other variant is a different experiment
    assert len({config_hash(c) for c in configs}) == len(configs)


def test_ablation_bad_input():
    with pytest.raises(ConfigError, match="at least one seed"):
        ex.ablation_configs("cpu", seeds=[])
    with pytest.raises(ConfigError, match="adapted_blocks"):
        ex.ablation_configs("cpu", seeds=[0], block_choices=["last99"], rank_choices=[])
