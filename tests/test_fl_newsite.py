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


def test_joins_in_worker_processes_give_the_numbers_of_one_process():
    """Chapter 07's joins run in worker processes (``join_new_sites``): the same rows,
    zero-shot metrics and final state as one after the other in this process."""
    import pandas as pd

    from medlora_lib.fl.newsite import join_new_sites
    from medlora_lib.fl.simulate import worker_count

    small = {  # the cpu profile (so the worker rule applies) on smoke-sized data
        "data.image_size": [32, 32, 8],
        "data.spacing": [4.5, 4.5, 10.0],
        "data.scale": 0.06,
        "fed.num_rounds": 2,
        "fed.allow_single_class": True,
    }
    cfgs = [
        get_config(
            "cpu",
            method="med_dual_lora",
            seed=s,
            overrides={**small, "fed.exclude": [v]},
        )
        for v, s in (("Canon", 0), ("GE", 1))
    ]
    if worker_count(cfgs) < 2:
        pytest.skip("one CPU: nothing runs in parallel")
    feds = simulate(cfgs, runtime="inprocess", verbose=False)
    jobs = [(f, c.fed.exclude[0]) for f, c in zip(feds, cfgs, strict=True)]
    one = join_new_sites(jobs, max_parallel=1)
    many = join_new_sites(jobs)
    timing = {"train_seconds", "elapsed_s"}
    for (a, za), (b, zb), (_, v) in zip(one, many, jobs, strict=True):
        assert list(b.rounds["client"].unique()) == [v]
        cols = [c for c in a.rounds.columns if c not in timing]
        pd.testing.assert_frame_equal(a.rounds[cols], b.rounds[cols])
        assert za == zb
        for k in a.final_shared:
            assert torch.equal(a.final_shared[k], b.final_shared[k]), k
    with pytest.raises(ConfigError, match="took part"):  # raised again from a worker
        join_new_sites([(feds[0], "Siemens"), (feds[1], "Siemens")])
