"""Tests for medlora_lib.models.prefix_cache: exactness, refusals, gradients, memory.

On the real ConvViT at depth 4, 16x16x4 (milliseconds per forward pass).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from medlora_lib.adapters import (
    AdapterConfig,
    apply_adapters,
    parameter_roles,
    unwrap_model,
)
from medlora_lib.errors import ConfigError, DataError
from medlora_lib.models import build_convvit
from medlora_lib.models.prefix_cache import (
    CachedSuffixModel,
    PrefixCache,
    PrefixCacheDataset,
    build_prefix_cache,
    check_prefix_frozen,
    estimate_prefix_cache_bytes,
    first_adapted_block,
)

DEPTH = 4
SIZE = (16, 16, 4)


def _model(drop_path: float = 0.1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_convvit("small", depth=DEPTH, image_size=SIZE, drop_path=drop_path)


def _frozen(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _images(n: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 2, *SIZE, generator=torch.Generator().manual_seed(seed))


def _randomise_b(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _adapted(method: str = "med_dual_lora", blocks="last2", **kw) -> nn.Module:
    m = apply_adapters(
        _model(**kw), AdapterConfig(method=method, adapted_blocks=blocks)
    )
    _randomise_b(m)
    return m


@pytest.mark.parametrize(
    ("blocks", "depth", "expected"),
    [
        ("last2", 6, 4),
        ("last1", 6, 5),
        ("all", 6, 0),
        ("first2", 6, 0),
        ([-1, 3], 6, 3),
    ],
)
def test_first_adapted_block(blocks, depth, expected):
    cfg = AdapterConfig(adapted_blocks=blocks)
    assert first_adapted_block(cfg, depth) == expected
    # the depth can also come from a model (plain or adapted) or its config
    model = build_convvit("small", depth=depth, image_size=SIZE)
    assert first_adapted_block(cfg, model) == expected
    assert first_adapted_block(cfg, model.config) == expected
    assert first_adapted_block(cfg, apply_adapters(model, cfg)) == expected


def test_first_adapted_block_out_of_range():
    with pytest.raises(ConfigError, match="adapted_blocks"):
        first_adapted_block(AdapterConfig(adapted_blocks="last7"), 6)


@pytest.mark.parametrize("start_block", [0, 1, 3, DEPTH])
def test_cached_logits_equal_full_forward_plain_model(start_block):
    model = _frozen(_model()).eval()
    x = _images()
    cache = build_prefix_cache(model, x, start_block, batch_size=3)
    suffix = CachedSuffixModel(model, start_block).eval()
    with torch.no_grad():
        full = model(x)
        cached = suffix(cache.state(slice(None)))
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("method", "blocks"),
    [
        ("med_dual_lora", "last2"),
        ("fedavg_lora", "last1"),
        ("ffa_lora", [2, 3]),
        ("fedsa_lora", "last2"),
        ("local", "all"),
    ],
)
def test_cached_logits_equal_full_forward_with_lora(method, blocks):
    m = _adapted(method, blocks)
    start = first_adapted_block(AdapterConfig(adapted_blocks=blocks), DEPTH)
    x = _images()
    cache = build_prefix_cache(m, x, start)
    suffix = CachedSuffixModel(m, start).eval()
    with torch.no_grad():
        with_lora = suffix(cache.state(slice(None)))
        torch.testing.assert_close(with_lora, m(x), rtol=1e-5, atol=1e-5)
        # the LoRA suffix really is used: without adapters the logits differ
        with m.disable_adapter():
            assert not torch.allclose(with_lora, m(x), atol=1e-4)


def test_training_through_cache_matches_full_training():
    """Same steps through the cache and through the full forward give the same weights."""
    cfg = AdapterConfig(method="med_dual_lora", adapted_blocks="last2")
    a = apply_adapters(_model(drop_path=0.0), cfg)
    b = apply_adapters(_model(drop_path=0.0), cfg)
    _randomise_b(a)
    _randomise_b(b)
    x, y = _images(8), torch.tensor([0, 1] * 4)
    cache = build_prefix_cache(a, x, 2)
    suffix = CachedSuffixModel(a, 2)
    opt_a = torch.optim.AdamW([p for p in a.parameters() if p.requires_grad], lr=1e-2)
    opt_b = torch.optim.AdamW([p for p in b.parameters() if p.requires_grad], lr=1e-2)
    a.train()
    b.train()
    for step in range(3):
        idx = torch.arange(4) + 4 * (step % 2)
        for opt, logits in (
            (opt_a, lambda i=idx: suffix(cache.state(i))),
            (opt_b, lambda i=idx: b(x[i])),
        ):
            loss = nn.functional.cross_entropy(logits(), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=1e-5, msg=k)
    # after training the cache is still exact (the prefix did not move)
    a.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            suffix(cache.state(slice(None))), a(x), rtol=1e-5, atol=1e-5
        )
        fresh = build_prefix_cache(a, x, 2)
    assert torch.equal(fresh.tokens, cache.tokens)


@pytest.mark.parametrize("method", ["med_dual_lora", "ffa_lora", "fedsa_lora"])
def test_gradients_reach_only_adapters_and_heads(method):
    m = _adapted(method, "last2")
    cache = build_prefix_cache(m, _images(4), 2)
    suffix = CachedSuffixModel(m, 2).train()
    loss = nn.functional.cross_entropy(
        suffix(cache.state(slice(None))), torch.tensor([0, 1, 0, 1])
    )
    loss.backward()
    roles = parameter_roles(m)
    for n, p in m.named_parameters():
        role = roles[n.removeprefix("base_model.model.")]
        if role in ("shared", "private"):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    assert not cache.tokens.requires_grad


def test_refuses_adapter_inside_prefix():
    m = _adapted("med_dual_lora", [1, 3])
    with pytest.raises(ConfigError, match=r"block\(s\) \[1\]"):
        build_prefix_cache(m, _images(2), 2)
    with pytest.raises(ConfigError, match="start_block <= 1"):
        CachedSuffixModel(m, 3)
    CachedSuffixModel(m, 1)  # exact choice accepted


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"augmentation": True}, ConfigError, "augmentation"),
        ({"start_block": DEPTH + 1}, ConfigError, "out of range"),
        ({"start_block": -1}, ConfigError, "out of range"),
        ({"batch_size": 0}, ConfigError, "batch_size"),
        ({"images": torch.rand(2, 2, 16, 16, 8)}, DataError, "shape"),
        ({"images": torch.rand(2, 16, 16, 4)}, DataError, "shape"),
    ],
)
def test_build_refusals(kwargs, error, match):
    args = {"images": _images(2), "start_block": 2, **kwargs}
    with pytest.raises(error, match=match):
        build_prefix_cache(_frozen(_model()), **args)


def test_refuses_trainable_prefix():
    model = _model()  # nothing frozen: the conv stem would train
    with pytest.raises(ConfigError, match="trainable"):
        check_prefix_frozen(model, 2)
    with pytest.raises(ConfigError, match="trainable"):
        check_prefix_frozen(model, 0)  # the conv stem is always in the prefix
    m = _adapted("fedavg_lora", "last2")
    unwrap_model(m).encoder.cls_token.requires_grad_(True)
    with pytest.raises(ConfigError, match="cls_token"):
        CachedSuffixModel(m, 2)


def test_memory_report_mode_and_dataset():
    m = _adapted("med_dual_lora", "last2")
    m.train()
    x = _images(5)
    cache = build_prefix_cache(m, x, 2, batch_size=2)
    assert m.training  # mode restored
    cfg = unwrap_model(m).config
    t, c = cfg.n_patches, cfg.embed_dim
    assert cache.tokens.shape == (5, t + 1, c) and cache.fusion_skip.shape == (5, t, c)
    assert (
        cache.nbytes == 5 * (2 * t + 1) * c * 4 == estimate_prefix_cache_bytes(cfg, 5)
    )
    assert len(cache) == 5 and cache.start_block == 2 and cache.build_seconds > 0
    assert cache.tokens.device.type == "cpu"

    ds = PrefixCacheDataset(cache, labels=[0, 1, 0, 1, 1])
    batches = list(DataLoader(ds, batch_size=2))
    assert [len(y) for _, y in batches] == [2, 2, 1]
    state, y = batches[0]
    suffix = CachedSuffixModel(m, 2).eval()
    with torch.no_grad():
        torch.testing.assert_close(suffix(state), m.eval()(x[:2]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            suffix(tokens=state["tokens"], fusion_skip=state["fusion_skip"]),
            suffix(state),
        )
    seen = torch.cat([i for i, _ in cache.batches(2, shuffle=True)])
    assert sorted(seen.tolist()) == list(range(5))
    assert set(cache.as_inputs()) == {"tokens", "fusion_skip"}
    with pytest.raises(DataError, match="labels"):
        PrefixCacheDataset(cache, labels=[0, 1])
    with pytest.raises(DataError, match="lacks"):
        suffix({"tokens": state["tokens"]})
    with pytest.raises(DataError):
        PrefixCache(cache.tokens, cache.fusion_skip[:2], 2)


def test_suffix_model_exposes_parameters_for_optimisers():
    m = _adapted("med_dual_lora", "last2")
    suffix = CachedSuffixModel(m, 2)
    assert {id(p) for p in suffix.parameters()} == {id(p) for p in m.parameters()}
    assert copy.deepcopy(suffix).start_block == 2
