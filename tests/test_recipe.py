"""CineMA's fine-tuning recipe (medlora_lib.recipe): each part does what its config field
says, off changes nothing, and the state a site keeps survives a SuperNode restart."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
from flwr.app import Context, RecordDict

from medlora_lib import recipe
from medlora_lib.adapters import get_shared_state
from medlora_lib.config import RunOptions, TrainConfig, get_config, to_run_config
from medlora_lib.errors import ConfigError
from medlora_lib.fl.federation import RoundOutcome, SiteReply, run_rounds
from medlora_lib.fl.task import ClientRuntime
from tests.flower_apps import train_message
from tests.test_fl_layer import _task_identity as _task_identity  # noqa: F401 (autouse)

SITE = "Siemens"


def _cfg(method: str = "med_dual_lora", **over):
    return get_config("smoke", method=method, overrides={"train.batch_size": 4, **over})


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
    return _build(_cfg(), smoke_dir)


@pytest.fixture(scope="module")
def start(rt):
    g = torch.Generator().manual_seed(3)
    return {
        k: v + 0.05 * torch.randn(v.shape, generator=g)
        for k, v in get_shared_state(rt.model).items()
    }


def _with(rt: ClientRuntime, **over) -> ClientRuntime:
    return dataclasses.replace(rt, cfg=_cfg(rt.cfg.method, **over))


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _RecordLR:
    """Records every AdamW step's per-group learning rates."""

    def __init__(self, monkeypatch) -> None:
        self.steps: list[list[float]] = []
        original = torch.optim.AdamW.step
        outer = self

        def step(self, *a, **k):
            outer.steps.append([g["lr"] for g in self.param_groups])
            return original(self, *a, **k)

        monkeypatch.setattr(torch.optim.AdamW, "step", step)


# ------------------------------------------------------------------ schedule
def _cinema_adjust_learning_rate(step, warmup_steps, max_n_steps, lr, min_lr):
    """``cinema.optim.adjust_learning_rate``, copied (the reference)."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    return min_lr + (lr - min_lr) * 0.5 * (
        1.0 + math.cos(math.pi * (step - warmup_steps) / (max_n_steps - warmup_steps))
    )


@pytest.mark.parametrize("p", [0.0, 0.03, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_warmup_cosine_is_cinemas_schedule(p):
    cfg = TrainConfig(schedule="warmup_cosine", warmup_fraction=0.1, min_lr=1e-5)
    # CineMA: 10 warm-up epochs of 100; progress p = epoch / 100
    ref = _cinema_adjust_learning_rate(100 * p, 10, 100, 1e-3, 1e-5)
    assert recipe.lr_at(p, 1e-3, cfg) == pytest.approx(ref, rel=1e-12, abs=1e-15)
    assert recipe.lr_at(p, 1e-3, TrainConfig()) == 1e-3  # constant


def test_the_schedule_runs_over_the_federations_rounds(rt, start, monkeypatch):
    rec = _RecordLR(monkeypatch)
    r = _with(rt, **{"train.schedule": "warmup_cosine", "fed.num_rounds": 4})
    n = (r.train_labels.shape[0] + 3) // 4  # steps per round (batch 4, one epoch)
    for rnd in (1, 2, 3, 4):
        r.train_round(start, None, rnd, lr=2e-3)
    got = [s[0] for s in rec.steps]
    assert len(got) == 4 * n
    want = [
        recipe.lr_at((rnd - 1 + i / n) / 4, 2e-3, r.cfg.train)
        for rnd in (1, 2, 3, 4)
        for i in range(n)
    ]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert got[0] == 0.0 and max(got) <= 2e-3 and got[-1] < got[n]


# ------------------------------------------------------------------ layer decay
def test_layer_ids_follow_cinema_for_peft_names():
    assert recipe.layer_id("base_model.model.enc_down_dict.sax.conv.weight", 12) == 0
    assert recipe.layer_id("encoder.cls_token", 12) == 0
    assert recipe.layer_id("encoder.pos_embed", 12) == 0
    name = "base_model.model.encoder.blocks.10.attn.q.lora_A.global.weight"
    assert recipe.layer_id(name, 12) == 11
    assert recipe.layer_id("encoder.blocks.0.mlp.fc1.weight", 12) == 1
    assert recipe.layer_id("base_model.model.pred_head_dict.sax.weight", 12) == 13
    assert recipe.layer_id("encoder.norm.weight", 12) == 13


def test_layer_decay_scales_every_tensors_rate(smoke_dir, start, monkeypatch):
    cfg = _cfg("fedavg_lora", **{"train.layer_decay": 0.75})
    r = _build(cfg, smoke_dir)
    from medlora_lib.adapters import _named_params
    from medlora_lib.train import make_optimizer

    named = [(n, p) for n, p in _named_params(r.model) if p.requires_grad]
    opt = make_optimizer(named, cfg.train, 12)
    scale = {}
    for g in opt.param_groups:
        for n in g["names"]:
            scale[n] = g["lr"] / cfg.train.lr
            assert g["weight_decay"] == (0.05 if dict(named)[n].ndim > 1 else 0.0)
    for n, s in scale.items():
        if ".blocks.10." in n:
            assert s == pytest.approx(0.75**2)
        elif ".blocks.11." in n:
            assert s == pytest.approx(0.75)
        else:  # heads
            assert "pred_head" in n and s == 1.0
    # off: the two groups of before (decay, no decay) at the full rate
    plain = make_optimizer(named, _cfg("fedavg_lora").train, 12)
    assert [len(g["params"]) for g in plain.param_groups] == [
        sum(p.ndim > 1 for _, p in named),
        sum(p.ndim <= 1 for _, p in named),
    ]
    assert {g["lr"] for g in plain.param_groups} == {1e-3}
    # and a round keeps the scales while the schedule moves the base rate
    rec = _RecordLR(monkeypatch)
    dataclasses.replace(
        r, cfg=_cfg("fedavg_lora", **{"train.layer_decay": 0.75})
    ).train_round(start, None, 1)
    assert sorted(set(rec.steps[0])) == pytest.approx([0.75**2 * 1e-3, 0.75e-3, 1e-3])


# ------------------------------------------------------------------ augmentation
def test_augmentation_is_applied_to_every_training_batch(smoke_dir, start, monkeypatch):
    r = _build(_cfg(**{"data.augment": True}), smoke_dir)
    assert r.start_block is None and "image" in r.train_inputs  # cache off
    assert r.augment is not None
    seen = []
    call = recipe.BatchAugmenter.__call__

    def spy(self, batch):
        out = call(self, batch)
        seen.append((batch["image"].clone(), out["image"]))
        return out

    monkeypatch.setattr(recipe.BatchAugmenter, "__call__", spy)
    a = r.train_round(start, None, 1)
    n_steps = (r.train_labels.shape[0] + 3) // 4
    assert len(seen) == n_steps
    assert any(not torch.equal(x, y) for x, y in seen)  # images really change
    assert all(y.min() >= 0 and y.max() <= 1 for _, y in seen)
    assert type(seen[0][1]) is torch.Tensor  # not a MONAI MetaTensor
    # seeded per round: the same round again is bit-identical, another is not
    b = r.train_round(start, None, 1)
    assert _equal(a.shared, b.shared)
    c = r.train_round(start, None, 2)
    assert not _equal(a.shared, c.shared)


def test_augmentation_ranges_are_cinemas_in_mm():
    t = recipe.make_augmentation((3.0, 3.0, 10.0))
    contrast, noise, _, affine = t.transforms
    grid = affine.rand_affine_grid
    assert grid.translate_range == (20.0, 20.0, 0.0)  # 60 mm at 3 mm per voxel
    assert grid.rotate_range == (0.0, 0.0, pytest.approx(math.pi))  # ±180° in-plane
    assert grid.scale_range == (0.2,)
    assert contrast.gamma == (0.5, 1.5) and noise.std == 0.1


def test_a_forced_cache_with_augmentation_is_refused_and_bools_are_read():
    with pytest.raises(ConfigError, match="data.augment.*use_prefix_cache"):
        get_config(
            "smoke", overrides=["data.augment=true", "train.use_prefix_cache=on"]
        )
    assert (
        get_config(
            "smoke", overrides=["train.use_prefix_cache=true"]
        ).train.use_prefix_cache
        == "auto"
    )
    assert (
        get_config(
            "smoke", overrides=["train.use_prefix_cache=false"]
        ).train.use_prefix_cache
        == "off"
    )
    aug = get_config("smoke", overrides=["data.augment=true"])
    assert not aug.uses_prefix_cache and get_config("smoke").uses_prefix_cache
    for key, value in (
        ("train.schedule", "linear"),
        ("train.amp", "fp8"),
        ("train.optimizer_state", "keep"),
        ("train.layer_decay", "0"),
        ("train.warmup_fraction", "1.0"),
        ("train.patience", "-1"),
        ("train.use_prefix_cache", "maybe"),
    ):
        with pytest.raises(ConfigError, match=key):
            get_config("smoke", overrides=[f"{key}={value}"])


# ------------------------------------------------------------------ precision
def test_amp_on_a_cpu_falls_back_and_says_so():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert recipe.resolve_precision("auto", "cpu").dtype is None  # silent
        assert recipe.resolve_precision("off", "cpu").dtype is None
    recipe._NOTED.clear()
    with pytest.warns(RuntimeWarning, match="needs a CUDA device.*fp32"):
        p = recipe.resolve_precision("bf16", "cpu")
    assert p.dtype is None and p.scaler is None and p.describe() == "fp32"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_amp_on_cuda_picks_bf16_or_fp16_with_a_scaler():  # pragma: no cover
    p = recipe.resolve_precision("auto", "cuda")
    if torch.cuda.is_bf16_supported():
        assert p.dtype is torch.bfloat16 and p.scaler is None
    else:
        assert p.dtype is torch.float16 and p.scaler is not None
    q = recipe.resolve_precision("fp16", "cuda")
    assert q.dtype is torch.float16 and q.scaler is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_mixed_precision_step_runs_scaled_and_unscaled(rt, start, dtype):
    """The AMP code path (autocast + GradScaler for fp16) on CPU autocast: the step
    trains, the loss stays finite, and the clipped update is unscaled."""
    scaler = torch.amp.GradScaler("cpu") if dtype is torch.float16 else None
    p = recipe.Precision(dtype, scaler, "cpu")
    r = dataclasses.replace(rt, precision=p)
    out = r.train_round(start, None, 1)
    ref = rt.train_round(start, None, 1)
    assert math.isfinite(out.train_loss)
    assert out.train_loss == pytest.approx(ref.train_loss, rel=0.05)
    moved = {k: (out.shared[k] - start[k]).abs().max() for k in start}
    assert max(moved.values()) > 0 and max(moved.values()) < 1.0  # not a scaled step


# ------------------------------------------------------------------ checkpointing
def test_gradient_checkpointing_changes_no_number(smoke_dir, start):
    cfg = _cfg(**{"data.augment": False, "train.use_prefix_cache": "off"})
    cfg.model.drop_path = 0.1  # the RNG of drop-path is replayed in the recompute
    plain = _build(cfg, smoke_dir)
    ckpt_cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, grad_checkpointing=True)
    )
    ckpt = _build(ckpt_cfg, smoke_dir)
    assert ckpt.model.base_model.model.grad_checkpointing
    calls = []
    import torch.utils.checkpoint as tuc

    original = tuc.checkpoint

    def counted(*a, **k):
        calls.append(1)
        return original(*a, **k)

    tuc.checkpoint = counted
    try:
        a = ckpt.train_round(start, None, 1)
    finally:
        tuc.checkpoint = original
    b = plain.train_round(start, None, 1)
    assert calls  # the adapted blocks were checkpointed
    for k in a.shared:
        torch.testing.assert_close(a.shared[k], b.shared[k], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ optimiser state
def test_which_moments_a_site_keeps(rt):
    assert _with(rt).kept_optimizer_names() == []
    private = _with(rt, **{"train.optimizer_state": "private"}).kept_optimizer_names()
    assert private and set(private) == set(rt.private_keys)
    everything = _with(rt, **{"train.optimizer_state": "all"}).kept_optimizer_names()
    assert set(everything) == set(rt.private_keys) | set(rt.shared_keys)


def test_kept_moments_continue_across_rounds(rt, start):
    r = _with(rt, **{"train.optimizer_state": "private"})
    n = (r.train_labels.shape[0] + 3) // 4
    one = r.train_round(start, None, 1)
    assert one.optimizer and all(
        k.split("::")[0] in r.private_keys for k in one.optimizer
    )
    steps = {float(v) for k, v in one.optimizer.items() if k.endswith("::step")}
    assert steps == {float(n)}
    two = r.train_round(one.shared, one.private, 2, optimizer_state=one.optimizer)
    steps = {float(v) for k, v in two.optimizer.items() if k.endswith("::step")}
    assert steps == {float(2 * n)}
    fresh = r.train_round(one.shared, one.private, 2)  # without: a fresh optimiser
    assert not _equal(fresh.private, two.private)
    assert _with(rt).train_round(start, None, 1).optimizer is None


def _site_train(cfg, state_dir, shared, rnd: int):
    from medlora_lib.fl.client_app import train

    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 4},
        state=RecordDict(),
        run_config=to_run_config(cfg, RunOptions(state_dir=str(state_dir))),
    )
    rep = train(train_message(shared, rnd), ctx)
    return rep.content["arrays"].to_torch_state_dict()


def _restart() -> None:
    from medlora_lib.fl import client_app
    from medlora_lib.fl.task import clear_runtime_cache

    clear_runtime_cache()
    client_app._CONTEXTS.clear()


def test_kept_moments_survive_a_supernode_restart(tmp_path, start):
    cfg = _cfg(**{"train.optimizer_state": "private", "fed.num_rounds": 3})
    sent, shared = [], start
    for rnd in (1, 2, 3):
        shared = _site_train(cfg, tmp_path / "a", shared, rnd)
        sent.append(shared)
    saved = tmp_path / "a" / SITE / "k" / "round-0002" / "optimizer.safetensors"
    assert saved.exists()
    shared = start
    for rnd in (1, 2):
        shared = _site_train(cfg, tmp_path / "b", shared, rnd)
    _restart()
    assert _equal(_site_train(cfg, tmp_path / "b", shared, 3), sent[2])
    # reset (the default) writes no optimiser file
    _site_train(_cfg(), tmp_path / "c", start, 1)
    assert not (
        tmp_path / "c" / SITE / "k" / "round-0001" / "optimizer.safetensors"
    ).exists()


# ------------------------------------------------------------------ early stopping
@pytest.mark.parametrize(
    "scores, patience, want",
    [
        ([0.5, 0.6, 0.6, 0.6], 2, 4),
        ([0.5, 0.6, 0.6, 0.7, 0.7], 2, None),
        ([0.5, 0.6, 0.60005, 0.6], 2, 4),  # a gain under min_delta does not count
        ([0.5, float("nan"), 0.4], 2, 3),
        ([0.5, 0.4, 0.3], 0, None),
    ],
)
def test_early_stop_round(scores, patience, want):
    rows = [
        {"round": r, "client": c, "val_mcc": s}
        for r, s in enumerate(scores, start=1)
        for c in ("A", "B")
    ]
    assert recipe.early_stop_round(rows, "mcc", patience, 1e-4) == want


class _Sites:
    """A transport whose sites report a fixed validation curve."""

    def __init__(self, curve):
        self.curve, self.trained = curve, []

    def sites(self, rnd):
        return ["A", "B"]

    def _m(self, rnd):
        return {"val_balanced_accuracy": self.curve[rnd - 1], "test_n": 4.0}

    def train(self, rnd, sites, shared, evaluate_first, test_above=None):
        self.trained.append(rnd)
        return RoundOutcome(
            replies={
                s: SiteReply(
                    shared=shared,
                    num_examples=4,
                    train={},
                    prev_eval={s: self._m(rnd - 1)} if evaluate_first else {},
                )
                for s in sites
            }
        )

    def evaluate(self, rnd, sites, shared, test_above=None):
        return RoundOutcome(replies={s: {s: self._m(rnd)} for s in sites})


def test_the_federation_stops_early_and_a_resume_decides_the_same():
    cfg = get_config(
        "smoke",
        method="fedavg_lora",
        overrides=["train.patience=2", "fed.num_rounds=10"],
    )
    curve = [0.5, 0.7, 0.6, 0.65, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]
    t = _Sites(curve)
    shared = {"w": torch.zeros(1)}
    out = run_rounds(t, cfg, shared)
    # rounds 3 and 4 do not beat round 2: seen with round 5's replies, so the run ends
    # after round 5, whose model is evaluated last
    assert t.trained == [1, 2, 3, 4, 5]
    assert max(r["round"] for r in out["rows"]) == 5
    # a run resumed from its round-5 checkpoint ends at once, at the same round
    t2 = _Sites(curve)
    again = run_rounds(t2, cfg, shared, start_round=6, rows=out["rows"])
    assert t2.trained == [] and max(r["round"] for r in again["rows"]) == 5
    # patience 0: every round
    t3 = _Sites(curve)
    run_rounds(
        t3,
        get_config("smoke", method="fedavg_lora", overrides=["fed.num_rounds=10"]),
        shared,
    )
    assert t3.trained == list(range(1, 11))


def test_fit_stops_early_and_follows_the_schedule(monkeypatch):
    from medlora_lib.train import fit

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    # min_delta 2: nothing after the first epoch counts as a gain
    cfg = TrainConfig(
        batch_size=8, patience=1, min_delta=2.0, schedule="warmup_cosine", min_lr=0.0
    )
    rec = _RecordLR(monkeypatch)
    res = fit(lambda b: model(b["x"]), model, ({"x": x}, y), ({"x": x}, y), cfg, 50)
    assert len(res.history) == 2 and res.best_epoch == 1  # stopped after epoch 2
    assert rec.steps[0][0] == 0.0  # warm-up starts at 0
