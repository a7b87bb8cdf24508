"""``benchmarks/bench_book_floor.py``: the runs it counts (the book's, from the
notebooks' own parameters) and its counting rule."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from medlora_lib import experiments as ex
from medlora_lib.config import get_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_book_floor", ROOT / "benchmarks" / "bench_book_floor.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_notebooks_runs(bench):
    """What the book trains, from the notebooks' own parameters (cpu profile)."""
    per = bench.notebook_configs("cpu")
    assert len(per["03"]) == len(ex.ALL_METHODS) * 5
    assert len(per["04"]) == 2 * 5  # two capacity controls x 5 seeds
    assert len(per["05"]) == 7 * 3
    # chapter 07: 3 shift settings x 3 methods x 3 seeds, 4 x 3 held-out
    # federations, and 2 x 3 references (read back from chapter 03)
    assert len(per["07"]) == 3 * 3 * 3 + 12 + 6
    assert {c.fed.num_rounds for cfgs in per.values() for c in cfgs} == {20}
    # at smoke, what medlora book --profile smoke passes (notebooks/smoke_parameters.yaml)
    smoke = bench.notebook_configs("smoke")
    assert {c.profile for cfgs in smoke.values() for c in cfgs} == {"smoke"}


@pytest.mark.slow
def test_a_round_costs_the_same_every_round(bench):
    """The rule the floor relies on: FLOPs(R rounds) = one-time + R x one round."""
    from medlora_lib.fl import simulate
    from medlora_lib.fl.task import clear_runtime_cache

    cfg = get_config("smoke", method="med_dual_lora")
    clear_runtime_cache()
    once1, round1 = bench.count_flops(cfg)
    two = dataclasses.replace(cfg, fed=dataclasses.replace(cfg.fed, num_rounds=2))
    clear_runtime_cache()
    with bench.Counter() as c:
        simulate(two, use_cache=False, verbose=False, runtime="inprocess")
    assert round1 > 0 and once1 >= 0
    assert c.build == once1 and c.total - c.build == 2 * round1
