"""Tests for medlora_lib.adapters: peft wiring, method freezing, state dicts, counts.

Table-driven, on two tiny models: a hand-written stand-in with the ConvViT's module names
(independent of the real implementation) and the real ConvViT at depth 4, 16x16x4.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import typing
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from medlora_lib import experiments
from medlora_lib.adapters import (
    KNOWN_TARGETS,
    METHODS,
    AdapterConfig,
    MethodName,
    adapter_info,
    aggregate_shared,
    apply_adapters,
    closed_form_lora_params,
    enforce_trainability,
    get_private_state,
    get_shared_state,
    lora_delta,
    methods_table,
    parameter_roles,
    proximal_term,
    resolve_adapted_blocks,
    set_private_state,
    set_shared_state,
    shared_bytes,
    trainable_parameter_count,
    unwrap_model,
)
from medlora_lib.errors import CheckpointError, ConfigError


# ------------------------------------------------------------------------------------
# tiny stand-in with the ConvViT's module names
# ------------------------------------------------------------------------------------
@dataclass
class TinyConfig:
    embed_dim: int = 8
    depth: int = 4
    mlp_ratio: float = 2.0
    num_classes: int = 2


class _Attn(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.q, self.kv, self.proj = (
            nn.Linear(c, c),
            nn.Linear(c, 2 * c),
            nn.Linear(c, c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, v = self.kv(x).chunk(2, dim=-1)
        a = torch.softmax(self.q(x) @ k.transpose(1, 2) / x.shape[-1] ** 0.5, dim=-1)
        return self.proj(a @ v)


class _Mlp(nn.Module):
    def __init__(self, c: int, h: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, h), nn.Linear(h, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, c: int, h: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(c), _Attn(c)
        self.norm2, self.mlp = nn.LayerNorm(c), _Mlp(c, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _ConvStage(nn.Module):
    """Holds ``conv.0.mlp.fc1``: a name LoRA targets must never hit outside the blocks."""

    def __init__(self, c: int) -> None:
        super().__init__()
        holder = nn.Module()
        holder.mlp = _Mlp(c, 2 * c)
        self.conv = nn.ModuleList([holder])


class TinyViT(nn.Module):
    """Token-input stand-in: (B, T, F) -> logits, with forward_prefix / forward_suffix."""

    def __init__(self, config: TinyConfig | None = None, in_features: int = 5) -> None:
        super().__init__()
        self.config = c = config or TinyConfig()
        e, h = c.embed_dim, int(c.embed_dim * c.mlp_ratio)
        stem = nn.Module()
        stem.linear = nn.Linear(in_features, e)
        stem.conv_blocks = nn.ModuleList([_ConvStage(e)])
        self.enc_down_dict = nn.ModuleDict({"sax": stem})
        fusion = nn.Module()
        fusion.skip = nn.Linear(in_features, e)
        fusion.norm = nn.LayerNorm(e)
        self.enc_fusion_dict = nn.ModuleDict({"sax": fusion})
        enc = nn.Module()
        enc.cls_token = nn.Parameter(torch.randn(1, 1, e) * 0.02)
        enc.blocks = nn.ModuleList([_Block(e, h) for _ in range(c.depth)])
        enc.norm = nn.LayerNorm(e)
        self.encoder = enc
        self.pred_head_dict = nn.ModuleDict(
            {v: nn.Linear(e, c.num_classes) for v in ("sax", "cls")}
        )

    def forward_prefix(self, x: torch.Tensor, start_block: int) -> dict:
        stem = self.enc_down_dict["sax"]
        t = stem.linear(x)
        t = t + stem.conv_blocks[0].conv[0].mlp(t)
        skip = self.enc_fusion_dict["sax"].skip(x)
        t = torch.cat([self.encoder.cls_token.expand(x.shape[0], -1, -1), t], dim=1)
        for blk in self.encoder.blocks[:start_block]:
            t = blk(t)
        return {"tokens": t, "fusion_skip": skip}

    def forward_suffix(self, state: dict, start_block: int) -> torch.Tensor:
        t = state["tokens"]
        for blk in self.encoder.blocks[start_block:]:
            t = blk(t)
        t = self.encoder.norm(t)
        fused = self.enc_fusion_dict["sax"].norm(t[:, 1:] + state["fusion_skip"])
        return (
            self.pred_head_dict["sax"](fused.mean(1))
            + self.pred_head_dict["cls"](t[:, 0])
        ) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_suffix(self.forward_prefix(x, 0), 0)


def _tiny() -> nn.Module:
    return TinyViT()


def _convvit() -> nn.Module:
    from medlora_lib.models import build_convvit

    return build_convvit("small", depth=4, image_size=(16, 16, 4))


def _input(model: nn.Module, batch: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if isinstance(unwrap_model(model), TinyViT):
        return torch.randn(batch, 6, 5, generator=g)
    return torch.rand(batch, 2, 16, 16, 4, generator=g)


MODELS = {"tiny": _tiny, "convvit": _convvit}
ALL_METHODS = sorted(METHODS)
FEDERATED = [m for m in ALL_METHODS if METHODS[m].federated]


def _build(
    kind: str = "tiny",
    method: str = "med_dual_lora",
    seed: int = 0,
    torch_seed: int = 0,
    **kw,
) -> nn.Module:
    torch.manual_seed(torch_seed)
    return apply_adapters(MODELS[kind](), AdapterConfig(method=method, **kw), seed=seed)


def _randomise_b(model: nn.Module, seed: int = 1) -> None:
    """LoRA B starts at zero; give every B values so deltas are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _train_steps(model: nn.Module, steps: int = 3, seed: int = 0) -> None:
    model.train()
    # every parameter handed to AdamW (with weight decay): frozen ones must still not move
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for s in range(steps):
        x = _input(model, seed=seed + s)
        y = torch.tensor([0, 1, 1])
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


# ------------------------------------------------------------------------------------
# config validation
# ------------------------------------------------------------------------------------
BAD_CONFIGS = [
    ({"lora_rank": 0}, "lora_rank"),
    ({"lora_rank": -4}, "lora_rank"),
    ({"lora_rank": 2.5}, "lora_rank"),
    ({"local_lora_rank": 0}, "local_lora_rank"),
    ({"lora_alpha": 0}, "lora_alpha"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"adapted_blocks": []}, "adapted_blocks"),
    ({"adapted_blocks": "last0"}, "adapted_blocks"),
    ({"adapted_blocks": "middle2"}, "adapted_blocks"),
    ({"adapted_blocks": [1.5]}, "adapted_blocks"),
    ({"target_modules": ("attn.qkv",)}, "target_modules"),
    ({"target_modules": ()}, "target_modules"),
    ({"target_modules": ("attn.q", "attn.q")}, "target_modules"),
    ({"method": "fedbn"}, "method"),
    ({"head": "both"}, "head"),
    ({"method": "local", "head": "shared"}, "head"),
    ({"method": "centralized", "head": "private"}, "head"),
    ({"method": "fedavg_lora", "local_lora_rank": 4}, "local_lora_rank"),
]


@pytest.mark.parametrize(("kwargs", "field_name"), BAD_CONFIGS)
def test_bad_config_raises_config_error_naming_the_field(kwargs, field_name):
    with pytest.raises(ConfigError, match=field_name):
        AdapterConfig(**kwargs)


@pytest.mark.parametrize(
    "blocks", [[4], [-5], "last5", "first9", [1, -3]], ids=lambda b: str(b)
)
def test_out_of_range_blocks_raise_when_applied(blocks):
    cfg = AdapterConfig(adapted_blocks=blocks)  # depth unknown here: accepted
    with pytest.raises(ConfigError, match="adapted_blocks"):
        apply_adapters(_tiny(), cfg)  # depth 4


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("all", [0, 1, 2, 3]),
        ("last1", [3]),
        ("last2", [2, 3]),
        ("last4", [0, 1, 2, 3]),
        ("first2", [0, 1]),
        ([-1, 0], [0, 3]),
        ((2,), [2]),
        (1, [1]),
    ],
)
def test_resolve_adapted_blocks(spec, expected):
    assert resolve_adapted_blocks(spec, 4) == expected


def test_config_to_dict_is_json_ready():
    cfg = AdapterConfig(adapted_blocks=[-2, -1], local_lora_rank=4)
    d = cfg.to_dict()
    assert AdapterConfig(**d) == cfg  # round-trips through JSON-like dicts
    assert d["adapted_blocks"] == [-2, -1]
    assert d["target_modules"] == ["attn.q", "attn.kv", "attn.proj"]
    assert all(f.metadata.get("help") for f in dataclasses.fields(AdapterConfig))


def test_apply_twice_and_wrong_method_raise():
    m = _build()
    with pytest.raises(ConfigError, match="already has adapters"):
        apply_adapters(m, AdapterConfig())
    with pytest.raises(ConfigError, match="already has adapters"):
        apply_adapters(unwrap_model(m), AdapterConfig())
    with pytest.raises(ConfigError, match="method"):
        get_shared_state(m, "fedavg_lora")
    with pytest.raises(ConfigError, match="apply_adapters"):
        get_shared_state(_tiny())


def test_method_argument_overrides_config():
    m = apply_adapters(_tiny(), AdapterConfig(method="fedavg_lora"), method="ffa_lora")
    assert all(".lora_A." not in k for k in get_shared_state(m, "ffa_lora"))


# ------------------------------------------------------------------------------------
# placement and counts
# ------------------------------------------------------------------------------------
BLOCK_SELECTIONS = ["last1", "last2", "first2", "all", [0, -1]]
TARGET_SETS = [
    ("attn.q", "attn.kv", "attn.proj"),
    ("attn.q",),
    ("mlp.fc1", "mlp.fc2"),
    KNOWN_TARGETS,
]


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("targets", TARGET_SETS, ids=lambda t: "+".join(t))
@pytest.mark.parametrize("blocks", BLOCK_SELECTIONS, ids=str)
def test_lora_sits_exactly_on_chosen_blocks_and_targets(kind, blocks, targets):
    m = _build(kind, "med_dual_lora", adapted_blocks=blocks, target_modules=targets)
    got = {
        n
        for n, mod in unwrap_model(m).named_modules()
        if isinstance(getattr(mod, "lora_A", None), nn.ModuleDict)
    }
    want = {
        f"encoder.blocks.{b}.{t}"
        for b in resolve_adapted_blocks(blocks, 4)
        for t in targets
    }
    assert got == want  # never the conv stem's "conv_blocks.0.conv.0.mlp.fc1"
    mod = unwrap_model(m).get_submodule(sorted(want)[0])
    assert set(mod.lora_A) == {"global", "local"}


COUNT_CASES = list(
    itertools.product(
        ALL_METHODS, BLOCK_SELECTIONS, TARGET_SETS[:3], ["auto", "frozen"]
    )
)


@pytest.mark.parametrize(
    ("method", "blocks", "targets", "head"),
    COUNT_CASES,
    ids=[f"{m}-{b}-{'+'.join(t)}-{h}" for m, b, t, h in COUNT_CASES],
)
def test_trainable_counts_match_closed_form(method, blocks, targets, head):
    m = _build(
        "tiny",
        method,
        adapted_blocks=blocks,
        target_modules=targets,
        head=head,
        lora_rank=3,
    )
    cfg = AdapterConfig(
        method=method,
        adapted_blocks=blocks,
        target_modules=targets,
        head=head,
        lora_rank=3,
    )
    cf = closed_form_lora_params(cfg, unwrap_model(m).config)
    shared = get_shared_state(m)
    private = get_private_state(m)
    n_shared = sum(t.numel() for t in shared.values())
    n_private = sum(t.numel() for t in private.values())
    assert trainable_parameter_count(m) == cf["trainable"] == n_shared + n_private
    assert n_shared == cf["shared"]
    assert n_private == cf["private"]
    assert shared_bytes(cfg, unwrap_model(m).config, method) == 4 * n_shared
    assert shared_bytes(cfg, unwrap_model(m).config, method, 2) == 2 * n_shared
    fixed = sum(p.numel() for n, p in m.named_parameters() if ".lora_A." in n) * (
        method == "ffa_lora"
    )
    assert cf["fixed"] == fixed


@pytest.mark.parametrize("method", ALL_METHODS)
def test_closed_form_on_real_convvit_small(method):
    """Full 'small' size (96 wide, 12 blocks), default 'last2' attention targets, rank 8."""
    from medlora_lib.models import build_convvit

    model = build_convvit("small", image_size=(16, 16, 4))
    cfg = AdapterConfig(method=method)
    m = apply_adapters(model, cfg)
    cf = closed_form_lora_params(cfg, model.config)
    # per block: q 8*(96+96) + kv 8*(96+192) + proj 8*(96+96) = 5376; 2 blocks
    assert (
        cf["adapters"]["global" if method != "local" else "local"]["total"] == 2 * 5376
    )
    assert cf["head"] == 2 * (96 * 2 + 2)
    assert trainable_parameter_count(m) == cf["trainable"]


@pytest.mark.parametrize("targets", TARGET_SETS, ids=lambda t: "+".join(t))
@pytest.mark.parametrize("blocks", ["last1", "all", [0, -1]], ids=str)
def test_counts_on_real_convvit_targets_and_blocks(blocks, targets):
    m = _build(
        "convvit", "med_dual_lora", adapted_blocks=blocks, target_modules=targets
    )
    cfg = AdapterConfig(adapted_blocks=blocks, target_modules=targets)
    cf = closed_form_lora_params(cfg, unwrap_model(m).config)
    assert trainable_parameter_count(m) == cf["trainable"]
    assert sum(t.numel() for t in get_shared_state(m).values()) == cf["shared"]
    assert sum(t.numel() for t in get_private_state(m).values()) == cf["private"]


def test_local_rank_and_final_norms_counts():
    cfg = dict(method="med_dual_lora", local_lora_rank=2, train_final_norms=True)
    m = _build("convvit", **cfg)
    cf = closed_form_lora_params(AdapterConfig(**cfg), unwrap_model(m).config)
    assert cf["adapters"]["local"]["total"] * 4 == cf["adapters"]["global"]["total"]
    assert trainable_parameter_count(m) == cf["trainable"]
    names = get_shared_state(m)
    assert "encoder.norm.weight" in names and "enc_fusion_dict.sax.norm.bias" in names


# ------------------------------------------------------------------------------------
# what is shared
# ------------------------------------------------------------------------------------
EXPECTED_SHARED = {
    # method: (shared adapter parts, head shared by default)
    "local": (set(), False),
    "centralized": ({"global.A", "global.B"}, True),
    "fedavg_lora": ({"global.A", "global.B"}, True),
    "fedprox_lora": ({"global.A", "global.B"}, True),
    "ffa_lora": ({"global.B"}, True),
    "fedsa_lora": ({"global.A"}, False),  # its head stays home with B
    "med_dual_lora": ({"global.A", "global.B"}, True),
}


def _parts(keys) -> set[str]:
    out = set()
    for k in keys:
        if ".lora_" in k:
            part, adapter = k.split(".lora_")[1].split(".")[:2]
            out.add(f"{adapter}.{part}")
    return out


_REJECTED = {("local", "shared"), ("centralized", "private")}  # AdapterConfig refuses


@pytest.mark.parametrize(
    ("method", "head"),
    [
        (m, h)
        for m in ALL_METHODS
        for h in ("auto", "shared", "private", "frozen")
        if (m, h) not in _REJECTED
    ],
)
def test_shared_set_is_exactly_the_methods_part(method, head):
    m = _build("tiny", method, head=head)
    shared, private = get_shared_state(m), get_private_state(m)
    parts, head_default = EXPECTED_SHARED[method]
    assert _parts(shared) == parts
    assert not set(shared) & set(private)
    # the local adapter never travels
    assert all(".local." not in k for k in shared)
    heads = {k for k in dict(m.named_parameters()) if "pred_head_dict" in k}
    heads = {k.removeprefix("base_model.model.") for k in heads}
    policy = head if head != "auto" else ("shared" if head_default else "private")
    assert (heads <= set(shared)) == (policy == "shared")
    assert (heads <= set(private)) == (policy == "private")
    if policy == "frozen":
        assert not heads & (set(shared) | set(private))
    # everything trainable is either shared or private; nothing else is
    trainable = {
        n.removeprefix("base_model.model.")
        for n, p in m.named_parameters()
        if p.requires_grad
    }
    assert trainable == set(shared) | set(private)
    # private parts: local adapter (dual, local), FedSA's B
    want_private = {
        "med_dual_lora": {"local.A", "local.B"},
        "fedsa_lora": {"global.B"},
        "local": {"local.A", "local.B"},
    }.get(method, set())
    assert _parts(private) == want_private


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("method", FEDERATED)
def test_shared_names_shapes_identical_across_clients(kind, method):
    a = get_shared_state(_build(kind, method, seed=0, torch_seed=0))
    b = get_shared_state(_build(kind, method, seed=0, torch_seed=1))
    assert list(a) == list(b)
    assert [t.shape for t in a.values()] == [t.shape for t in b.values()]
    assert all(t.device.type == "cpu" and not t.requires_grad for t in a.values())


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("method", ALL_METHODS)
def test_shared_and_private_state_round_trip_exactly(kind, method):
    src = _build(kind, method, seed=1, torch_seed=1)
    _randomise_b(src, seed=3)
    _train_steps(src, steps=1)
    dst = _build(kind, method, seed=2, torch_seed=2)
    shared, private = get_shared_state(src), get_private_state(src)
    set_shared_state(dst, shared, method)
    set_private_state(dst, private, method)
    for got, want in (
        (get_shared_state(dst), shared),
        (get_private_state(dst), private),
    ):
        assert list(got) == list(want)
        for k in want:
            assert torch.equal(got[k], want[k]), k
    # returned tensors are clones: mutating them does not touch the model
    if shared:
        k = next(iter(shared))
        shared[k].add_(1.0)
        assert not torch.equal(get_shared_state(src)[k], shared[k])


def test_set_shared_state_is_strict():
    m = _build("tiny", "fedavg_lora")
    state = get_shared_state(m)
    k = next(iter(state))
    missing = dict(state)
    del missing[k]
    with pytest.raises(CheckpointError, match="missing"):
        set_shared_state(m, missing)
    with pytest.raises(CheckpointError, match="unexpected"):
        set_shared_state(
            m, {**state, "encoder.blocks.0.attn.q.weight": torch.zeros(8, 8)}
        )
    wrong = {**state, k: torch.zeros(1, 1)}
    with pytest.raises(CheckpointError, match="shape"):
        set_shared_state(m, wrong)
    # the local adapter of a dual model cannot be loaded as the shared state
    dual = _build("tiny", "med_dual_lora")
    local_as_global = {
        k.replace(".global.", ".local."): v for k, v in get_shared_state(dual).items()
    }
    with pytest.raises(CheckpointError):
        set_shared_state(dual, local_as_global)


# ------------------------------------------------------------------------------------
# invariants under training
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("method", ALL_METHODS)
def test_backbone_bit_identical_after_training(kind, method):
    m = _build(kind, method)
    _randomise_b(m)  # so that A gets gradients too
    roles = parameter_roles(m)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    _train_steps(m, steps=3)
    for n, p in m.named_parameters():
        role = roles[n.removeprefix("base_model.model.")]
        if role in ("base", "fixed"):
            assert torch.equal(p, before[n]), f"{n} ({role}) changed"
        else:
            assert not torch.equal(p, before[n]), f"{n} ({role}) did not train"


def test_ffa_a_identical_across_clients_and_unchanged_by_training():
    c1 = _build("convvit", "ffa_lora", seed=7, torch_seed=0)
    c2 = _build("convvit", "ffa_lora", seed=7, torch_seed=123)  # other global RNG
    other = _build("convvit", "ffa_lora", seed=8, torch_seed=0)

    def a_of(m):
        return {
            n: p.detach().clone() for n, p in m.named_parameters() if ".lora_A." in n
        }

    a1, a2, a3 = a_of(c1), a_of(c2), a_of(other)
    assert a1 and all(torch.equal(a1[k], a2[k]) for k in a1)
    assert all(not torch.equal(a1[k], a3[k]) for k in a1)
    _train_steps(c1, steps=3)
    assert all(torch.equal(a1[k], v) for k, v in a_of(c1).items())
    assert all(not p.requires_grad for n, p in c1.named_parameters() if ".lora_A." in n)


def test_set_adapter_reenables_grad_and_enforce_trainability_restores():
    m = _build("tiny", "ffa_lora")
    m.base_model.set_adapter("global")  # peft re-enables requires_grad on A
    assert any(p.requires_grad for n, p in m.named_parameters() if ".lora_A." in n)
    enforce_trainability(m)
    assert not any(p.requires_grad for n, p in m.named_parameters() if ".lora_A." in n)

    dual = _build("tiny", "med_dual_lora")
    assert list(dual.base_model.active_adapters) == ["global", "local"]
    dual.base_model.set_adapter("global")
    enforce_trainability(dual)
    assert list(dual.base_model.active_adapters) == ["global", "local"]
    assert all(p.requires_grad for n, p in dual.named_parameters() if ".local." in n)


# ------------------------------------------------------------------------------------
# Med-DualLoRA: outputs add up
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("module", ["attn.q", "attn.kv", "attn.proj"])
def test_dual_adapters_add_up_at_module_level(kind, module):
    m = _build(kind, "med_dual_lora", lora_rank=4, lora_alpha=12.0, local_lora_rank=2)
    _randomise_b(m)
    name = f"encoder.blocks.3.{module}"
    layer = unwrap_model(m).get_submodule(name)
    base = layer.get_base_layer()
    x = torch.randn(5, base.in_features, dtype=torch.float64)
    layer.double()
    d_g = lora_delta(m, "global", name)
    d_l = lora_delta(m, "local", name)
    # closed form of the deltas
    for ad, r, d in (("global", 4, d_g), ("local", 2, d_l)):
        manual = (12.0 / r) * layer.lora_B[ad].weight @ layer.lora_A[ad].weight
        torch.testing.assert_close(d, manual, rtol=1e-12, atol=1e-12)
    want = x @ base.weight.T + base.bias + x @ d_g.T + x @ d_l.T
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
    assert d_g.abs().max() > 0 and d_l.abs().max() > 0


@pytest.mark.parametrize("kind", list(MODELS))
def test_check_adapter_sum_sums_the_active_adapters(kind):
    from medlora_lib.adapters import check_adapter_sum

    m = _build(kind, "med_dual_lora", lora_rank=4, lora_alpha=12.0, local_lora_rank=2)
    _randomise_b(m)
    check = check_adapter_sum(m, "attn.kv", seed=1)
    assert check["module"].endswith("attn.kv")
    assert check["adapters"] == ["global", "local"] == sorted(check["active"])
    assert check["max_abs_error"] < 1e-5
    assert min(check["update_norms"].values()) > 0
    # only one adapter active: the sum of both no longer holds
    layer = unwrap_model(m).get_submodule(check["module"])
    layer.set_adapter("global")
    one = check_adapter_sum(m, "attn.kv", seed=1)
    assert one["active"] == ["global"] and one["max_abs_error"] < 1e-5
    assert set(one["update_norms"]) == {"global"}
    with pytest.raises(ConfigError, match="mlp.fc9"):
        check_adapter_sum(m, "mlp.fc9")


@pytest.mark.parametrize("kind", list(MODELS))
def test_dual_model_equals_plain_model_with_merged_weights(kind):
    torch.manual_seed(0)
    plain = MODELS[kind]()
    merged = copy.deepcopy(plain)
    m = apply_adapters(
        plain, AdapterConfig(method="med_dual_lora", adapted_blocks="last2")
    )
    _randomise_b(m)
    with torch.no_grad():
        for name, mod in unwrap_model(m).named_modules():
            if isinstance(getattr(mod, "lora_A", None), nn.ModuleDict):
                w = merged.get_submodule(name).weight
                w += lora_delta(m, "global", name) + lora_delta(m, "local", name)
    m.eval()
    merged.eval()
    x = _input(m)
    with torch.no_grad():
        torch.testing.assert_close(m(x), merged(x), rtol=1e-5, atol=1e-5)
        # and the adapters do change the output
        with m.disable_adapter():
            assert not torch.allclose(m(x), merged(x), atol=1e-5)


# ------------------------------------------------------------------------------------
# aggregation and FedProx
# ------------------------------------------------------------------------------------
def test_aggregate_shared_weighted_mean():
    s1 = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}
    s2 = {"a": torch.tensor([3.0, 6.0]), "b": torch.tensor([[4.0]])}
    out = aggregate_shared([s1, s2], [1, 3])
    torch.testing.assert_close(out["a"], torch.tensor([2.5, 5.0]))
    torch.testing.assert_close(out["b"], torch.tensor([[3.0]]))
    assert list(out) == ["a", "b"] and out["a"].dtype == torch.float32
    same = aggregate_shared([s1], [5])
    assert all(torch.equal(same[k], s1[k]) for k in s1)


@pytest.mark.parametrize(
    ("states", "weights", "match"),
    [
        ([], [], "no client state"),
        ([{"a": torch.ones(2)}], [1, 2], "weights"),
        ([{"a": torch.ones(2)}, {"b": torch.ones(2)}], [1, 1], "different keys"),
        ([{"a": torch.ones(2)}, {"a": torch.ones(3)}], [1, 1], "shape"),
        ([{"a": torch.ones(2)}, {"a": torch.ones(2)}], [0, 0], "not all 0"),
        ([{"a": torch.ones(2)}, {"a": torch.ones(2)}], [1, -1], ">= 0"),
    ],
)
def test_aggregate_shared_errors(states, weights, match):
    with pytest.raises(ConfigError, match=match):
        aggregate_shared(states, weights)


def test_aggregate_real_client_states_keeps_keys():
    c1, c2 = (
        _build("tiny", "med_dual_lora", seed=0),
        _build("tiny", "med_dual_lora", seed=0),
    )
    _randomise_b(c1, 1)
    _randomise_b(c2, 2)
    s1, s2 = get_shared_state(c1), get_shared_state(c2)
    agg = aggregate_shared([s1, s2], [10, 30])
    assert list(agg) == list(s1)
    k = next(k for k in s1 if ".lora_B." in k)
    torch.testing.assert_close(agg[k], 0.25 * s1[k] + 0.75 * s2[k])
    set_shared_state(c1, agg)  # loads back


def test_proximal_term():
    m = _build("tiny", "fedprox_lora")
    ref = get_shared_state(m)
    assert proximal_term(m, ref, mu=0.5).item() == 0.0
    _randomise_b(m)
    cur = get_shared_state(m)
    want = 0.5 * 0.5 * sum(((cur[k] - ref[k]) ** 2).sum() for k in ref)
    term = proximal_term(m, ref, mu=0.5)
    torch.testing.assert_close(term, want)
    term.backward()
    roles = parameter_roles(m)
    for n, p in m.named_parameters():
        has_grad = p.grad is not None and p.grad.abs().sum() > 0
        if roles[n.removeprefix("base_model.model.")] != "shared":
            assert p.grad is None
        elif ".lora_B." in n:
            assert has_grad
    with pytest.raises(CheckpointError):
        proximal_term(m, {}, mu=0.5)


def test_methods_table():
    df = methods_table()
    assert list(df["method"]) == list(METHODS)
    assert set(ALL_METHODS) == {
        "local",
        "centralized",
        "fedavg_lora",
        "ffa_lora",
        "fedsa_lora",
        "fedprox_lora",
        "med_dual_lora",
    }
    # the type of a method name, the registry and the book's order are one list
    assert typing.get_args(MethodName) == tuple(METHODS) == experiments.ALL_METHODS
    row = df.set_index("method").loc["med_dual_lora"]
    assert bool(row["local adapter"]) and "global" in row["sent to the server"]
    assert df["reference"].str.len().min() > 0
    assert not METHODS["fedavg_lora"].has_local_adapter


def test_role_index_is_the_uncached_walk_and_follows_a_new_info():
    """The role → parameters index is cached per AdapterInfo; it equals a fresh walk of
    the model, hands out the model's own parameters, and a new info rebuilds it."""
    from medlora_lib import adapters as A

    m = _build("convvit", "med_dual_lora")
    info = adapter_info(m)
    walk = {}
    for name, p in A._named_params(m):
        walk.setdefault(A._role(name, info), {})[name] = p
    for role in ("shared", "private", "base"):
        got = A._params_with_role(m, role, None)
        assert list(got) == list(walk.get(role, {}))
        assert all(got[k] is walk[role][k] for k in got)
    # a second call is a copy of the cached index: changing it leaves the cache whole
    A._params_with_role(m, "shared", None).clear()
    assert A._params_with_role(m, "shared", None)
    assert A._ROLE_INDEX[m][0] is info
    # another head policy, stored as a new info: the roles are recomputed
    new = dataclasses.replace(
        info, config=dataclasses.replace(info.config, head="shared")
    )
    object.__setattr__(m, A.ADAPTER_INFO_ATTR, new)
    heads = [k for k in A._params_with_role(m, "shared", None) if "pred_head" in k]
    assert heads and A._ROLE_INDEX[m][0] is new
