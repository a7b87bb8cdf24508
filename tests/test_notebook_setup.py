"""The common opening of the chapters (medlora_lib.notebook)."""

from __future__ import annotations

import warnings

from medlora_lib.config import get_config
from medlora_lib.notebook import KNOWN_NOISE, describe_profile, setup


def test_setup_prints_versions_and_silences_only_the_known_noise(capsys):
    info = setup(("medlora", "torch", "no-such-package"))
    out = capsys.readouterr().out
    assert info["versions"]["no-such-package"] == "not installed"
    assert "medlora" in out and "torch threads" in out and info["cache"] in out
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        setup(quiet=True)
        for message in KNOWN_NOISE:
            warnings.warn(message, stacklevel=1)
        warnings.warn("something else", stacklevel=1)
    assert [str(w.message) for w in seen] == ["something else"]


def test_describe_profile_prints_the_config_that_runs(capsys):
    cfg = get_config("smoke", overrides={"fed.num_rounds": 3, "adapter.lora_rank": 2})
    key = describe_profile(cfg, seeds=[0, 1])
    out = capsys.readouterr().out
    assert key["profile"] == "smoke" and "3 rounds" in key["budget"]
    assert "rank 2" in key["LoRA"] and "param seeds" in out and "[0, 1]" in out
    assert describe_profile("cpu")["profile"] == "cpu"
