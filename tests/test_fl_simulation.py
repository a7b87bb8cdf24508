"""Federation in Flower's Simulation Runtime (``flwr run``): every method, messages, bytes,
privacy, determinism, failures, resume.

One Flower run (``run.batch``: one Ray start-up) runs every federated method of this
module; a second one runs the project's app with a ClientApp that fails on purpose.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pandas as pd
import pytest

from medlora_lib.adapters import get_private_state, get_shared_state
from medlora_lib.comm import closed_form_bytes
from medlora_lib.config import get_config
from medlora_lib.fl import FEDERATED_METHODS, simulate
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


_TRACE: dict = {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from medlora_lib.fl.trace import tracing

    configs = [_cfg(m) for m in FEDERATED_METHODS if m != "med_dual_lora"]
    # 3 rounds: round 3's train message is the first to carry a site's best validation
    # value of its earlier rounds (test-above, train.test_every_round=false)
    configs += [_cfg("med_dual_lora", 3)]
    traced = tmp_path_factory.mktemp("trace")
    with tracing(traced):  # the per-message trace (fl/trace.py), too
        results = simulate(configs, record_messages=True, verbose=False)
    _TRACE["dir"] = traced
    return results, configs


def test_the_trace_has_every_message_of_every_run(runs):
    """fl/trace.py through real processes: one row per message that came back, joined
    across the flwr-simulation process and the Ray actors."""
    from medlora_lib.fl.trace import breakdown, per_round, read_trace

    results, _ = runs
    msgs = breakdown(read_trace(_TRACE["dir"]))
    assert set(msgs["run"]) >= {r.exp_id for r in results}
    for r in results:
        came_back = [
            m
            for m in r.messages
            if m["direction"] == "up" and "error" not in m and m["phase"] != "query"
        ]
        mine = msgs[(msgs["run"] == r.exp_id) & (msgs["phase"] != "query")]
        assert len(mine) == len(came_back), r.method
        assert set(mine["site"]) == set(r.rounds["client"])
    train = msgs[msgs["phase"] == "train"]
    assert (train["compute"] > 0).all() and (train["state"] > 0).all()
    assert (msgs[["down", "up", "handler_other"]] > -0.01).all().all()
    rounds = per_round(msgs)
    assert ((rounds["idle"] >= 0) & (rounds["idle"] <= rounds["wall"])).all()


@pytest.fixture(scope="module")
def failing(tmp_path_factory):
    """A run with a failing site; meanwhile every listening socket of every process it
    starts (SuperLink, Ray's GCS and raylet, the apps) is recorded."""
    import os
    import threading

    import psutil

    from tests.flower_apps import failing_app

    app = failing_app(tmp_path_factory.mktemp("apps"))
    out: dict = {}

    def go():
        out["result"] = simulate(
            _cfg("fedavg_lora", 3, seed=1), verbose=False, app_dir=app
        )

    t = threading.Thread(target=go)
    t.start()
    listening: set = set()
    me = psutil.Process(os.getpid())
    while t.is_alive():
        pids = {p.pid for p in me.children(recursive=True)}
        for c in psutil.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN and c.pid in pids:
                try:
                    listening.add((c.laddr.ip, psutil.Process(c.pid).name()))
                except psutil.Error:  # exited meanwhile
                    pass
        time.sleep(0.5)
    t.join()
    out["listening"] = listening
    return out


def test_every_federated_method_runs_and_reports(runs):
    results, configs = runs
    for r, cfg in zip(results, configs, strict=True):
        assert r.method == cfg.method and r.config == cfg
        assert r.provenance["runtime"] == "flower-simulation"
        # the messages went through medlora's on-arrival LinkState sweep (fl/flower_poll)
        assert r.provenance["flower_sweep"] == "on-arrival"
        assert list(r.rounds["client"].unique()) == [
            "Siemens",
            "Philips",
            "GE",
            "Canon",
        ]
        assert r.failures == []
        sel = r.selected()
        assert list(sel["client"]) == [
            "Siemens",
            "Philips",
            "GE",
            "Canon",
            "mean",
            "pooled",
        ]
        assert sel["balanced_accuracy"].between(0, 1).all()


def test_every_message_carries_only_the_allowed_keys(runs):
    """Each message: the shared tensors, the round's config, scalar metrics. Nothing else."""
    from tests.flower_apps import check_message_keys

    results, _ = runs
    for r in results:
        check_message_keys(r)
    # each site's own plan for its test split reached it in round 3 (fl/federation)
    dual = next(r for r in results if r.method == "med_dual_lora")
    carried = [
        m["records"]["config"]["keys"]
        for m in dual.messages
        if (m["direction"], m["phase"]) == ("down", "train") and m.get("round") == 3
    ]
    assert len(carried) == 4, [(m["direction"], m["phase"]) for m in dual.messages]
    for keys in carried:
        assert {"test-above", "global-only-test-above"} <= set(keys), keys


def test_bytes_measured_equal_closed_form(runs):
    results, _ = runs
    shared = {}
    for r in results:
        cf = closed_form_bytes(r.config)
        assert r.comm["matches_closed_form"], r.method
        assert r.comm["bytes_up_per_client_round"] == [cf["shared_bytes"]]
        shared[r.method] = cf["shared_bytes"]
    assert shared["ffa_lora"] < shared["fedavg_lora"]
    assert shared["fedsa_lora"] < shared["fedavg_lora"]
    assert shared["med_dual_lora"] == shared["fedavg_lora"]


def test_med_dual_lora_never_sends_private_tensors(runs):
    results, _ = runs
    r = next(r for r in results if r.method == "med_dual_lora")
    model = build_adapted_model(r.config)
    shared_keys = set(get_shared_state(model))
    private_keys = set(get_private_state(model))
    assert private_keys and any(".local." in k for k in private_keys)
    rounds, sites = r.config.fed.num_rounds, 4
    for direction in ("down", "up"):
        for phase, per_site in (("train", rounds), ("evaluate", 1), ("query", 1)):
            n = sum(
                1
                for m in r.messages
                if m["direction"] == direction and m["phase"] == phase
            )
            assert n == per_site * sites, (direction, phase)
    n_arrays = 0
    for m in r.messages:
        for rec in m["records"].values():
            if rec["type"] == "ArrayRecord":
                n_arrays += 1
                assert set(rec["keys"]) == shared_keys
                assert not any(re.search(r"\.local\.", k) for k in rec["keys"])
    assert n_arrays == (2 * rounds + 1) * sites  # train down + up, last evaluate down


def test_flower_equals_plain_inprocess_loop(runs):
    results, _ = runs
    a = next(r for r in results if r.method == "med_dual_lora")
    b = simulate(a.config, runtime="inprocess", verbose=False)
    np.testing.assert_allclose(
        a.rounds["train_loss"], b.rounds["train_loss"], rtol=1e-5
    )
    assert a.final_shared is not None and set(a.final_shared) == set(b.final_shared)
    for k, v in b.final_shared.items():
        np.testing.assert_allclose(a.final_shared[k].numpy(), v.numpy(), atol=1e-6)
    for c in ("val_balanced_accuracy", "test_balanced_accuracy", "test_tp", "test_tn"):
        np.testing.assert_array_equal(a.rounds[c], b.rounds[c])
    pd.testing.assert_frame_equal(
        a.final.drop(columns=["notes"]), b.final.drop(columns=["notes"])
    )


def test_the_simulation_listens_on_loopback_only(failing):
    names = {name for _, name in failing["listening"]}
    assert {"gcs_server", "raylet"} <= names  # Ray was seen while it ran
    assert {ip for ip, _ in failing["listening"]} <= {
        "127.0.0.1",
        "::ffff:127.0.0.1",
        "::1",
    }


def test_failing_site_is_recorded_by_name_and_the_run_goes_on(failing):
    r = failing["result"]
    train_fails = [f for f in r.failures if f["phase"] == "train"]
    assert len(train_fails) == 1
    f = train_fails[0]
    assert (f["round"], f["site"]) == (2, "Philips")
    assert "injected failure" in f["reason"]
    by = r.rounds.set_index(["round", "client"])
    assert np.isnan(by.loc[(2, "Philips"), "train_loss"])  # no training row
    assert by.loc[2]["train_loss"].drop(index="Philips").notna().all()
    # its round-1 evaluation rode on the failed message: the server fetched it anyway
    assert not np.isnan(by.loc[(1, "Philips"), "val_balanced_accuracy"])
    assert by.loc[3]["train_loss"].notna().all()  # next round: everyone again
    assert len(r.selected()) == 6


def test_bytes_table_reads_the_measured_bytes(runs):
    from medlora_lib.comm import bytes_table

    results, _ = runs
    table = bytes_table(results)
    assert list(table.index) == list(dict.fromkeys(r.method for r in results))
    for method, row in table.iterrows():
        r = next(r for r in results if r.method == method)
        assert row["measured up (B)"] == closed_form_bytes(r.config)["shared_bytes"]
        assert row["measured = closed form"]
        assert row["serialised up (B)"] > row["measured up (B)"]


def test_flwr_run_with_run_config_overrides(tmp_path):
    """The README's command: `flwr run . --run-config "k=v ..."`, parsed by Flower; on
    the checkout itself (the other runs get its staged bundle files, the same FAB)."""
    from medlora_lib.fl.result import RunResult
    from medlora_lib.fl.runner import LoopbackSuperLink, flwr_run, project_dir

    out = tmp_path / "run"
    overrides = [
        "method='fedsa_lora'",
        "profile='smoke'",
        "fed.num-rounds=1",
        "model.pretrained='none'",
        "train.num-threads=1",
        f"run.dir='{out}'",
    ]
    with LoopbackSuperLink(tmp_path / "link", simulation=True) as link:
        status = flwr_run(
            link,
            overrides,
            "num-supernodes=4 client-resources-num-cpus=1",
            app_dir=project_dir(),
        )
        assert status == 0
        bad = flwr_run(link, ["fed.num-rnds=3"], "num-supernodes=4")
    r = RunResult.load(out)
    assert r.method == "fedsa_lora" and r.config.fed.num_rounds == 1
    assert r.config.data.image_size == (32, 32, 8)  # the smoke profile's default
    assert r.config == _cfg("fedsa_lora")
    # Flower itself refuses a key that [tool.flwr.app.config] does not have, before
    # the run starts ("Invalid run configuration"; its SuperLink log names the key)
    assert bad != 0
    assert (
        "Invalid run configuration" in (tmp_path / "link" / "flwr-run.log").read_text()
    )
    log = (tmp_path / "link" / "superlink.log").read_text()
    assert "Key 'fed.num-rnds' is not present" in log
