"""ConvViT: CineMA names / shapes / order, sin-cos table, golden forward, prefix split."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medlora_lib.errors import ConfigError
from medlora_lib.models import ConvViTConfig, build_convvit
from medlora_lib.models.pos_embed import sincos_pos_embed

FIX = Path(__file__).parent / "fixtures" / "cinema"
SMALL = dict(size="small", image_size=(32, 32, 4), in_frames=2, num_classes=3)


def read_tsv(name: str) -> list[dict[str, str]]:
    with open(FIX / name, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def small_model(**kw):
    torch.manual_seed(0)
    return build_convvit(**{**SMALL, **kw})


def small_input(batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(batch, 2, 32, 32, 4, generator=g)


# --- base architecture vs the reference TSV ---------------------------------------
def test_base_state_dict_matches_cinema_tsv() -> None:
    rows = read_tsv("cinema_convvit_sax_2cls_state_dict.tsv")
    with torch.device("meta"):
        model = build_convvit("base", (192, 192, 16), in_frames=2, num_classes=2)
    sd = model.state_dict()
    assert [(k, list(v.shape)) for k, v in sd.items()] == [
        (r["key"], json.loads(r["shape"])) for r in rows
    ]
    assert len(sd) == 250
    assert sum(v.numel() for v in sd.values()) == 89_494_212
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {r["key"] for r in rows if r["kind"] == "param_frozen"}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 87_724_740


def test_pos_embed_fingerprint() -> None:
    pe = sincos_pos_embed(768, (12, 12, 16))
    assert pe.dtype == np.float32 and pe.shape == (2304, 768)
    digest = hashlib.sha256(np.ascontiguousarray(pe).tobytes()).hexdigest()
    assert digest == "788b8fd5e186a314a986e7b45b6fb24ebb00be57323aa2e488ae4c72fc04abfb"
    assert pe.astype(np.float64).sum() == pytest.approx(823103.69129, abs=1e-3)
    for (t, c), v in {
        (1, 128): 1.0,
        (17, 1): 0.801962,
        (192, 256): 0.841471,
        (2303, 0): -0.999990,
        (2303, 512): 0.650288,
        (2303, 767): 0.999999,
    }.items():
        assert pe[t, c] == pytest.approx(v, abs=1e-6)
    # 512-wide decoder table: 3 blocks of 170 and 2 zero channels
    pe512 = sincos_pos_embed(512, (12, 12, 16))
    assert np.all(pe512[:, 510:] == 0)


# --- golden forward (section 9 of the reference) ----------------------------------
def golden_fill(model: torch.nn.Module) -> None:
    """Deterministic closed-form weights of the reference recipe."""
    from tests.cinema_hub import formula_tensor

    new = {
        key: formula_tensor(key, tuple(t.shape))
        for key, t in model.state_dict().items()
        if not key.endswith("pos_embed")
    }
    missing, unexpected = model.load_state_dict(new, strict=False)
    assert [k for k in missing if not k.endswith("pos_embed")] == [] and not unexpected


def golden_input() -> torch.Tensor:
    i = np.arange(2 * 192 * 192 * 16, dtype=np.float64)
    x = np.sin(0.0123 * i) + 0.5 * np.cos(0.731 * i)
    return torch.from_numpy(x.astype(np.float32).reshape(1, 2, 192, 192, 16))


def _check_stats(name: str, t: torch.Tensor, ref: dict, tol: float = 2e-4) -> float:
    assert list(t.shape) == ref["shape"], name
    t64 = t.double()
    diffs = [
        abs(t64.mean().item() - ref["mean"]),
        abs(t64.std().item() - ref["std"]),
        *(
            abs(a - b)
            for a, b in zip(t64.flatten()[:5].tolist(), ref["first5"], strict=True)
        ),
    ]
    assert max(diffs) < tol, (name, diffs)
    return max(diffs)


@pytest.mark.slow
def test_golden_forward_base() -> None:
    ref = json.loads((FIX / "cinema_convvit_sax_2cls_golden_forward.json").read_text())
    torch.manual_seed(0)
    model = build_convvit("base", (192, 192, 16), in_frames=2, num_classes=2).eval()
    golden_fill(model)
    x = golden_input()
    with torch.no_grad():
        down = model.enc_down_dict["sax"]
        skips, tokens = down(x)
        enc = model.encoder(tokens)
        cls, fused = model.encode_suffix(model.forward_prefix(x, 0), 0)
        logits = {r: model(x, reduce=r) for r in ("all", "cls", "patch")}
        head_sax = model.pred_head_dict["sax"](fused.mean(1))
        head_cls = model.pred_head_dict["cls"](cls)
    worst = max(
        _check_stats("skip0", skips[0], ref["skip0_after_conv_block0"]),
        _check_stats("skip1", skips[1], ref["skip1_after_conv_block1"]),
        _check_stats(
            "tokens", tokens, ref["tokens_after_patch_embed+linear+pos_embed"]
        ),
        _check_stats("enc", enc, ref["encoder_output_incl_cls(after encoder.norm)"]),
        _check_stats("cls", cls[:, None], ref["cls_token_output"]),
        _check_stats("fusion", fused, ref["fusion_output"]),
    )
    # the encoder's cls row is what encode_suffix returns
    assert torch.allclose(enc[:, 0], cls, atol=1e-5)
    for got, key in [
        (head_sax, "head_sax_logits"),
        (head_cls, "head_cls_logits"),
        (logits["all"], "logits_reduce_all"),
        (logits["cls"], "logits_reduce_cls"),
        (logits["patch"], "logits_reduce_patch"),
    ]:
        d = np.abs(got[0].numpy() - np.array(ref[key])).max()
        worst = max(worst, float(d))
        assert d < 1e-4, (key, got, ref[key])
    print(f"golden forward max abs diff {worst:.3g}")


# --- small model invariants -------------------------------------------------------
def test_small_shapes_and_names() -> None:
    m = small_model().eval()
    x = small_input()
    assert m.config.grid_size == (2, 2, 4) and m.config.n_patches == 16
    with torch.no_grad():
        assert m(x).shape == (2, 3)
        st = m.forward_prefix(x, 2)
        feats = m.forward_features(x)
    assert st["tokens"].shape == (2, 17, 96)
    assert st["fusion_skip"].shape == (2, 16, 96)
    assert feats["cls"].shape == (2, 96) and feats["patch_mean"].shape == (2, 96)
    names = [k for k, _ in m.named_parameters()]
    assert names[0] == "enc_down_dict.sax.pos_embed"
    assert "encoder.blocks.5.attn.kv.weight" in names
    assert names[-4:] == [
        "pred_head_dict.sax.weight",
        "pred_head_dict.sax.bias",
        "pred_head_dict.cls.weight",
        "pred_head_dict.cls.bias",
    ]
    assert m.state_dict()["encoder.blocks.0.attn.kv.weight"].shape == (192, 96)


def test_prefix_suffix_equivalence_all_k() -> None:
    m = small_model().eval()
    x = small_input()
    with torch.no_grad():
        full = m(x)
        for k in range(m.depth + 1):
            out = m.forward_suffix(m.forward_prefix(x, k), k)
            assert torch.allclose(out, full, atol=1e-5), k
    with pytest.raises(ConfigError):
        m.forward_prefix(x, m.depth + 1)


def test_reduce_modes_relation() -> None:
    m = small_model().eval()
    x = small_input()
    with torch.no_grad():
        a, c, p = (m(x, reduce=r) for r in ("all", "cls", "patch"))
    assert torch.allclose(a, (c + p) / 2, atol=1e-6)


def test_drop_path_identity_in_eval_and_active_in_train() -> None:
    m = small_model(drop_path=0.5)
    x = small_input()
    m.eval()
    with torch.no_grad():
        a, b = m(x), m(x)
    assert torch.equal(a, b)
    m0 = small_model(drop_path=0.0).eval()
    with torch.no_grad():
        assert torch.allclose(m0(x), a, atol=1e-6)  # same init seed, same weights
    m.train()
    torch.manual_seed(3)
    with torch.no_grad():
        t1 = m(x)
        t2 = m(x)
    assert not torch.allclose(t1, t2)


def test_determinism_same_seed_same_weights_and_output() -> None:
    a, b = small_model().eval(), small_model().eval()
    for (ka, va), (kb, vb) in zip(
        a.state_dict().items(), b.state_dict().items(), strict=True
    ):
        assert ka == kb and torch.equal(va, vb)
    x = small_input()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_init_follows_cinema() -> None:
    m = small_model()
    sd = m.state_dict()
    assert torch.all(sd["encoder.blocks.0.norm1.weight"] == 1)
    assert torch.all(sd["encoder.blocks.0.attn.q.bias"] == 0)
    assert torch.all(sd["enc_down_dict.sax.patch_embed.proj.bias"] == 0)
    assert torch.all(sd["enc_down_dict.sax.conv_blocks.0.patch_embed.norm.weight"] == 1)
    w = sd["encoder.blocks.0.mlp.fc1.weight"]  # xavier bound sqrt(6 / (96 + 384))
    assert w.abs().max() <= (6 / (96 + 384)) ** 0.5 + 1e-6
    # heads keep PyTorch's default init (bias not zero)
    assert sd["pred_head_dict.cls.bias"].abs().sum() > 0
    assert not m.enc_down_dict["sax"].pos_embed.requires_grad


def test_gradients_flow_and_pos_embed_frozen() -> None:
    m = small_model()
    m(small_input()).sum().backward()
    assert m.enc_down_dict["sax"].pos_embed.grad is None
    assert (
        m.enc_down_dict["sax"].conv_blocks[0].patch_embed.conv.weight.grad is not None
    )


def test_config_errors_and_overrides() -> None:
    with pytest.raises(ConfigError, match="divisible"):
        build_convvit("small", image_size=(40, 40, 8))
    with pytest.raises(ConfigError, match="unknown ConvViT size"):
        build_convvit("huge")
    with pytest.raises(ConfigError, match="unknown ConvViT override"):
        build_convvit("small", widht=3)
    with pytest.raises(ConfigError, match="num_heads"):
        build_convvit("small", num_heads=5)
    m = small_model()
    with pytest.raises(ConfigError, match="divisible"):
        m(torch.zeros(1, 2, 30, 32, 4))
    m2 = build_convvit(
        "small",
        (32, 32, 4),
        embed_dim=32,
        depth=2,
        num_heads=2,
        conv_chans=(8,),
        conv_n_blocks=1,
        patch_size=(2, 2, 1),
        scale_factor=(4, 4, 1),
    )
    assert m2.config.grid_size == (4, 4, 4) and m2.depth == 2
    assert m2(torch.zeros(1, 2, 32, 32, 4)).shape == (1, 2)
    cfg = ConvViTConfig.from_dict(json.loads(m2.config.to_json()))
    assert cfg == m2.config


def test_other_input_grid_interpolates_pos_embed() -> None:
    m = small_model().eval()
    with torch.no_grad():
        assert m(torch.rand(1, 2, 48, 32, 4)).shape == (1, 3)
