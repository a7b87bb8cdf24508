"""The federation layer without processes: sites, site state, checkpoints, the round loop
over a fake Grid (time-outs, lost and returning sites), the node config and bad input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from medlora_lib.config import get_config, to_run_config
from medlora_lib.errors import ConfigError, DataError
from medlora_lib.fl.checkpoint import (
    Checkpoint,
    check_resumable,
    load_checkpoint,
    save_checkpoint,
)
from medlora_lib.fl.federation import FederationError
from medlora_lib.fl.site_state import SiteStateStore
from medlora_lib.fl.sites import (
    folder_site,
    load_site,
    site_names,
    split_into_sites,
)
from medlora_lib.pipeline import resolve_data_dir


@pytest.fixture(scope="module")
def smoke_dir():
    return resolve_data_dir(get_config("smoke"), verbose=False)


# ------------------------------------------------------------------ sites
def test_partitions(smoke_dir):
    assert site_names(smoke_dir, "vendor") == ["Siemens", "Philips", "GE", "Canon"]
    assert site_names(smoke_dir, "vendor+acdc")[-1] == "ACDC"
    centres = site_names(smoke_dir, "centre")
    # M&Ms: two Philips hospitals, and Siemens at an M&Ms centre and at Dijon (ACDC)
    assert [c for c in centres if c.startswith("Philips")] == ["Philips-2", "Philips-3"]
    assert len(centres) == 6


def test_a_site_loads_only_its_own_arrays(smoke_dir, monkeypatch):
    import numpy as np

    opened = []
    real = np.load
    monkeypatch.setattr(
        np, "load", lambda p, *a, **k: (opened.append(str(p)), real(p, *a, **k))[1]
    )
    m = pd.read_csv(smoke_dir / "manifest.csv")
    cd = load_site(smoke_dir, "Philips-3", "centre")
    own = set(m[(m.vendor == "Philips") & (m.centre.astype(str) == "3")]["path"])
    assert {Path(p).relative_to(smoke_dir).as_posix() for p in opened} == own
    assert sum(len(v) for v in cd.subjects.values()) == len(own)


def test_each_replicate_draws_its_own_stratified_split(smoke_dir):
    import warnings

    from medlora_lib.fl.sites import load_options

    m = pd.read_csv(smoke_dir / "manifest.csv")
    site = m[m.vendor == "Siemens"]

    def subjects(seed: int, split: str = "per_seed") -> dict[str, list[str]]:
        cfg = get_config("smoke", seed=seed, overrides={"data.split": split})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cd = load_site(smoke_dir, "Siemens", **load_options(cfg))
        return {k: sorted(v) for k, v in cd.subjects.items()}

    a, b, again = subjects(0), subjects(1), subjects(0)
    assert a == again  # seed-deterministic
    assert a["test"] != b["test"]  # another replicate, another test set
    for split in (a, b):  # every subject once, the sizes fixed by the fractions
        assert sorted(sum(split.values(), [])) == sorted(site["subject_id"])
        assert {k: len(v) for k, v in split.items()} == {
            k: len(v) for k, v in a.items()
        }
    # each replicate keeps both classes in every split (stratified)
    label = dict(zip(site["subject_id"], site["label"], strict=True))
    for split in (a, b):
        for ids in split.values():
            assert {label[i] for i in ids} == {0, 1}
    # data.split=fixed: the prepared folder's split, whatever the seed
    fixed = {
        k: sorted(site.loc[site["split"] == k, "subject_id"])
        for k in ("train", "val", "test")
    }
    assert subjects(0, "fixed") == subjects(1, "fixed") == fixed
    with pytest.raises(ConfigError, match="data.split"):
        get_config("smoke", overrides={"data.split": "random"})


def test_split_into_sites_and_folder_site(smoke_dir, tmp_path):
    out = split_into_sites(smoke_dir, tmp_path / "sites", "vendor")
    assert list(out) == ["Siemens", "Philips", "GE", "Canon"]
    assert folder_site(out["GE"]) == "GE"
    with pytest.raises(DataError, match="holds 4 sites"):
        folder_site(smoke_dir)
    with pytest.raises(DataError, match="overwrite"):
        split_into_sites(smoke_dir, tmp_path / "sites", "vendor")


def test_a_site_without_training_data_is_named(smoke_dir, tmp_path):
    out = split_into_sites(smoke_dir, tmp_path / "s", "vendor", ["GE"])["GE"]
    m = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    m = m[m.split != "train"]
    m.to_csv(out / "manifest.csv", index=False)
    with pytest.raises(DataError, match="site 'GE' has no training subjects"):
        load_site(out, "GE")


def test_another_image_size_is_refused(smoke_dir):
    with pytest.raises(DataError, match=r"data.image_size=\[48, 48, 8\]"):
        load_site(smoke_dir, "GE", image_size=(48, 48, 8))


# ------------------------------------------------------------------ site state
def test_site_state_round_trip_is_bit_exact_and_keeps_two_rounds(tmp_path):
    store = SiteStateStore(tmp_path / "state", "GE")
    store.bind("run-a", {"x": 1}, "id1")
    states = {}
    for rnd in (1, 2, 3):
        states[rnd] = {"w": torch.randn(3, 4, dtype=torch.float32) * rnd}
        store.save_round("run-a", rnd, states[rnd])
    assert store.rounds("run-a") == [2, 3]
    rnd, got = store.load_before("run-a", 4)
    assert rnd == 3 and torch.equal(got["w"], states[3]["w"])
    rnd, got = store.load_before("run-a", 3)  # a resumed server re-runs round 3
    assert rnd == 2 and torch.equal(got["w"], states[2]["w"])
    assert store.load_before("run-a", 1) is None
    assert not list((tmp_path / "state" / "run-a").glob(".*tmp*"))


def test_site_state_refuses_another_site_or_configuration(tmp_path):
    SiteStateStore(tmp_path / "s", "GE").bind("run-a", {"method": "a"}, "id1")
    with pytest.raises(DataError, match="belongs to site 'GE'"):
        SiteStateStore(tmp_path / "s", "Canon")
    with pytest.raises(ConfigError, match="first differing key: `method"):
        SiteStateStore(tmp_path / "s", "GE").bind("run-a", {"method": "b"}, "id2")


def test_corrupt_site_state_is_named(tmp_path):
    store = SiteStateStore(tmp_path / "s", "GE")
    store.bind("r", {}, "i")
    path = store.save_round("r", 1, {"w": torch.ones(2)}) / "private.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="corrupt"):
        store.load_before("r", 2)


# ------------------------------------------------------------------ checkpoints
def test_checkpoint_resume_and_refusals(tmp_path):
    cfg = get_config("smoke")
    for rnd in (1, 2, 3):
        save_checkpoint(
            tmp_path,
            Checkpoint(
                rnd,
                "key",
                cfg.to_dict(),
                {"w": torch.full((2,), float(rnd))},
                rows=[{"round": rnd}],
            ),
        )
    ck = load_checkpoint(tmp_path)
    assert ck.round == 3 and torch.equal(ck.shared["w"], torch.full((2,), 3.0))
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == [
        "round-0002",
        "round-0003",
    ]
    check_resumable(ck, cfg.to_dict(), tmp_path)  # same config: fine
    # an operational key may change on resume
    check_resumable(
        ck, get_config("smoke", overrides=["fed.round_timeout=5"]).to_dict(), tmp_path
    )
    with pytest.raises(ConfigError, match=r"first differing key: train\.lr"):
        check_resumable(
            ck, get_config("smoke", overrides=["train.lr=0.5"]).to_dict(), tmp_path
        )
    # a damaged newest round falls back to the previous one
    (tmp_path / "checkpoint" / "round-0003" / "shared.safetensors").write_bytes(b"x")
    assert load_checkpoint(tmp_path).round == 2


# ------------------------------------------------------------------ node config
def test_supernode_without_data_path_or_state_dir(smoke_dir):
    from medlora_lib.fl.client_app import site_context

    rc = to_run_config(get_config("smoke"))
    with pytest.raises(ConfigError, match="no state-dir"):
        site_context(rc, {"data-path": str(smoke_dir)}, 0)
    with pytest.raises(ConfigError, match="names no data"):
        site_context(rc, {}, 0)
    with pytest.raises(DataError, match="one site only"):
        site_context(rc, {"data-path": str(smoke_dir), "state-dir": "/tmp/x"}, 0)


def test_simulation_with_too_few_supernodes_says_how_many(smoke_dir):
    from medlora_lib.fl.client_app import site_context

    rc = to_run_config(get_config("smoke"))
    with pytest.raises(ConfigError, match="num-supernodes=4"):
        site_context(rc, {"partition-id": 0, "num-partitions": 2}, 0)
    ctx = site_context(rc, {"partition-id": 3, "num-partitions": 5}, 0)
    assert ctx.site == "Canon"
    assert site_context(rc, {"partition-id": 4, "num-partitions": 5}, 0).site == ""


def test_server_cannot_choose_the_weights_file_of_a_site(smoke_dir, tmp_path):
    from medlora_lib.fl.client_app import site_context

    ge = split_into_sites(smoke_dir, tmp_path, "vendor", ["GE"])["GE"]
    rc = to_run_config(
        get_config("smoke", overrides=['model.pretrained="/etc/passwd"'])
    )
    with pytest.raises(ConfigError, match="model-path"):
        site_context(rc, {"data-path": str(ge), "state-dir": str(tmp_path / "st")}, 0)


# ------------------------------------------------------------------ round loop, fake grid
@pytest.fixture(autouse=True)
def _task_identity():
    """Messages need a task identity (Flower sets it inside a ServerApp)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield


class FakeGrid:
    """A Grid whose nodes answer from Python functions (or never)."""

    def __init__(self, nodes: dict[int, callable]) -> None:
        self.nodes = dict(nodes)
        self.box: dict[str, Message] = {}
        self.n = 0

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            self.n += 1
            mid = f"m{self.n}"
            m.metadata.__dict__["_message_id"] = mid
            ids.append(mid)
            fn = self.nodes.get(m.metadata.dst_node_id)
            if fn is not None:
                rep = fn(m)
                if rep is not None:
                    self.box[mid] = rep
        return ids

    def pull_messages(self, ids):
        out = []
        for i in ids:
            if i in self.box:
                rep = self.box.pop(i)
                rep.metadata.__dict__["_reply_to_message_id"] = i
                out.append(rep)
        return out


def _site(name: str, node: int, state: dict):
    def answer(m: Message):
        kind = m.metadata.message_type
        if kind == "query":
            content = RecordDict(
                {
                    "site": ConfigRecord({"site": name}),
                    "metrics": MetricRecord({"num-examples": 3}),
                }
            )
        elif kind == "train":
            w = m.content["arrays"].to_torch_state_dict()["w"] + 1
            state[name] = state.get(name, 0) + 1
            content = RecordDict(
                {
                    "arrays": ArrayRecord({"w": w}),
                    "metrics": MetricRecord(
                        {"num-examples": 3, "train-loss": 0.5, "train-seconds": 0.0}
                    ),
                }
            )
        else:
            content = RecordDict(
                {
                    "metrics": MetricRecord(
                        {"num-examples": 1, "val_balanced_accuracy": 0.7}
                    )
                }
            )
        rep = Message(content, reply_to=m)
        rep.metadata.__dict__["_src_node_id"] = node
        return rep

    return answer


def _transport(grid, **fed):
    from medlora_lib.fl.server_app import GridSites
    from medlora_lib.fl.strategies import MedloraFedAvg

    cfg = get_config(
        "smoke", method="fedavg_lora", overrides={f"fed.{k}": v for k, v in fed.items()}
    )
    return GridSites(grid, cfg, MedloraFedAvg(lr=1e-3, run_key="k")), cfg


def test_fewer_sites_than_needed_is_a_clear_timeout_not_a_hang():
    grid = FakeGrid({1: _site("GE", 1, {})})
    t, _ = _transport(grid, min_sites=2, connect_timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(
        FederationError, match=r"only 1 site\(s\) connected .*GE.*fed.min_sites=2"
    ):
        t.connect()
    assert time.monotonic() - t0 < 5


def test_a_silent_site_times_out_by_name_and_the_round_goes_on():
    from medlora_lib.fl.federation import run_rounds

    calls: dict = {}
    grid = FakeGrid(
        {
            1: _site("GE", 1, calls),
            2: _site("Canon", 2, calls),
            3: _site("Siemens", 3, calls),
        }
    )
    t, cfg = _transport(grid, round_timeout=0.3, num_rounds=3, min_sites=2)
    assert t.connect() == ["Siemens", "GE", "Canon"]
    real = grid.nodes[2]
    grid.nodes[2] = lambda m: (
        None if m.metadata.message_type == "train" else real(m)
    )  # Canon hangs
    out = run_rounds(t, cfg, {"w": torch.zeros(2)}, start_round=1, rows=None)
    fails = [f for f in out["failures"] if f["phase"] == "train"]
    assert {(f["round"], f["site"]) for f in fails} == {
        (1, "Canon"),
        (2, "Canon"),
        (3, "Canon"),
    }
    assert all("fed.round_timeout=0.3" in f["reason"] for f in fails)
    assert torch.equal(out["final_shared"]["w"], torch.full((2,), 3.0))
    # too few answer: a clear error that says where the run resumes from
    grid.nodes[1] = lambda m: (
        None if m.metadata.message_type == "train" else _site("GE", 1, calls)(m)
    )
    with pytest.raises(
        FederationError, match="fewer than fed.min_sites=2.*resumes from round 0"
    ):
        run_rounds(t, cfg, {"w": torch.zeros(2)})


def test_a_site_that_comes_back_under_a_new_node_rejoins():
    calls: dict = {}
    grid = FakeGrid({1: _site("GE", 1, calls), 2: _site("Canon", 2, calls)})
    t, _ = _transport(grid)
    t.connect()
    del grid.nodes[2]  # Canon's SuperNode died ...
    assert t.sites(2) == ["GE"]
    grid.nodes[7] = _site("Canon", 7, calls)  # ... and restarted with a new node id
    assert t.sites(3) == ["GE", "Canon"] and t._node("Canon") == 7


def test_a_restarted_site_that_answers_late_still_rejoins():
    # the killed node is still listed (its heartbeat has not expired) and the restarted
    # one is slow to start its ClientApp: its answer comes after the wait
    calls: dict = {}
    grid = FakeGrid({1: _site("GE", 1, calls), 2: _site("Canon", 2, calls)})
    t, _ = _transport(grid, round_timeout=0.2)
    t.connect()
    grid.nodes[2] = lambda m: None  # killed: listed, silent
    held: list = []
    late = _site("Canon", 7, calls)
    grid.nodes[7] = lambda m: held.append((m, late(m)))  # answers nothing yet
    asked = len(held)
    t0 = time.monotonic()
    assert t.sites(2) == ["GE", "Canon"] and t._node("Canon") == 2
    assert 0.2 <= time.monotonic() - t0 < 2  # waited one fed.round_timeout for it
    assert len(held) == asked + 1
    t.sites(3)  # still open: not asked (nor waited for) again
    assert len(held) == asked + 1
    ((m, rep),) = held[-1:]
    grid.box[m.metadata.message_id] = rep  # the late answer arrives
    assert t.sites(4) == ["GE", "Canon"] and t._node("Canon") == 7
    assert t.sites(5) == ["GE", "Canon"] and t._node("Canon") == 7  # 2 not re-asked
    del grid.nodes[2]  # its heartbeat expired
    assert t.sites(6) == ["GE", "Canon"] and t.superseded == {}


def test_run_config_carries_no_path_a_site_opens():
    rc = to_run_config(get_config("smoke"))
    assert json.dumps(rc)  # scalars only
    assert all(isinstance(v, bool | int | float | str) for v in rc.values())


def test_site_name_renames_and_errors_sent_back_hold_no_path(smoke_dir, tmp_path):
    from medlora_lib.fl.client_app import _scrub, site_context

    ge = split_into_sites(smoke_dir, tmp_path, "vendor", ["GE"])["GE"]
    state = tmp_path / "state-of-ge"
    rc = to_run_config(get_config("smoke"))
    node = {"data-path": str(ge), "state-dir": str(state), "site-name": "GE-Oslo"}
    ctx = site_context(rc, node, 0)
    assert (ctx.site, ctx.data_site, ctx.deployed) == ("GE-Oslo", "GE", True)
    text = _scrub(f"cannot read {ge}/arrays/x.npz nor {state}/run/round.json", ctx)
    assert str(ge) not in text and str(state) not in text
    assert "<data-path>/arrays/x.npz" in text and "<state-dir>/run" in text


def test_supernode_auth_needs_tls(smoke_dir, tmp_path):
    from medlora_lib.fl.deploy import Deployment

    with pytest.raises(ConfigError, match="--tls"):
        Deployment(
            get_config("smoke", method="fedavg_lora"), tmp_path, supernode_auth=True
        )


def test_atomic_write_many_fsyncs_only_when_durable(tmp_path, monkeypatch):
    import os

    from medlora_lib.fl import site_state

    synced = []
    real = os.fsync
    monkeypatch.setattr(
        site_state.os, "fsync", lambda fd: (synced.append(fd), real(fd))
    )
    files = {
        tmp_path / f"{k}.safetensors": {"w": torch.full((2,), float(k))} for k in (1, 2)
    }
    site_state.atomic_write_many(files)
    assert len(synced) == 2
    site_state.atomic_write_many(files, durable=False)
    assert len(synced) == 2
    for p, t in files.items():
        assert torch.equal(site_state.read_tensors(p)["w"], t["w"])
    assert not list(tmp_path.glob(".*tmp*"))
    # the site's model: 'best' is durable, 'last' (rewritten every message) atomic only
    store = SiteStateStore(tmp_path / "s", "GE")
    store.bind("r", {}, "i")
    store.save_deployed("r", "last", {"a": torch.ones(1)}, {"b": torch.ones(1)}, {})
    assert len(synced) == 2
    store.save_deployed("r", "best", {"a": torch.ones(1)}, {"b": torch.ones(1)}, {})
    assert len(synced) == 4


def test_trace_breakdown_and_idle_from_the_union_of_handler_intervals(
    tmp_path, monkeypatch
):
    from medlora_lib.fl import trace

    monkeypatch.setenv(trace.ENV, str(tmp_path / "tr"))
    # round 1: two messages pushed at t=0; handlers [1, 4] and [2, 6] overlap -> busy 5
    for mid, site, (a, b), reply in (
        ("m1", "GE", (1, 4), 5),
        ("m2", "Canon", (2, 6), 8),
    ):
        trace.record(
            "server",
            message_id=mid,
            phase="train",
            round=1,
            site=site,
            t_push=0.0,
            t_reply=float(reply),
        )
        trace.record(
            "handler",
            message_id=mid,
            site=site,
            t_enter=float(a),
            t_exit=float(b),
            compute_s=1.5,
            state_s=0.5,
        )
    trace.record(
        "server",
        message_id="lost",
        phase="train",
        round=1,
        site="Philips",
        t_push=0.0,
        t_reply=None,
    )
    msgs = trace.breakdown(trace.read_trace(tmp_path / "tr"))
    assert sorted(msgs.site) == ["Canon", "GE"]
    ge = msgs.set_index("site").loc["GE"]
    assert (ge.total, ge.down, ge.up, ge.handler_other) == (5.0, 1.0, 1.0, 1.0)
    r = trace.per_round(msgs).iloc[0]
    assert (r.wall, r.idle, r.compute, r.state, r.messages) == (8.0, 3.0, 3.0, 1.0, 2)
    monkeypatch.delenv(trace.ENV)
    assert trace.trace_dir() is None
    trace.record("server", message_id="x")  # off: nothing written
    assert len(trace.read_trace(tmp_path / "tr")) == 5
    with trace.tracing(tmp_path / "on"):  # on for the block only
        assert trace.trace_dir() == tmp_path / "on"
    assert trace.trace_dir() is None
    with pytest.raises(ValueError, match="MEDLORA_TRACE_DIR"):
        trace.breakdown([])
