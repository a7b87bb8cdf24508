"""The test split is evaluated only where it is read (``train.test_every_round``).

Selection (``fl.result.select_rounds``) picks, per client, the first round with the best
validation value; so only a round whose validation beats every earlier one, and the last
round, need a test evaluation. The round loop sends that plan
(``fl.federation.plan_test_evaluations``) with every evaluation but the last; the
selected and final results must be those of a run that tests every round. Chapter
``notebooks/03_fedavg_lora``.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest

from medlora_lib.config import get_config
from medlora_lib.fl import simulate
from medlora_lib.fl.federation import plan_test_evaluations


def test_the_plan_is_each_clients_best_validation_so_far():
    rows = [
        {"round": 1, "client": "A", "val_mcc": 0.1, "global_only_val_mcc": 0.3},
        {"round": 1, "client": "B", "val_mcc": float("nan")},
        {"round": 2, "client": "A", "val_mcc": 0.4, "global_only_val_mcc": 0.2},
        {"round": 2, "client": "B", "val_mcc": 0.2},
        {"round": 3, "client": "C"},  # trained, not evaluated yet
    ]
    assert plan_test_evaluations(rows, "mcc") == {
        "A": {"": 0.4, "global_only_": 0.3},
        "B": {"": 0.2},
    }
    assert plan_test_evaluations([], "mcc") == {}


def _improving_rounds(g: pd.DataFrame, col: str) -> set[int]:
    out, best = set(), -math.inf
    for rnd, v in g.sort_values("round")[["round", col]].itertuples(index=False):
        if v == v and v > best:
            out.add(int(rnd))
            best = v
    return out


@pytest.mark.parametrize("method", ["med_dual_lora", "centralized"])
def test_only_selectable_rounds_are_tested_and_the_results_do_not_change(method):
    over = {"fed.num_rounds": 5}
    every = get_config(
        "smoke", method=method, overrides={**over, "train.test_every_round": True}
    )
    plan = get_config("smoke", method=method, overrides=over)
    assert plan.train.test_every_round is False  # the default
    a, b = simulate([every, plan], runtime="inprocess", verbose=False, use_cache=False)
    timing = {"train_seconds", "elapsed_s", "seconds"}
    fa = a.final.drop(columns=[c for c in timing if c in a.final])
    fb = b.final.drop(columns=[c for c in timing if c in b.final])
    pd.testing.assert_frame_equal(fa, fb)
    # training and validation are the same round by round
    cols = [
        c for c in a.rounds if c.startswith(("train_loss", "val_", "global_only_val"))
    ]
    pd.testing.assert_frame_equal(a.rounds[cols], b.rounds[cols])
    last = int(b.rounds["round"].max())
    prefixes = [""] + (["global_only_"] if method == "med_dual_lora" else [])
    tested_fewer = False
    for client, g in b.rounds.groupby("client"):
        assert a.rounds.loc[a.rounds.client == client, "test_n"].notna().all()
        for p in prefixes:
            tested = set(g.loc[g[f"{p}test_n"].notna(), "round"].astype(int))
            want = _improving_rounds(g, f"{p}val_balanced_accuracy") | {last}
            assert tested == want, (client, p)
            tested_fewer |= len(tested) < last
    assert tested_fewer  # the plan saved something in this run
