"""``benchmarks/bench_book_floor.py``: its counting rule and its copy of the notebooks'
parameters (so the floor it prints is that of the book as it is)."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
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


def _parameters(stem: str) -> dict:
    nb = json.loads(next((ROOT / "notebooks").glob(f"{stem}_*.ipynb")).read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    out = {}
    for node in ast.parse("".join(cell["source"])).body:
        if isinstance(node, ast.Assign):
            out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


def test_the_benchmark_uses_the_notebooks_parameters(bench):
    for stem in ("03", "04", "05", "07"):
        p = _parameters(stem)
        assert p["seeds"] == bench.NOTEBOOK_SEEDS[stem], stem
        assert p["num_rounds"] == bench.ROUNDS, stem
    p5 = _parameters("05")
    assert p5["method"] == "med_dual_lora"
    assert tuple(p5["block_choices"]) == ex.ABLATION_BLOCKS
    assert tuple(p5["rank_choices"]) == ex.ABLATION_RANKS
    assert tuple(_parameters("07")["newcomers"]) == bench.NEWCOMERS


def test_the_notebooks_runs(bench):
    per = bench.notebook_configs("smoke", 20)
    assert len(per["03"]) == len(ex.ALL_METHODS) * 5
    assert len(per["05"]) == 7 * 3
    # chapter 07: 2 new shift settings x 3 methods x 3 seeds, 4 x 3 held-out
    # federations, and 2 x 3 references (read back from chapter 03)
    assert len(per["07"]) == 3 * 3 * 3 + 12 + 6


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
