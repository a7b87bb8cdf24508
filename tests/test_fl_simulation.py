"""Federation in Flower's Simulation Runtime: every method, bytes, privacy, determinism, failures.

One simulation (one Ray start-up) runs every federated experiment of this module; the
tests then read its results.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from medlora_lib.adapters import get_private_state, get_shared_state
from medlora_lib.comm import closed_form_bytes
from medlora_lib.config import get_config
from medlora_lib.fl import FEDERATED_METHODS, simulate
from medlora_lib.fl.simulate import prepare_specs, run_inprocess
from medlora_lib.fl.task import build_adapted_model

pytestmark = pytest.mark.slow


def _cfg(method: str, rounds: int = 1, seed: int = 0):
    return get_config(
        "smoke",
        overrides=[
            'model.pretrained="none"',
            f"fed.num_rounds={rounds}",
            "train.num_threads=1",
        ],
        method=method,
        seed=seed,
    )


@pytest.fixture(scope="module")
def runs():
    configs = [_cfg(m) for m in FEDERATED_METHODS if m != "med_dual_lora"]
    configs += [_cfg("med_dual_lora", 2), _cfg("med_dual_lora", 2)]  # determinism
    configs += [_cfg("fedavg_lora", 2, seed=1)]  # failure injected below
    results = simulate(
        configs,
        record_messages=True,
        verbose=False,
        inject_failure={
            "experiment": len(configs) - 1,
            "partition": 1,
            "round": 1,
            "phase": "train",
        },
    )
    return dict(zip(range(len(configs)), results, strict=True)), configs


def test_every_federated_method_runs_and_reports(runs):
    results, configs = runs
    for r in results.values():
        n_clients = r.rounds["client"].nunique()
        assert n_clients == 4
        assert len(r.rounds) == r.config.fed.num_rounds * n_clients
        sel = r.selected()
        assert set(sel.client) == {
            "Siemens",
            "Philips",
            "GE",
            "Canon",
            "mean",
            "pooled",
        }
        assert sel["balanced_accuracy"].between(0, 1).all()


def test_bytes_measured_equal_closed_form(runs):
    results, _ = runs
    shared = {}
    for r in results.values():
        cf = closed_form_bytes(r.config)["shared_bytes"]
        ok = r.rounds.dropna(subset=["bytes_up"])
        assert (ok["bytes_up"] == cf).all(), r.method
        assert (ok["bytes_down"] == cf).all(), r.method
        # evaluation rides on the next train message: only the last round downloads
        ev = r.rounds.dropna(subset=["bytes_down_eval"])
        assert (ev["bytes_down_eval"] == cf).all(), r.method
        assert set(ev["round"]) == {r.config.fed.num_rounds}, r.method
        assert (ok["wire_bytes_up"] > ok["bytes_up"]).all()  # headers + key strings
        assert r.comm["matches_closed_form"]
        # and it is what the model really shares
        model = build_adapted_model(r.config)
        real = sum(t.numel() * 4 for t in get_shared_state(model).values())
        assert real == cf
        shared[r.method] = cf
    assert shared["ffa_lora"] < shared["fedavg_lora"]
    assert shared["fedsa_lora"] < shared["fedavg_lora"]
    assert shared["med_dual_lora"] == shared["fedavg_lora"]


def test_med_dual_lora_never_sends_private_tensors(runs):
    results, _ = runs
    r = next(r for r in results.values() if r.method == "med_dual_lora")
    model = build_adapted_model(r.config)
    shared_keys = set(get_shared_state(model))
    private_keys = set(get_private_state(model))
    assert private_keys and any(".local." in k for k in private_keys)
    msgs = r.messages
    rounds, clients = r.config.fed.num_rounds, 4
    # every message, both directions, train and evaluate (evaluate messages only in
    # the last round: earlier rounds are evaluated inside the next train message)
    for direction in ("down", "up"):
        for phase, per_client in (("train", rounds), ("evaluate", 1)):
            n = sum(
                1 for m in msgs if m["direction"] == direction and m["phase"] == phase
            )
            assert n == per_client * clients, (direction, phase)
    n_arrays = 0
    for m in msgs:
        assert "error" not in m
        for rec in m["records"].values():
            if rec["type"] == "ArrayRecord":
                keys = set(rec["keys"])
                n_arrays += 1
                assert keys == shared_keys
                assert not keys & private_keys
                assert not any(re.search(r"\.local\.", k) for k in keys)
            else:  # configs and metrics carry scalars / strings only, never tensors
                assert set(rec["value_types"]) <= {"int", "float", "str", "bool"}
    assert n_arrays == (2 * rounds + 1) * clients  # train down + up, last evaluate down


def test_same_seed_same_metrics(runs):
    results, _ = runs
    a, b = [r for r in results.values() if r.method == "med_dual_lora"]
    cols = [
        c for c in a.rounds.columns if c.startswith(("val_", "test_", "global_only_"))
    ]
    pd.testing.assert_frame_equal(a.rounds[cols], b.rounds[cols])
    assert np.array_equal(a.rounds["train_loss"], b.rounds["train_loss"])
    pd.testing.assert_frame_equal(a.final, b.final)


def test_flower_equals_plain_inprocess_loop(runs):
    results, _ = runs
    a = next(r for r in results.values() if r.method == "med_dual_lora")
    spec = prepare_specs([a.config])[0]
    rows, _, state = run_inprocess(spec, verbose=False, return_state=True)
    b = pd.DataFrame(rows)
    np.testing.assert_allclose(a.rounds["train_loss"], b["train_loss"], rtol=1e-5)
    # the final global state the server kept is the plain loop's last aggregate
    assert a.final_shared is not None and set(a.final_shared) == set(state)
    for k, v in state.items():
        np.testing.assert_allclose(a.final_shared[k].numpy(), v.numpy(), atol=1e-6)
    for c in ("val_balanced_accuracy", "test_balanced_accuracy", "test_tp", "test_tn"):
        np.testing.assert_array_equal(a.rounds[c], b[c])


def test_failing_client_is_recorded_and_round_completes(runs):
    results, configs = runs
    r = results[len(configs) - 1]
    assert len(r.failures) == 1
    f = r.failures[0]
    assert (f["round"], f["phase"], f["partition"]) == (1, "train", 1)
    assert "injected failure" in f["reason"]
    r1 = r.rounds[r.rounds["round"] == 1].set_index("partition")
    assert np.isnan(r1.loc[1, "train_loss"])  # failed client: no training row
    assert r1.drop(index=1)["train_loss"].notna().all()  # the others trained
    r2 = r.rounds[r.rounds["round"] == 2]
    assert r2["train_loss"].notna().all()  # next round: everyone again
    assert len(r.selected()) == 6


def test_bytes_table_reads_the_measured_bytes(runs):
    from medlora_lib.comm import bytes_table

    results, _ = runs
    table = bytes_table(results.values())
    assert list(table.index) == list(dict.fromkeys(r.method for r in results.values()))
    for method, row in table.iterrows():
        r = next(r for r in results.values() if r.method == method)
        assert row["measured up (B)"] == closed_form_bytes(r.config)["shared_bytes"]
        assert row["measured = closed form"]
        assert row["serialised up (B)"] > row["measured up (B)"]
