"""In-process runs (``local``, ``centralized``) in worker processes: same numbers.

Chapters ``02_single_site_baseline`` / ``03_fedavg_lora`` run several in-process
experiments at the ``cpu`` profile; ``simulate`` spreads them over the cores
(``fl.simulate.inprocess_workers``) instead of one core idling.
"""

from __future__ import annotations

import os

import pandas as pd
import pytest
import torch

from medlora_lib.config import get_config
from medlora_lib.fl import simulate
from medlora_lib.fl.simulate import inprocess_workers, plan

#: the cpu profile (so the worker rule applies) on smoke-sized data, 2 rounds
SMALL = {
    "data.image_size": [32, 32, 8],
    "data.spacing": [4.5, 4.5, 10.0],
    "data.scale": 0.06,
    "fed.num_rounds": 2,
    "fed.allow_single_class": True,
}


def _configs():
    return [
        get_config("cpu", method=m, seed=s, overrides=SMALL)
        for m, s in (("local", 0), ("centralized", 0), ("local", 1))
    ]


def test_the_worker_rule(tmp_path):
    cpu = plan(_configs(), use_cache=False, scratch=tmp_path)
    smoke = plan(
        [get_config("smoke", method="local", seed=s) for s in (0, 1)],
        use_cache=False,
        scratch=tmp_path,
    )
    cores = len(os.sched_getaffinity(0))
    assert inprocess_workers(cpu) == min(3, cores)
    assert inprocess_workers(cpu, max_parallel=1) == 1
    assert inprocess_workers(cpu[:1]) == 1
    assert inprocess_workers(smoke) == 1  # a worker starts slower than a smoke run


@pytest.mark.slow
def test_workers_give_the_numbers_of_one_process(tmp_path):
    if inprocess_workers(plan(_configs(), False, tmp_path)) < 2:
        pytest.skip("one CPU: nothing runs in parallel")
    one = simulate(_configs(), runtime="inprocess", max_parallel=1, verbose=False)
    many = simulate(_configs(), runtime="inprocess", verbose=False)
    for a, b in zip(one, many, strict=True):
        timing = {"train_seconds", "elapsed_s"}
        cols = [c for c in a.rounds.columns if c not in timing]
        assert {"train_loss", "val_auc", "test_balanced_accuracy"} <= set(cols)
        pd.testing.assert_frame_equal(a.rounds[cols], b.rounds[cols])
        assert a.config == b.config
        if a.final_shared is not None:
            assert a.final_shared.keys() == b.final_shared.keys()
            for k in a.final_shared:
                assert torch.equal(a.final_shared[k], b.final_shared[k]), k


@pytest.mark.slow
def test_an_error_in_a_worker_is_raised_here(tmp_path):
    """A worker's exception comes back with its type and message."""
    import dataclasses

    from medlora_lib.errors import MedloraError
    from medlora_lib.fl.simulate import _run_inprocess_all

    planned = plan(_configs()[:2], use_cache=False, scratch=tmp_path)
    if inprocess_workers(planned) < 2:
        pytest.skip("one CPU: nothing runs in parallel")
    gone = tmp_path / "no-such-data"
    broken = [(0, planned[0]), (1, dataclasses.replace(planned[1], data_dir=gone))]
    with pytest.raises(MedloraError, match="no-such-data"):
        _run_inprocess_all(broken, save=False, verbose=False, max_parallel=None)
