"""load_pretrained: CineMA's MAE -> ConvViT semantics, strict fine-tuned files, hub."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from medlora_lib.errors import CheckpointError
from medlora_lib.models import build_convvit, build_mae, load_convvit, load_pretrained
from medlora_lib.models import checkpoint as ckpt_mod
from medlora_lib.models.checkpoint import FIRST_CONV, drop_reason, save_convvit
from medlora_lib.models.convvit import SIZES

FIX = Path(__file__).parent / "fixtures" / "cinema"
IMG = (32, 32, 4)
#: encoder tensors a CineMA checkpoint fills in the 'small' ConvViT: 14 per block (norm1,
#: attn.q, attn.kv, attn.proj, norm2, mlp.fc1, mlp.fc2; weight and bias each) and 77
#: outside the blocks (stem, patch embedding, fusion, CLS token, final norms), the
#: first convolution included; the fixed positional embedding is not among them
N_ENC = 14 * SIZES["small"]["depth"] + 77


def convvit(**kw):
    torch.manual_seed(0)
    return build_convvit("small", IMG, in_frames=2, num_classes=2, **kw)


def cinema_format_mae_state(**kw) -> dict[str, torch.Tensor]:
    """A CineMA-format MAE state dict (sax + lax_4c views) at small size."""
    torch.manual_seed(1)
    sd = build_mae("small", IMG, **kw).state_dict()
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        out[k] = v.clone()
        if ".sax." in k and not k.startswith("pred_head_dict"):
            # the 2-D long-axis view: same names, kernels without the last axis
            v2 = v[..., 0] if (v.ndim == 5 and "conv" in k) else v
            out[k.replace(".sax.", ".lax_4c.")] = v2.clone() + 1
    out["pred_head_dict.lax_4c.weight"] = sd["pred_head_dict.sax.weight"] + 1
    out["pred_head_dict.lax_4c.bias"] = sd["pred_head_dict.sax.bias"] + 1
    return out


def write(
    tmp_path: Path, sd: dict[str, torch.Tensor], name: str = "mae.safetensors"
) -> Path:
    p = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
    return p


def test_drop_rules_reproduce_cinema_key_map() -> None:
    with open(FIX / "cinema_mae_to_convvit_sax_key_map.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert len(rows) == 603
    for r in rows:
        expect = r["detail"] if r["fate"] == "dropped" else None
        assert drop_reason(r["mae_key"]) == expect, r["mae_key"]


def test_load_cinema_format_mae(tmp_path: Path) -> None:
    sd = cinema_format_mae_state()
    path = write(tmp_path, sd)
    model = convvit()
    heads_before = {
        k: v.clone() for k, v in model.state_dict().items() if k.startswith("pred_head")
    }
    rep = load_pretrained(model, path)
    assert rep.kind == "mae"
    # dropped: every lax_4c key, decoder, dec_linear, heads, mask token, 2 pos_embed
    lax = [k for k in sd if "lax_4c" in k and "mask" not in k and "_head" not in k]
    assert all(rep.dropped[k] == "substring 'lax_4c'" for k in lax)
    assert rep.dropped["enc_down_dict.sax.pos_embed"] == "substring 'pos_embed'"
    assert rep.dropped["dec_embed_dict.sax.pos_embed"] == "substring 'pos_embed'"
    assert rep.dropped["dec_embed_dict.sax.mask_token"] == "substring 'mask'"
    assert rep.dropped["dec_embed_dict.lax_4c.mask_token"] == "substring 'mask'"
    assert rep.dropped["dec_linear.weight"] == "substring 'dec_linear'"
    assert rep.dropped["pred_head_dict.lax_4c.bias"] == "substring '_head'"
    assert all(
        rep.dropped[k] == "substring 'decoder'" for k in sd if k.startswith("decoder.")
    )
    assert set(rep.dropped) | set(rep.loaded) | set(rep.adapted) == set(sd)
    # loaded: every encoder key but pos_embed; the first conv is tiled
    enc = [k for k in model.state_dict() if not k.startswith("pred_head")]
    assert rep.adapted == {FIRST_CONV: "repeat x2 along dim 1 (no rescale)"}
    assert rep.loaded == [
        k for k in enc if k not in (FIRST_CONV, "enc_down_dict.sax.pos_embed")
    ]
    assert len(rep.loaded) == N_ENC - 1  # all but the tiled first conv
    assert rep.missing == [
        "enc_down_dict.sax.pos_embed",
        "pred_head_dict.sax.weight",
        "pred_head_dict.sax.bias",
        "pred_head_dict.cls.weight",
        "pred_head_dict.cls.bias",
    ]
    msd = model.state_dict()
    for k in rep.loaded:
        assert torch.equal(msd[k], sd[k]), k
    w = sd[FIRST_CONV]
    assert w.shape[1] == 1 and torch.equal(msd[FIRST_CONV], torch.cat([w, w], dim=1))
    for k, v in heads_before.items():
        assert torch.equal(msd[k], v)
    text = str(rep)
    assert (
        f"loaded    {N_ENC - 1}" in text and "adapted   1" in text and "lax_4c" in text
    )


def test_freeze_and_encoder_only_file(tmp_path: Path) -> None:
    torch.manual_seed(2)
    mae = build_mae("small", IMG)
    path = write(tmp_path, mae.encoder_state_dict(), "enc.safetensors")
    model = convvit()
    rep = load_pretrained(model, path, freeze=True)
    assert rep.frozen and rep.n_loaded == N_ENC
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [
        "pred_head_dict.sax.weight",
        "pred_head_dict.sax.bias",
        "pred_head_dict.cls.weight",
        "pred_head_dict.cls.bias",
    ]


def test_pt_checkpoint_with_model_key(tmp_path: Path) -> None:
    sd = cinema_format_mae_state()
    p = tmp_path / "ckpt.pt"
    torch.save({"model": sd, "epoch": 3}, p)
    rep = load_pretrained(convvit(), p)
    assert rep.n_loaded == N_ENC and len(rep.missing) == 5


def test_shape_mismatch_names_first_key(tmp_path: Path) -> None:
    sd = cinema_format_mae_state(embed_dim=64, num_heads=2)
    path = write(tmp_path, sd)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(convvit(), path)
    msg = str(e.value)
    assert "'enc_down_dict.sax.patch_embed.proj.weight'" in msg
    assert "[64, 128]" in msg and "[96, 128]" in msg


def test_missing_encoder_keys_refused(tmp_path: Path) -> None:
    sd = {k: v for k, v in cinema_format_mae_state().items() if "blocks.3." not in k}
    with pytest.raises(CheckpointError, match=r"encoder\.blocks\.3\.norm1\.weight"):
        load_pretrained(convvit(), write(tmp_path, sd))


def test_unexpected_key_refused(tmp_path: Path) -> None:
    sd = cinema_format_mae_state()
    sd["encoder.extra_token"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="unexpected key"):
        load_pretrained(convvit(), write(tmp_path, sd))


def test_finetuned_strict_round_trip(tmp_path: Path) -> None:
    a = convvit().eval()
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.01)
    path = save_convvit(a, tmp_path / "ft.safetensors", metadata={"seed": 0})
    torch.manual_seed(5)
    b = build_convvit("small", IMG).eval()
    rep = load_pretrained(b, path)
    assert rep.kind == "convvit" and not rep.missing and not rep.dropped
    assert rep.loaded == list(a.state_dict())
    x = torch.rand(2, 2, *IMG)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        assert torch.equal(a(x), load_convvit(path).eval()(x))
    # strict: a 3-class model refuses; strict_shapes=False skips the heads only
    c = build_convvit("small", IMG, num_classes=3)
    with pytest.raises(
        CheckpointError, match=r"'pred_head_dict.sax.weight'.*\[2, 96\].*\[3, 96\]"
    ):
        load_pretrained(c, path)
    rep = load_pretrained(c, path, strict_shapes=False)
    assert sorted(rep.missing) == sorted(
        k for k in c.state_dict() if k.startswith("pred_head")
    )
    # strict: a fine-tuned file missing an encoder key is refused
    sd = dict(a.state_dict())
    del sd["encoder.norm.bias"]
    with pytest.raises(CheckpointError, match="encoder.norm.bias"):
        load_pretrained(b, write(tmp_path, sd, "bad.safetensors"))


def test_hub_offline_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def boom(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", boom)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        load_pretrained(convvit(), "hub")
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert "mathpluscode/CineMA" in msg and "pretrained/cinema.safetensors" in msg
    assert "hf download" in msg and "pass its path" in msg
    # online but the download fails: same advice, with the cause
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(ckpt_mod, "_hub_reachable", lambda timeout=3.0: True)
    with pytest.raises(
        CheckpointError, match="download failed.*network is unreachable"
    ):
        load_pretrained(convvit(), "mathpluscode/CineMA")


def test_hub_uses_cached_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub

    path = write(tmp_path, cinema_format_mae_state())
    calls = []

    def fake(repo_id, filename, **kw):
        calls.append((repo_id, filename, kw))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    rep = load_pretrained(convvit(), "hub")
    assert rep.n_loaded == N_ENC
    assert calls[0][:2] == ("mathpluscode/CineMA", "pretrained/cinema.safetensors")


def test_small_fm_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(ckpt_mod, "SMALL_FM_PATH", tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="embedded small foundation model"):
        load_pretrained(convvit(), "small")
    p = write(tmp_path, cinema_format_mae_state(), "small_fm.safetensors")
    monkeypatch.setattr(ckpt_mod, "SMALL_FM_PATH", p)
    assert load_pretrained(convvit(), "default").n_loaded == N_ENC


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(convvit(), tmp_path / "missing.safetensors")
    bad = tmp_path / "w.bin"
    bad.write_bytes(b"xx")
    with pytest.raises(CheckpointError, match="suffix"):
        load_pretrained(convvit(), bad)
    corrupt = tmp_path / "c.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_pretrained(convvit(), corrupt)


@pytest.mark.parametrize(("file_depth", "model_depth"), [(2, 3), (3, 2)])
def test_depth_mismatch_names_the_depth_to_build(
    tmp_path: Path, file_depth: int, model_depth: int
) -> None:
    """Too few blocks (missing keys) or too many (unexpected keys): the error says which
    depth the checkpoint has and how to build a model that takes it."""
    path = write(tmp_path, build_mae("small", IMG, depth=file_depth).state_dict())
    with pytest.raises(CheckpointError) as err:
        load_pretrained(convvit(depth=model_depth), path)
    msg = str(err.value)
    assert f"{file_depth} transformer blocks in the checkpoint" in msg
    assert f"{model_depth} in the model" in msg and f"depth={file_depth}" in msg
    # and the suggested build loads it
    assert load_pretrained(convvit(depth=file_depth), path).n_loaded > 0
