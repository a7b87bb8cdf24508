"""MAE: CineMA key names, masking, masked-only loss, reconstruction, save / load."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from medlora_lib.errors import CheckpointError, ConfigError
from medlora_lib.models import (
    build_convvit,
    build_mae,
    load_mae,
    load_pretrained,
    save_mae,
)
from medlora_lib.models.convvit import patchify
from medlora_lib.models.mae import ENCODER_PREFIXES, random_patch_mask

FIX = Path(__file__).parent / "fixtures" / "cinema"
IMG = (32, 32, 4)  # grid (2, 2, 4) = 16 tokens, 4 visible at ratio 0.75


def small_mae(**kw):
    torch.manual_seed(0)
    return build_mae("small", IMG, **kw)


def batch(b: int = 2) -> torch.Tensor:
    return torch.rand(b, 1, *IMG, generator=torch.Generator().manual_seed(3))


def test_base_sax_keys_match_cinema_mae_tsv() -> None:
    with open(FIX / "cinema_mae_pretrain_state_dict.tsv", newline="") as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t") if "lax_" not in r["key"]]
    with torch.device("meta"):
        mae = build_mae("base", (192, 192, 16))
    sd = mae.state_dict()
    assert [(k, list(v.shape)) for k, v in sd.items()] == [
        (r["key"], json.loads(r["shape"])) for r in rows
    ]
    assert len(sd) == 366
    frozen = {n for n, p in mae.named_parameters() if not p.requires_grad}
    assert frozen == {r["key"] for r in rows if r["kind"] == "param_frozen"}
    assert mae.config.dec_patch_size == (16, 16, 1)


def test_random_mask_counts_and_seed() -> None:
    g = torch.Generator().manual_seed(0)
    m = random_patch_mask(4, 72, 0.75, g)
    assert m.dtype == torch.bool and m.shape == (4, 72)
    assert m.sum(1).tolist() == [54] * 4  # 72 - int(72 * 0.25)
    m2 = random_patch_mask(4, 72, 0.75, torch.Generator().manual_seed(0))
    assert torch.equal(m, m2)
    assert not torch.equal(m[0], m[1])  # per-sample masks


def test_forward_shapes_and_masked_only_loss() -> None:
    mae = small_mae()
    x = batch()
    out = mae(x, generator=torch.Generator().manual_seed(0))
    assert out.mask.shape == (2, 16) and out.mask.sum().item() == 24
    assert out.pred.shape == (2, 12, 16 * 16 * 1)
    target = patchify(x, (16, 16, 1))[out.mask].reshape(out.pred.shape)
    assert torch.allclose(out.loss, ((out.pred - target) ** 2).mean())
    out2 = mae(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.mask, out2.mask) and torch.equal(out.loss, out2.loss)


@pytest.mark.parametrize("cross_attn", [True, False])
def test_prediction_ignores_masked_content(cross_attn: bool) -> None:
    """The masked conv stem keeps hidden voxels out of every visible token."""
    mae = small_mae(cross_attn=cross_attn).eval()
    x = batch()
    mask = random_patch_mask(2, 16, 0.75, torch.Generator().manual_seed(1))
    vox = mask.reshape(2, 2, 2, 4).repeat_interleave(16, 1).repeat_interleave(16, 2)
    x2 = torch.where(vox[:, None], torch.randn_like(x), x)
    with torch.no_grad():
        a, b = mae(x, mask=mask), mae(x2, mask=mask)
    assert torch.allclose(a.pred, b.pred, atol=1e-5)
    assert not torch.allclose(a.loss, b.loss)


def test_reconstruct_keeps_visible_voxels() -> None:
    mae = small_mae()
    x = batch()
    recon, vox = mae.reconstruct(x, mask_seed=4)
    assert recon.shape == x.shape and vox.shape == (2, *IMG)
    assert vox.float().mean().item() == pytest.approx(0.75)
    assert torch.equal(recon[:, 0][~vox], x[:, 0][~vox])
    assert mae.training  # mode restored


def test_training_lowers_loss() -> None:
    mae = small_mae()
    x = batch(4)
    opt = torch.optim.AdamW(mae.parameters(), lr=1e-3)
    losses = []
    for step in range(15):
        out = mae(x, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert sum(losses[-3:]) < sum(losses[:3])
    assert mae.enc_down_dict["sax"].pos_embed.grad is None


def test_save_load_and_transfer_to_convvit(tmp_path: Path) -> None:
    mae = small_mae().eval()
    path = save_mae(mae, tmp_path / "fm.safetensors", metadata={"steps": 1})
    back, extra = load_mae(path)
    assert extra == {"steps": 1} and back.config == mae.config
    x = batch()
    mask = random_patch_mask(2, 16, 0.75, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(mae(x, mask=mask).pred, back.eval()(x, mask=mask).pred)
    enc = mae.encoder_state_dict()
    assert enc and all(k.startswith(ENCODER_PREFIXES) for k in enc)
    model = build_convvit("small", IMG, in_frames=2)
    rep = load_pretrained(model, path)
    assert rep.n_loaded == len(enc) - 1  # all but pos_embed
    enc_path = save_mae(mae, tmp_path / "enc.safetensors", encoder_only=True)
    assert (
        load_pretrained(build_convvit("small", IMG), enc_path).n_loaded == len(enc) - 1
    )
    with pytest.raises(CheckpointError, match="encoder_only"):
        load_mae(enc_path)


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="divisible"):
        build_mae("small", (40, 40, 8))
    with pytest.raises(ConfigError, match="unknown MAE override"):
        build_mae("small", IMG, decoder_width=3)
    with pytest.raises(ConfigError, match="MAE input"):
        small_mae()(torch.zeros(1, 2, *IMG))
