"""The project's Flower App on a loopback Deployment Runtime (SuperLink + a SuperNode per
site): TLS with SuperNode authentication, a SuperNode killed and restarted mid-run, the
SuperLink killed and the run resumed — each compared with the simulation of the same seed.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from medlora_lib.config import get_config
from medlora_lib.fl import simulate
from medlora_lib.fl.deploy import Deployment, deploy

pytestmark = pytest.mark.slow


def _cfg(rounds: int = 2, **fed):
    overrides = {
        "model.pretrained": "none",
        "fed.num_rounds": rounds,
        "train.num_threads": 1,
        "fed.exclude": ["GE", "Canon"],  # two sites: Siemens and Philips
        # deployed sites report only the validation metric by default (auto):
        # these tests compare every metric with the simulation
        "privacy.metrics": "full",
        **{f"fed.{k}": v for k, v in fed.items()},
    }
    return get_config("smoke", overrides=overrides, method="med_dual_lora", seed=3)


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted simulation every deployment must reproduce."""
    return {r: simulate(_cfg(r), verbose=False) for r in (2, 3)}


def _same(dep, sim) -> None:
    a, b = dep.rounds, sim.rounds
    assert (
        list(a["client"])
        == list(b["client"])
        == ["Siemens", "Philips"] * len(set(a["round"]))
    )
    np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-6)
    for c in ("val_balanced_accuracy", "test_balanced_accuracy", "test_tp", "test_tn"):
        np.testing.assert_array_equal(a[c], b[c])
    for k, v in sim.final_shared.items():
        np.testing.assert_allclose(dep.final_shared[k].numpy(), v.numpy(), atol=1e-6)


def _wait_for(path, proc_ok, timeout=300.0):
    t0 = time.monotonic()
    while not path.exists():
        assert proc_ok(), "the run ended before the checkpoint appeared"
        assert time.monotonic() - t0 < timeout, f"no {path} after {timeout} s"
        time.sleep(0.2)


def _in_thread(dep, out: dict) -> threading.Thread:
    def go():
        try:
            out["status"] = dep.run(timeout=600)
        except BaseException as exc:  # reported by the test
            out["error"] = exc

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def test_tls_and_supernode_auth_deployment_equals_simulation(reference, tmp_path):
    from tests.flower_apps import check_message_keys

    t0 = time.perf_counter()
    dep = Deployment(
        _cfg(2), tmp_path / "w", tls=True, supernode_auth=True, record_messages=True
    )
    try:
        link = dep.start_superlink()
        assert "--insecure" not in link.command()
        for s in dep.sites:
            dep.start_supernode(s)
        assert dep.run(timeout=600) == 0
        result = dep.result()
    finally:
        dep.stop()
    print(f"TLS + auth deployment: {time.perf_counter() - t0:.1f} s")
    assert result.provenance["runtime"] == "flower-deployment"
    assert result.failures == []
    _same(result, reference[2])
    check_message_keys(result)  # the same key sets as in the Simulation Runtime
    # every site kept its private state and the model it uses on its own disk
    for s in dep.sites:
        runs = [p for p in (dep.work / "sites-state" / s).iterdir() if p.is_dir()]
        assert len(runs) == 1 and (runs[0] / "deployed-best" / "local_adapter").is_dir()


def test_a_killed_supernode_restarts_and_continues_from_its_state(reference, tmp_path):
    # two sites: the round must go on with one (fed.min_sites=1) while the other is away
    dep = Deployment(_cfg(3, round_timeout=40.0, min_sites=1), tmp_path / "w")
    out: dict = {}
    try:
        dep.start_superlink()
        for s in dep.sites:
            dep.start_supernode(s)
        thread = _in_thread(dep, out)
        _wait_for(dep.run_dir / "checkpoint" / "round-0001", thread.is_alive)
        victim = dep.nodes["Philips"]
        os.killpg(victim.pid, signal.SIGKILL)  # the SuperNode and its ClientApp process
        victim.wait(timeout=30)
        log = dep.work / "nodes" / "Philips.log"
        before = log.stat().st_size
        time.sleep(1.0)
        dep.start_supernode("Philips")  # same data-path and state-dir
        thread.join(timeout=600)
        assert not thread.is_alive() and "error" not in out, out
        result = dep.result()
    finally:
        dep.stop()
    after = log.read_text()[before:]
    # the restarted SuperNode continued from its saved local adapter, not from scratch
    assert "site Philips: round" in after
    assert "starts from its saved state of round" in after
    assert "starts from its initial state" not in after
    assert sorted(set(result.rounds["round"])) == [1, 2, 3]
    missed = [f for f in result.failures if f["site"] == "Philips"]
    assert all(f["round"] >= 2 for f in missed)
    # Siemens trained every round; the run completed with both sites in the last one
    last = result.rounds[result.rounds["round"] == 3].set_index("client")
    assert last["train_loss"].notna().all()


def test_a_killed_superlink_resumes_and_equals_an_uninterrupted_run(
    reference, tmp_path
):
    dep = Deployment(_cfg(3), tmp_path / "w")
    out: dict = {}
    try:
        link = dep.start_superlink()
        for s in dep.sites:
            dep.start_supernode(s)
        thread = _in_thread(dep, out)
        _wait_for(dep.run_dir / "checkpoint" / "round-0001", thread.is_alive)
        os.killpg(link.proc.pid, signal.SIGKILL)  # the SuperLink and its ServerApp
        link.proc.wait(timeout=30)
        thread.join(timeout=120)
        assert not (dep.run_dir / "results.json").exists()
        dep.start_superlink()  # same port and state database; the SuperNodes reconnect
        assert dep.run(timeout=600) == 0  # the same run config: resumes
        result = dep.result()
    finally:
        dep.stop()
    assert "resuming" in (dep.work / "flwr-run.log").read_text()
    _same(result, reference[3])


def test_a_private_deployment_dp_at_the_sites_and_minimal_metrics(tmp_path):
    """Loopback deployment with DP-SGD at each site, site-level DP clipped at the sites
    (Flower's fixedclipping_mod) and the deployment's default metrics (minimal)."""
    from medlora_lib.fl.site_dp import site_dp_epsilon
    from medlora_lib.fl.site_state import SiteStateStore

    cfg = get_config(
        "smoke",
        method="med_dual_lora",
        seed=3,
        overrides={
            "model.pretrained": "none",
            "fed.num_rounds": 2,
            "train.num_threads": 1,
            "fed.exclude": ["GE", "Canon"],
            "privacy.site_dp": "client_fixed",
            "privacy.noise_multiplier": 0.5,
            "privacy.clipping_norm": 0.5,
            "privacy.dp_sgd": True,
        },
    )
    work = tmp_path / "w"
    result = deploy(
        cfg, work_dir=work, record_messages=True, verbose=False, timeout=600
    )
    assert result.failures == []
    assert result.privacy["site_dp_epsilon"] == pytest.approx(
        site_dp_epsilon(0.5, 2, 1e-5)
    )
    assert set(result.privacy["dp_sgd_epsilon"]) == {"Siemens", "Philips"}
    assert all(e > 0 for e in result.privacy["dp_sgd_epsilon"].values())
    # the server got the validation selection metric and nothing of the test sets
    assert not [c for c in result.rounds.columns if c.startswith("test_")]
    allowed_eval = {"val_balanced_accuracy", "val_n"}
    for m in result.messages:
        recs = m["records"]
        if m["direction"] == "down" and m["phase"] == "train":
            assert "clipping_norm" in recs["config"]["keys"]  # the sites clip
        if m["direction"] == "up" and m["phase"] in ("train", "evaluate"):
            keys = set(recs["metrics"]["keys"])
            prev = {k.removeprefix("prev-eval/") for k in keys if "/" in k}
            assert prev <= allowed_eval, keys
            if m["phase"] == "evaluate":
                assert keys == {"num-examples"} | allowed_eval
    # ... while each site kept its full evaluation in its own state folder
    for s in ("Siemens", "Philips"):
        store = SiteStateStore(work / "sites-state" / s, s)
        last = store.deployed(result.exp_id, "last")
        assert "test_balanced_accuracy" in last["meta"]["metrics"]
