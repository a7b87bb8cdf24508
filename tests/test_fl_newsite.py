"""A held-out site joins a finished Med-DualLoRA federation (``medlora_lib.fl.newsite``)."""

from __future__ import annotations

import pytest
import torch

from medlora_lib.config import get_config
from medlora_lib.errors import ConfigError
from medlora_lib.fl import simulate
from medlora_lib.fl.newsite import join_new_site

pytestmark = pytest.mark.slow


def _cfg(method: str = "med_dual_lora", exclude=("Canon",), rounds: int = 2):
    return get_config(
        "smoke",
        overrides={
            "model.pretrained": "none",
            "fed.num_rounds": rounds,
            "fed.exclude": list(exclude),
            "train.num_threads": 1,
        },
        method=method,
        seed=2,
    )


@pytest.fixture(scope="module")
def federation():
    return simulate(_cfg(), runtime="inprocess", verbose=False)


def test_held_out_client_is_not_in_the_federation(federation):
    assert set(federation.rounds["client"]) == {"Siemens", "Philips", "GE"}
    assert federation.final_shared
    assert any(".lora_B.global." in k for k in federation.final_shared)


def test_join_trains_local_only_on_the_frozen_global(federation):
    result, zero_shot = join_new_site(federation, "Canon")
    assert list(result.rounds["client"].unique()) == ["Canon"]
    assert list(result.rounds["round"]) == [1, 2]
    assert 0.0 <= zero_shot["val_balanced_accuracy"] <= 1.0
    assert "test_balanced_accuracy" in zero_shot
    for k, v in federation.final_shared.items():
        if ".global." in k and ".lora_" in k:
            assert torch.equal(v, result.final_shared[k]), k  # global adapter frozen
    sel = result.selected().set_index("client")
    assert 0.0 <= sel.loc["Canon", "balanced_accuracy"] <= 1.0
    # the newcomer really trained something: its loss moved between rounds
    assert result.rounds["train_loss"].notna().all()
    assert result.rounds["train_loss"].nunique() == 2


def test_join_refuses_bad_inputs(federation):
    with pytest.raises(ConfigError, match="took part"):
        join_new_site(federation, "Siemens")
    other = simulate(_cfg("fedavg_lora", rounds=1), runtime="inprocess", verbose=False)
    with pytest.raises(ConfigError, match="med_dual_lora"):
        join_new_site(other, "Canon")
    with pytest.raises(ConfigError, match="fed.exclude"):
        simulate(_cfg(exclude=("Toshiba",), rounds=1), runtime="inprocess")
    with pytest.raises(ConfigError, match="no site left"):
        simulate(
            _cfg(exclude=("Siemens", "Philips", "GE", "Canon"), rounds=1),
            runtime="inprocess",
        )
