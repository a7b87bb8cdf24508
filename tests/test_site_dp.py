"""Site-level (central) DP on the shared update with Flower's wrappers; what a site
reports (``privacy.metrics``); privacy's bad input (chapter ``notebooks/08_privacy``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict

from medlora_lib.config import get_config, to_run_config
from medlora_lib.errors import ConfigError
from medlora_lib.fl.site_dp import (
    SiteDPAccountant,
    check_site_dp_budget,
    site_dp_epsilon,
)
from medlora_lib.fl.strategies import ROUND_CONFIG_KEYS
from tests.flower_apps import train_message
from tests.test_fl_layer import FakeGrid, _site
from tests.test_fl_layer import _task_identity as _task_identity  # noqa: F401 (autouse)


def _cfg(method: str = "fedavg_lora", **privacy):
    return get_config(
        "smoke",
        method=method,
        overrides={f"privacy.{k}": v for k, v in privacy.items()},
    )


# ------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "field,value,match",
    [
        ("noise_multiplier", -0.1, r"privacy.noise_multiplier`: must be >= 0"),
        ("clipping_norm", 0.0, r"privacy.clipping_norm`: must be > 0"),
        ("clipping_norm", -1.0, r"privacy.clipping_norm`: must be > 0"),
        ("sgd_max_grad_norm", 0.0, r"privacy.sgd_max_grad_norm`: must be > 0"),
        ("delta", 1.0, r"privacy.delta`: must be in \(0, 1\)"),
        ("site_dp", "central", r"privacy.site_dp`: unknown value 'central'"),
        ("metrics", "some", r"privacy.metrics`: unknown value"),
    ],
)
def test_bad_privacy_values_name_the_field(field, value, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(**{field: value})


def test_a_mistyped_privacy_key_names_the_nearest():
    with pytest.raises(ConfigError, match=r"did you mean `privacy.noise_multiplier`"):
        get_config("smoke", overrides={"privacy.noise_multiplyer": 1.0})


@pytest.mark.parametrize("method", ["local", "centralized"])
@pytest.mark.parametrize(
    "what", [{"site_dp": "server_fixed"}, {"dp_sgd": True}, {"secagg": True}]
)
def test_privacy_for_a_method_without_messages_is_refused(method, what):
    with pytest.raises(ConfigError, match=r"sends no messages"):
        _cfg(method, **what)


def test_server_side_clipping_with_secagg_is_refused():
    with pytest.raises(ConfigError, match=r"client_fixed"):
        _cfg(site_dp="server_fixed", secagg=True)


def test_site_dp_without_noise_is_refused():
    with pytest.raises(
        ConfigError, match=r"privacy.noise_multiplier`: 0 adds no noise"
    ):
        _cfg(site_dp="server_fixed", noise_multiplier=0.0)


def test_privacy_off_leaves_the_config_dict_and_hash_unchanged():
    from medlora_lib.config import config_hash

    off = _cfg()
    assert "privacy" not in off.to_dict()
    on = _cfg(site_dp="server_fixed")
    assert on.to_dict()["privacy"]["site_dp"] == "server_fixed"
    assert config_hash(off) != config_hash(on)
    assert type(off).from_dict(on.to_dict()) == on


def test_inprocess_runtime_refuses_privacy():
    from medlora_lib.fl import simulate

    with pytest.raises(ConfigError, match=r"runtime='inprocess'.*runtime='flower'"):
        simulate(_cfg(site_dp="server_fixed"), runtime="inprocess", verbose=False)


# ------------------------------------------------------------------------- accounting
@pytest.mark.parametrize("z,rounds", [(1.0, 20), (0.5, 3), (2.0, 30)])
def test_site_epsilon_matches_an_independent_rdp_computation(z, rounds):
    """Flower's accountant (dp-accounting) against Opacus' RDP analysis of the same
    Gaussian mechanism composed ``rounds`` times (no sampling: q = 1)."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 256))
    rdp = compute_rdp(q=1.0, noise_multiplier=z, steps=rounds, orders=orders)
    ref, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    ours = site_dp_epsilon(z, rounds, 1e-5)
    assert ours == pytest.approx(ref, rel=0.03)


def test_accountant_grows_each_round_and_resumes_from_its_releases():
    acc = SiteDPAccountant(1.0, 1e-5, 4)
    eps = [acc.compose(r, 4) for r in range(1, 6)]
    assert all(b > a > 0 for a, b in zip(eps, eps[1:], strict=False))
    again = SiteDPAccountant(1.0, 1e-5, 4, acc.releases[:3])
    assert again.epsilon() == pytest.approx(eps[2], rel=1e-12)
    assert again.compose(4, 4) == pytest.approx(eps[3], rel=1e-12)


def test_a_target_epsilon_the_rounds_cannot_meet_says_what_would():
    cfg = get_config(
        "smoke",
        method="fedavg_lora",
        overrides={
            "privacy.site_dp": "server_fixed",
            "privacy.noise_multiplier": 1.0,
            "privacy.target_epsilon": 5.0,
            "fed.num_rounds": 20,
        },
    )
    with pytest.raises(ConfigError) as err:
        check_site_dp_budget(cfg)
    from medlora_lib.fl.task import validate_config

    with pytest.raises(ConfigError, match="privacy.target_epsilon"):
        validate_config(cfg)  # refused before any run starts
    text = str(err.value)
    assert "privacy.target_epsilon" in text and "fed.num_rounds=20" in text
    z = float(text.split("privacy.noise_multiplier to at least ")[1].split(",")[0])
    assert site_dp_epsilon(z, 20, 1e-5) <= 5.0 + 1e-6
    assert site_dp_epsilon(0.9 * z, 20, 1e-5) > 5.0
    ok = get_config(
        "smoke",
        method="fedavg_lora",
        overrides={
            "privacy.site_dp": "server_fixed",
            "privacy.noise_multiplier": z,
            "privacy.target_epsilon": 5.0,
            "fed.num_rounds": 20,
        },
    )
    check_site_dp_budget(ok)  # no error


# ------------------------------------------------------------------------- the server
def _grid_transport(cfg):
    from medlora_lib.fl.server_app import GridSites
    from medlora_lib.fl.site_dp import SiteDPAccountant, wrap_strategy
    from medlora_lib.fl.strategies import MedloraFedAvg

    grid = FakeGrid({1: _site("GE", 1, {}), 2: _site("Canon", 2, {})})
    strategy = MedloraFedAvg(lr=1e-3, run_key="k", uniform=True)
    t = GridSites(grid, cfg, strategy)
    t.aggregator = wrap_strategy(strategy, cfg.privacy, 2)
    t.dp_accountant = SiteDPAccountant(cfg.privacy.noise_multiplier, 1e-5, 2)
    assert t.connect() == ["GE", "Canon"]
    return t


def test_server_side_clipping_clips_each_update_then_noises_the_mean():
    """The fake sites add 1 to each of 2 entries (update norm √2); clipped to C = 0.5
    each becomes 0.5/√2; the noise std is z·C/m."""
    z, c = 1e-4, 0.5
    cfg = _cfg(site_dp="server_fixed", noise_multiplier=z, clipping_norm=c)
    t = _grid_transport(cfg)
    out = t.train(1, ["GE", "Canon"], {"w": torch.zeros(2)}, False)
    agg = out.aggregate["w"].numpy()
    np.testing.assert_allclose(agg, c / math.sqrt(2), atol=10 * z * c / 2)
    # the noise is there (std z·C/m = 2.5e-5; rtol=0: numpy's default rtol of 1e-5 would
    # call noise under 3.5e-6 "equal", which both entries are about 1 run in 80)
    assert not np.allclose(agg, c / math.sqrt(2), rtol=0, atol=1e-7)
    assert out.round_metrics["site_dp_epsilon"] == pytest.approx(
        site_dp_epsilon(z, 1, 1e-5)
    )
    assert out.round_metrics["site_dp_clipping_norm"] == c
    # what each site sent stays as it was sent (the clipping is the server's)
    assert torch.equal(out.replies["GE"].shared["w"], torch.ones(2))


def test_site_dp_noise_is_seeded_in_simulation_only():
    cfg = _cfg(site_dp="server_fixed", noise_multiplier=1.0, clipping_norm=0.5)
    a = _grid_transport(cfg).train(1, ["GE", "Canon"], {"w": torch.zeros(2)}, False)
    b = _grid_transport(cfg).train(1, ["GE", "Canon"], {"w": torch.zeros(2)}, False)
    # FakeGrid is not the InMemoryGrid: a deployment draws fresh noise every time
    assert not torch.equal(a.aggregate["w"], b.aggregate["w"])
    # seeded (the simulation): the same noise, and the global generator restored
    from medlora_lib.fl.site_dp import seeded_noise

    before = np.random.get_state()[1].copy()
    with seeded_noise(7):
        x = np.random.normal(size=3)
    with seeded_noise(7):
        y = np.random.normal(size=3)
    np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(np.random.get_state()[1], before)


def test_without_dp_the_strategy_aggregate_is_the_weighted_mean():
    from medlora_lib.fl.server_app import GridSites
    from medlora_lib.fl.strategies import MedloraFedAvg

    grid = FakeGrid({1: _site("GE", 1, {}), 2: _site("Canon", 2, {})})
    t = GridSites(grid, _cfg(), MedloraFedAvg(lr=1e-3, run_key="k"))
    t.connect()
    out = t.train(1, ["GE", "Canon"], {"w": torch.zeros(2)}, False)
    assert torch.equal(out.aggregate["w"], torch.ones(2))
    assert out.round_metrics == {}


# ------------------------------------------------------------------------- the site
def _context(cfg):
    return Context(
        run_id=1,
        node_id=1,
        node_config={},
        state=RecordDict(),
        run_config=to_run_config(cfg),
    )


def _handler(msg, ctx):
    from flwr.app import MetricRecord

    w = torch.full((3,), 2.0)  # an update of norm 2·√3
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": w}),
            "metrics": MetricRecord({"num-examples": 5}),
        }
    )
    return Message(content, reply_to=msg)


def test_client_side_clipping_happens_at_the_site_with_flowers_mod():
    from medlora_lib.fl.mods import privacy_mod

    cfg = _cfg(site_dp="client_fixed", clipping_norm=0.5)
    rep = privacy_mod(
        train_message({"w": torch.zeros(3)}, clipping_norm=0.5), _context(cfg), _handler
    )
    w = rep.content["arrays"].to_torch_state_dict()["w"]
    assert float(torch.linalg.vector_norm(w)) == pytest.approx(0.5, rel=1e-5)


def test_privacy_mod_is_a_no_op_when_privacy_is_off():
    from medlora_lib.fl.mods import privacy_mod

    cfg = _cfg()
    msg = train_message({"w": torch.zeros(3)})
    rep = privacy_mod(msg, _context(cfg), _handler)
    assert torch.equal(
        rep.content["arrays"].to_torch_state_dict()["w"], torch.full((3,), 2.0)
    )
    assert tuple(msg.content["config"].keys()) == ROUND_CONFIG_KEYS


def test_minimal_metrics_send_only_the_validation_selection_metric():
    from types import SimpleNamespace

    from medlora_lib.fl.client_app import reported_metrics

    full = {
        "val_balanced_accuracy": 0.7,
        "val_n": 9.0,
        "val_tp": 3.0,
        "test_balanced_accuracy": 0.6,
        "test_tp": 2.0,
    }
    for mode, deployed, want in [
        ("full", True, set(full)),
        ("minimal", False, {"val_balanced_accuracy", "val_n"}),
        ("auto", True, {"val_balanced_accuracy", "val_n"}),
        ("auto", False, set(full)),
    ]:
        ctx = SimpleNamespace(cfg=_cfg(metrics=mode), deployed=deployed)
        assert set(reported_metrics(ctx, full)) == want, (mode, deployed)


# ------------------------------------------------------------------------- Flower
@pytest.mark.slow
def test_site_dp_in_the_simulation_runtime():
    """Every wrapper through the project's ServerApp / ClientApp (one Ray start): the ε
    of each round is the accountant's, server- and client-side clipping give the same
    model (same clipping, same seeded noise), and privacy off is untouched."""
    from medlora_lib.fl import simulate

    def cfg(mode):
        over = {
            "model.pretrained": "none",
            "fed.num_rounds": 2,
            "train.num_threads": 1,
        }
        if mode != "off":
            over.update(
                {
                    "privacy.site_dp": mode,
                    "privacy.noise_multiplier": 0.5,
                    "privacy.clipping_norm": 0.5,
                }
            )
        return get_config("smoke", overrides=over, method="fedavg_lora")

    modes = (
        "off",
        "server_fixed",
        "client_fixed",
        "server_adaptive",
        "client_adaptive",
    )
    rs = dict(zip(modes, simulate([cfg(m) for m in modes], verbose=False), strict=True))
    for mode in modes[1:]:
        r = rs[mode]
        eps = r.rounds.groupby("round")["site_dp_epsilon"].agg(["min", "max"])
        assert (eps["min"] == eps["max"]).all()  # one server-side value per round
        for rnd, e in eps["max"].items():
            assert e == pytest.approx(site_dp_epsilon(0.5, int(rnd), 1e-5))
        assert r.privacy["site_dp_epsilon"] == pytest.approx(
            site_dp_epsilon(0.5, 2, 1e-5)
        )
        diff = max(
            float((r.final_shared[k] - rs["off"].final_shared[k]).abs().max())
            for k in r.final_shared
        )
        assert diff > 1e-3, mode  # the noise moved the model
    for a, b in (
        ("server_fixed", "client_fixed"),
        ("server_adaptive", "client_adaptive"),
    ):
        for k, v in rs[a].final_shared.items():
            np.testing.assert_allclose(rs[b].final_shared[k], v, atol=1e-5)
    norms = rs["server_adaptive"].rounds.groupby("round")["site_dp_clipping_norm"].max()
    assert norms[1] == 0.5 and norms[2] != 0.5  # adaptive clipping moved the norm
    assert "site_dp_epsilon" not in rs["off"].rounds
    assert rs["off"].privacy == {}
