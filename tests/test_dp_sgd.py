"""Sample-level DP-SGD at every site with Opacus (chapter ``notebooks/08_privacy``):
off changes nothing; on, per-sample gradients through peft's LoRA and the ConvViT
suffix are clipped and noised, the accountant's ε matches independent computations,
a target ε is met, the accountant survives a SuperNode restart; bad input."""

from __future__ import annotations

import dataclasses
import json

import dp_accounting
import pytest
import torch
from flwr.app import Context, RecordDict

from medlora_lib.adapters import get_private_state, get_shared_state
from medlora_lib.config import RunOptions, get_config, to_run_config
from medlora_lib.errors import ConfigError
from medlora_lib.fl.task import ClientRuntime, RoundOutput, round_seed
from medlora_lib.privacy import dp_sgd
from tests.flower_apps import train_message
from tests.test_fl_layer import _task_identity as _task_identity  # noqa: F401 (autouse)

SITE = "Siemens"  # 8 training subjects in the smoke data (7 diseased, 1 healthy)


def _cfg(method: str = "fedavg_lora", **over):
    base = {"train.batch_size": 4}  # q = 4/8: two Poisson-sampled steps per epoch
    return get_config("smoke", method=method, overrides={**base, **over})


@pytest.fixture(scope="module")
def smoke_dir():
    from medlora_lib.pipeline import resolve_data_dir

    return resolve_data_dir(get_config("smoke"), verbose=False)


def _build(cfg, smoke_dir) -> ClientRuntime:
    from medlora_lib.fl.sites import load_options, load_site

    data = load_site(smoke_dir, SITE, **load_options(cfg))
    return ClientRuntime.build(cfg, {SITE: data}, SITE, data_key=str(smoke_dir))


@pytest.fixture(scope="module")
def rt(smoke_dir):
    """A fedavg_lora runtime (prefix cache: only the last 2 blocks run) without DP."""
    return _build(_cfg(), smoke_dir)


def _with(rt: ClientRuntime, **over) -> ClientRuntime:
    """The same site, model and data under another config (every round reloads all
    trainable tensors, so sharing the model between configs is safe)."""
    return dataclasses.replace(rt, cfg=_cfg(rt.cfg.method, **over))


@pytest.fixture(scope="module")
def start(rt):
    """A shared state with non-zero ``lora_B`` (so ``lora_A`` gets gradients too)."""
    g = torch.Generator().manual_seed(3)
    return {
        k: v + 0.05 * torch.randn(v.shape, generator=g)
        for k, v in get_shared_state(rt.model).items()
    }


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _reference_round(rt: ClientRuntime, shared, rnd: int) -> RoundOutput:
    """The training round as it was before DP-SGD existed (copied from the library)."""
    from medlora_lib.train import class_weights, make_optimizer, train_one_epoch

    cfg = rt.cfg
    rt.load(shared, None)
    seed = round_seed(cfg.seed, rt.site, rnd)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in rt.model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.train)
    weight = class_weights(rt.train_labels)
    loss_fn = torch.nn.CrossEntropyLoss(
        weight=weight, label_smoothing=cfg.train.label_smoothing
    )
    rt.model.train()
    loss = train_one_epoch(
        rt.forward,
        params,
        optimizer,
        rt.train_inputs,
        rt.train_labels,
        loss_fn,
        cfg.train,
        gen,
        rt.device,
    )
    rt.model.eval()
    return RoundOutput(
        get_shared_state(rt.model), get_private_state(rt.model), float(loss), 8
    )


# ------------------------------------------------------------------ (a) off = today
def test_dp_sgd_off_is_the_baseline_exactly_and_a_dp_round_leaves_no_trace(rt, start):
    ref = _reference_round(rt, start, 1)
    off = rt.train_round(start, None, 1, dp_state={"ignored": 1}, fresh_randomness=True)
    assert _equal(off.shared, ref.shared) and off.train_loss == ref.train_loss
    assert off.epsilon is None and off.dp_state is None
    on = _with(rt, **{"privacy.dp_sgd": True}).train_round(start, None, 1)
    assert on.epsilon is not None
    # Opacus' hooks and attributes are gone: the next non-private round is unchanged
    assert not any(hasattr(p, "grad_sample") for p in rt.model.parameters())
    assert not hasattr(rt.model, "autograd_grad_sample_hooks")
    assert _equal(rt.train_round(start, None, 1).shared, ref.shared)


# ------------------------------------------------------------------ (b) DP-SGD itself
def _per_sample_by_hand(rt, params, batch, y):
    out = []
    for i in range(y.shape[0]):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        loss = torch.nn.functional.cross_entropy(rt.forward(one), y[i : i + 1])
        out.append(torch.autograd.grad(loss, params))
    return [torch.stack([g[j] for g in out]) for j in range(len(params))]


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("method", ["fedavg_lora", "med_dual_lora"])
def test_opacus_per_sample_gradients_through_peft_lora_and_the_suffix(
    rt, smoke_dir, start, method
):
    """Opacus' grad samplers (hooks on peft's lora_A / lora_B and the heads) equal one
    backward pass per sample, and Opacus' functorch fallback."""
    from opacus import GradSampleModule

    r = rt if method == "fedavg_lora" else _build(_cfg(method), smoke_dir)
    shared = start if method == "fedavg_lora" else get_shared_state(r.model)
    g = torch.Generator().manual_seed(7)  # a fixed non-zero local part
    private = {
        k: v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype)
        for k, v in get_private_state(r.model).items()
    }
    r.load(shared, private)
    r.model.train()
    names, params = zip(
        *[(n, p) for n, p in r.model.named_parameters() if p.requires_grad],
        strict=True,
    )
    assert any("lora_A" in n for n in names) and any("pred_head" in n for n in names)
    batch = {k: v[:5] for k, v in r.train_inputs.items()}
    y = r.train_labels[:5]
    want = _per_sample_by_hand(r, list(params), batch, y)
    for functorch in (False, True):
        gsm = GradSampleModule(r.model, loss_reduction="sum", force_functorch=functorch)
        try:
            torch.nn.functional.cross_entropy(
                r.forward(batch), y, reduction="sum"
            ).backward()
            for n, p, w in zip(names, params, want, strict=True):
                assert p.grad_sample.shape == (5, *p.shape), n
                # float32, other summation orders: a few ulp of the largest entry
                torch.testing.assert_close(p.grad_sample, w, atol=1e-5, rtol=1e-4)
        finally:
            gsm._close()
            for p in params:
                p.grad = None
    assert any(
        float(w.abs().max()) > 0
        for w, n in zip(want, names, strict=True)
        if "lora_A" in n
    )
    r.model.eval()


@pytest.fixture
def captured(monkeypatch):
    """Every DP step: each sample's gradient (Opacus' grad_sample) before clipping, the
    gradient the optimiser gets after clipping + noise, and the tensors then."""
    from opacus.optimizers import DPOptimizer

    steps = []
    real = DPOptimizer.pre_step

    def spy(self, closure=None):
        before = [g.detach().clone() for g in self.grad_samples]
        ok = real(self, closure)
        steps.append(
            {
                "grad_samples": before,
                "grad": [p.grad.detach().clone() for p in self.params],
                "param": [p.detach().clone() for p in self.params],
                "C": self.max_grad_norm,
                "B": self.expected_batch_size,
                "sigma": self.noise_multiplier,
            }
        )
        return ok

    monkeypatch.setattr(DPOptimizer, "pre_step", spy)
    return steps


def _clipped_sum(step) -> list[torch.Tensor]:
    """Σ_i g_i · min(1, C / ||g_i||) from the per-sample gradients, by hand."""
    gs = step["grad_samples"]
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in gs], dim=1).norm(dim=1)
    factor = (step["C"] / (norms + 1e-6)).clamp(max=1.0)
    assert ((norms * factor) <= step["C"] * (1 + 1e-5)).all()  # each sample bounded
    return [torch.einsum("i,i...->...", factor, g) for g in gs], norms


@pytest.mark.parametrize("sigma", [0.0, 2.0])
def test_each_sample_is_clipped_then_gaussian_noise_is_added(
    rt, start, captured, sigma
):
    c = 0.01  # far below the per-sample norms: every sample is clipped
    r = _with(
        rt,
        **{
            "privacy.dp_sgd": True,
            "privacy.sgd_max_grad_norm": c,
            "privacy.sgd_noise_multiplier": sigma,
        },
    )
    out = r.train_round(start, None, 1)
    assert len(captured) == out.dp_state["steps"] == 2 and not torch.isnan(
        torch.tensor(out.train_loss)
    )
    residual = []
    for step in captured:
        assert step["C"] == c and step["sigma"] == sigma and step["B"] == 4
        want, norms = _clipped_sum(step)
        if norms.numel():
            assert float(norms.max()) > 10 * c  # the clipping really acted
        for g, w in zip(step["grad"], want, strict=True):
            residual.append((g * step["B"] - w).flatten())  # = the noise
    noise = torch.cat(residual)
    if sigma == 0:
        assert float(noise.abs().max()) < 1e-6
    else:  # N(0, (σ C)²) on every coordinate of every step
        assert float(noise.std()) == pytest.approx(sigma * c, rel=0.05)
        assert abs(float(noise.mean())) < 0.05 * sigma * c


def test_dp_sgd_trains_other_tensors_and_epsilon_matches_independent_accounting(
    rt, start
):
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
    from opacus.accountants.rdp import RDPAccountant

    plain = rt.train_round(start, None, 1)
    r = _with(rt, **{"privacy.dp_sgd": True, "privacy.sgd_noise_multiplier": 1.3})
    state, eps, shared = None, [], start
    for rnd in (1, 2, 3):
        out = r.train_round(shared, None, rnd, dp_state=state)
        if rnd == 1:
            assert not _equal(out.shared, plain.shared)
            assert not _equal(out.shared, start)
        state, shared = out.dp_state, out.shared
        eps.append(out.epsilon)
        q, sigma = out.dp_state["sample_rate"], out.dp_state["noise_multiplier"]
        assert (q, sigma, out.dp_state["steps"]) == (0.5, 1.3, 2)
        steps = 2 * rnd
        assert out.dp_state["history"] == [[1.3, 0.5, steps]]
        alphas = RDPAccountant.DEFAULT_ALPHAS
        rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=alphas)
        ref, _ = get_privacy_spent(orders=alphas, rdp=rdp, delta=1e-5)
        assert out.epsilon == pytest.approx(ref, rel=1e-12)
        google = dp_accounting.rdp.RdpAccountant()
        google.compose(
            dp_accounting.PoissonSampledDpEvent(
                q, dp_accounting.GaussianDpEvent(sigma)
            ),
            steps,
        )
        assert out.epsilon == pytest.approx(google.get_epsilon(1e-5), rel=0.1)
    assert 0 < eps[0] < eps[1] < eps[2]


@pytest.fixture
def stepped(monkeypatch):
    """Every AdamW step: ``{id(tensor): (tensor, gradient)}`` as the optimiser gets them."""
    steps = []
    real = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        steps.append(
            {
                id(p): (p.detach().clone(), p.grad.detach().clone())
                for g in self.param_groups
                for p in g["params"]
            }
        )
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    return steps


def test_fedprox_term_is_added_after_the_dp_step(rt, start, stepped):
    """Same seed, same batches, same noise: with μ the optimiser's gradient differs by
    exactly μ (w - w_t) on the shared tensors (post-processing, never clipped)."""
    mu = 0.5
    r = _with(rt, **{"privacy.dp_sgd": True})
    r.train_round(start, None, 1, proximal_mu=0.0)
    without = list(stepped)
    stepped.clear()
    r.train_round(start, None, 1, proximal_mu=mu)
    with_mu = list(stepped)
    assert len(with_mu) == len(without) == 2
    moved = 0.0
    for name, p in rt.model.named_parameters():
        if not p.requires_grad:
            continue
        key = name.removeprefix("base_model.model.")
        (w0, g0), (w1, g1) = without[1][id(p)], with_mu[1][id(p)]
        assert torch.equal(w0, w1)  # step 1 had no proximal gradient (w = w_t)
        want = mu * (w1 - start[key]) if key in start else torch.zeros_like(w1)
        torch.testing.assert_close(g1 - g0, want, atol=1e-7, rtol=1e-5)
        moved = max(moved, float(want.abs().max()))
    assert moved > 0


# ------------------------------------------------------------------ (c) target ε
@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_a_target_epsilon_is_spent_by_the_last_round(rt, start, accountant):
    target = 6.0
    r = _with(
        rt,
        **{
            "privacy.dp_sgd": True,
            "privacy.target_epsilon": target,
            "privacy.accountant": accountant,
            "fed.num_rounds": 3,
        },
    )
    state, eps = None, []
    for rnd in (1, 2, 3):
        out = r.train_round(start, None, rnd, dp_state=state)
        state = out.dp_state
        eps.append(out.epsilon)
    sigma = state["noise_multiplier"]
    assert sigma != 1.0  # Opacus chose it, not privacy.sgd_noise_multiplier
    assert eps[0] < eps[1] < eps[2] <= target
    assert eps[2] == pytest.approx(target, abs=0.05)
    # 10% less noise would overspend the target
    acc = dp_sgd.make_accountant(
        accountant, {"accountant": accountant, "history": [[0.9 * sigma, 0.5, 6]]}
    )
    assert dp_sgd.accountant_epsilon(acc, 1e-5) > target


# ------------------------------------------------------------------ (d) restart
def _site_train(cfg, state_dir, shared, rnd: int):
    """The ClientApp's train handler on simulated SuperNode 0 (site Siemens)."""
    from medlora_lib.fl.client_app import train

    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 4},
        state=RecordDict(),
        run_config=to_run_config(cfg, RunOptions(state_dir=str(state_dir))),
    )
    rep = train(train_message(shared, rnd), ctx)
    return rep.content["arrays"].to_torch_state_dict(), dict(rep.content["metrics"])


def _restart() -> None:
    """What a SuperNode restart loses: everything held in process memory."""
    from medlora_lib.fl import client_app
    from medlora_lib.fl.task import clear_runtime_cache

    clear_runtime_cache()
    client_app._CONTEXTS.clear()


def test_the_accountant_survives_a_supernode_restart(tmp_path, start):
    cfg = _cfg(**{"privacy.dp_sgd": True, "fed.num_rounds": 3})
    shared, eps, sent = start, [], []
    for rnd in (1, 2, 3):
        shared, m = _site_train(cfg, tmp_path / "a", shared, rnd)
        eps.append(m["dp-epsilon"])
        sent.append(shared)
    assert 0 < eps[0] < eps[1] < eps[2]
    saved = json.loads(
        (tmp_path / "a" / SITE / "k" / "round-0003" / "round.json").read_text()
    )
    assert saved[dp_sgd.META_KEY]["history"] == [[1.0, 0.5, 6]]
    assert saved[dp_sgd.META_KEY]["epsilon"] == eps[2]

    # the same run, stopped after round 2 and restarted: ε and tensors continue exactly
    shared = start
    for rnd in (1, 2):
        shared, m = _site_train(cfg, tmp_path / "b", shared, rnd)
    _restart()
    again, m = _site_train(cfg, tmp_path / "b", shared, 3)
    assert m["dp-epsilon"] == eps[2]
    assert _equal(again, sent[2])

    # a round sent again (the server lost it) was released once already: it counts
    _restart()
    _, m = _site_train(cfg, tmp_path / "b", sent[1], 3)
    assert m["dp-epsilon"] > eps[2]


def test_without_dp_sgd_the_reply_and_the_saved_round_are_as_before(tmp_path, start):
    _, m = _site_train(_cfg(), tmp_path, start, 1)
    assert set(m) == {"num-examples", "train-loss", "train-seconds", "state-seconds"}
    saved = json.loads(
        (tmp_path / SITE / "k" / "round-0001" / "round.json").read_text()
    )
    assert set(saved) == {"round", "site", "train_loss"}


# ------------------------------------------------------------------ (e) bad input
def test_an_unreachable_target_epsilon_is_refused_before_the_run_and_at_the_site(
    rt, start
):
    from medlora_lib.fl.task import validate_config

    over = {"privacy.dp_sgd": True, "privacy.target_epsilon": 0.05}
    with pytest.raises(ConfigError) as err:
        validate_config(_cfg(**over))
    text = str(err.value)
    assert "privacy.target_epsilon" in text and "fed.num_rounds=2" in text
    assert "privacy.accountant='prv'" in text
    with pytest.raises(ConfigError, match=r"privacy.target_epsilon.*fed.num_rounds"):
        _with(rt, **over).train_round(start, None, 1)
    validate_config(_cfg(**{**over, "privacy.target_epsilon": 5.0}))  # reachable


@pytest.mark.parametrize(
    "over,match",
    [
        (
            {"privacy.sgd_noise_multiplier": 0.0},
            r"privacy.sgd_noise_multiplier`: 0 adds no noise",
        ),
        (
            {"privacy.sgd_max_grad_norm": -1.0},
            r"privacy.sgd_max_grad_norm`: must be > 0",
        ),
        ({"privacy.sgd_noise_multiplier": -1.0}, r"privacy.sgd_noise_multiplier`"),
        ({"privacy.accountant": "gdp"}, r"privacy.accountant`: unknown value"),
    ],
)
def test_bad_dp_sgd_values_name_the_field(over, match):
    from medlora_lib.fl.task import validate_config

    with pytest.raises(ConfigError, match=match):
        validate_config(_cfg(**{"privacy.dp_sgd": True, **over}))


def test_dp_sgd_bad_combinations_are_refused():
    from medlora_lib.fl import simulate

    with pytest.raises(ConfigError, match=r"privacy.dp_sgd`: method 'local'"):
        _cfg("local", **{"privacy.dp_sgd": True})
    with pytest.raises(ConfigError, match=r"runtime='inprocess'"):
        simulate(_cfg(**{"privacy.dp_sgd": True}), runtime="inprocess", verbose=False)
    state = {"accountant": "rdp", "history": [[1.0, 0.5, 2]]}
    with pytest.raises(ConfigError, match=r"privacy.accountant`.*'rdp'"):
        dp_sgd.make_accountant("prv", state)
    assert dp_sgd.make_accountant("rdp", state).history == [(1.0, 0.5, 2)]


# ------------------------------------------------------------------ (f) Flower
@pytest.mark.slow
def test_dp_sgd_in_the_simulation_runtime():
    """Every site trains with DP-SGD through the ServerApp / ClientApp; each row of
    rounds.csv carries the ε its site has spent, which the accountant confirms."""
    from opacus.accountants import RDPAccountant

    from medlora_lib.fl import simulate

    cfg = get_config(
        "smoke",
        method="fedavg_lora",
        overrides={
            "privacy.dp_sgd": True,
            "fed.num_rounds": 2,
            "model.pretrained": "none",
            "train.num_threads": 1,
        },
    )
    r = simulate(cfg, verbose=False)
    rows = r.rounds
    assert rows["dp_sgd_epsilon"].notna().all()
    for site, g in rows.groupby("client"):
        g = g.sort_values("round")
        n = int(g["num_examples"].iloc[0])
        q = min(1.0, cfg.train.batch_size / n)
        steps = max(1, int(1 / q))
        for rnd, e in zip(g["round"], g["dp_sgd_epsilon"], strict=True):
            acc = RDPAccountant()
            acc.history = [(1.0, q, steps * int(rnd))]
            assert e == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9), site
        assert g["dp_sgd_epsilon"].is_monotonic_increasing
    assert r.privacy["dp_sgd"] is True
    assert set(r.privacy["dp_sgd_epsilon"]) == set(rows["client"])
