"""Masked-autoencoder pretraining of the ConvViT encoder, following CineMA (SAX only).

Chapter: notebooks/00_foundation_model_and_lora (how the small stand-in FM is made).

Design (CineMA's ``cinema.mae.mae.CineMA`` restricted to the single SAX view):

- Input is one cine frame, ``in_chans = 1`` (as CineMA pretrains); the fine-tuned
  ConvViT takes 2 frames and :func:`~medlora_lib.models.load_pretrained` tiles the
  first conv kernel, exactly as CineMA does.
- Per-sample random masking of ``mask_ratio`` (0.75) of the ViT patch tokens, drawn
  from an optional seeded ``torch.Generator``.
- **Masked conv stem, as CineMA**: the token mask is upsampled to each conv stage and
  multiplies the features before every depthwise 5x5x5 conv (``MaskedConvBlock``),
  so masked voxels cannot leak into visible tokens; the encoder sees visible tokens
  only and the fusion adds only the visible down-convolved skips.
- ``dec_linear`` maps to the decoder width; ``dec_embed_dict.sax`` holds the frozen
  sin-cos table and the ``mask_token``. The decoder is CineMA's **cross-attention**
  decoder by default (queries = CLS + mask tokens, keys / values = the visible tokens,
  only the queries are normalised); ``cross_attn=False`` gives the classic
  self-attention MAE decoder over all tokens.
- Loss: MSE on the masked patches only, targets are the raw image patches at the
  decoder patch size ``patch_size x scale_factor ** n_conv_stages`` (= the voxels one
  token covers: (16, 16, 1) for both sizes here), not normalised (CineMA's default).

Key names equal CineMA's MAE (``enc_down_dict.sax.*``, ``enc_fusion_dict.sax.*``,
``encoder.*``, ``dec_linear``, ``dec_embed_dict.sax.{pos_embed,mask_token}``,
``decoder.*``, ``pred_head_dict.sax``), so a file written by :func:`save_mae` loads
into a ConvViT with :func:`~medlora_lib.models.load_pretrained`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from medlora_lib.errors import CheckpointError, ConfigError
from medlora_lib.models.convvit import (
    SIZES,
    VIEW,
    Block,
    ConvViTConfig,
    DownsampleEncoder,
    MultiScaleFusion,
    ViTEncoder,
    _frozen_pos_embed,
    _token,
    init_weights,
    patchify,
    unpatchify,
    upsample_mask,
)

__all__ = [
    "MAE_SIZES",
    "MAEConfig",
    "MAEOutput",
    "MaskedAutoencoder",
    "build_mae",
    "random_patch_mask",
    "save_mae",
    "load_mae",
    "ENCODER_PREFIXES",
]

#: Decoder of each named size (CineMA base: 512 wide, 8 blocks, 16 heads).
MAE_SIZES: dict[str, dict[str, Any]] = {
    "base": {
        **SIZES["base"],
        "dec_embed_dim": 512,
        "dec_depth": 8,
        "dec_num_heads": 16,
    },
    "small": {
        **SIZES["small"],
        "dec_embed_dim": 96,
        "dec_depth": 2,
        "dec_num_heads": 3,
    },
}
#: State-dict prefixes of the encoder (what fine-tuning reuses).
ENCODER_PREFIXES = ("enc_down_dict.", "enc_fusion_dict.", "encoder.")
_FORMAT = "medlora-cinema-mae-v1"


@dataclass
class MAEConfig:
    """Architecture and masking of the SAX masked autoencoder (JSON-serialisable)."""

    size: str = "small"
    image_size: tuple[int, int, int] = (48, 48, 8)
    in_chans: int = field(default=1, metadata={"help": "frames per input (CineMA: 1)"})
    embed_dim: int = 96
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    conv_chans: tuple[int, ...] = (16, 32)
    conv_n_blocks: int = 2
    conv_mlp_ratio: int = 4
    patch_size: tuple[int, int, int] = (4, 4, 1)
    scale_factor: tuple[int, int, int] = (2, 2, 1)
    dec_embed_dim: int = 96
    dec_depth: int = 2
    dec_num_heads: int = 3
    mask_ratio: float = field(default=0.75, metadata={"help": "share of tokens masked"})
    cross_attn: bool = field(default=True, metadata={"help": "CineMA decoder"})
    norm_target: bool = False
    qkv_bias: bool = True
    norm_eps: float = 1e-5
    conv_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        self.encoder_config()  # validates geometry and widths
        for name in ("image_size", "patch_size", "scale_factor", "conv_chans"):
            setattr(self, name, tuple(int(x) for x in getattr(self, name)))
        if self.dec_embed_dim % self.dec_num_heads:
            raise ConfigError(
                f"MAEConfig.dec_embed_dim ({self.dec_embed_dim}) must be divisible by "
                f"dec_num_heads ({self.dec_num_heads})"
            )
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(
                f"MAEConfig.mask_ratio must be in [0, 1), got {self.mask_ratio}"
            )

    def encoder_config(self) -> ConvViTConfig:
        """The matching ConvViT geometry (``in_frames = in_chans``)."""
        return ConvViTConfig(
            size=self.size, image_size=self.image_size, in_frames=self.in_chans,
            embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio, conv_chans=self.conv_chans,
            conv_n_blocks=self.conv_n_blocks, conv_mlp_ratio=self.conv_mlp_ratio,
            patch_size=self.patch_size, scale_factor=self.scale_factor, drop_path=0.0,
            qkv_bias=self.qkv_bias, norm_eps=self.norm_eps,
            conv_norm_eps=self.conv_norm_eps,
        )  # fmt: skip

    @property
    def grid_size(self) -> tuple[int, ...]:
        """ViT token grid."""
        return self.encoder_config().grid_size

    @property
    def dec_patch_size(self) -> tuple[int, ...]:
        """Voxels predicted per token: patch_size x scale_factor ** n_conv_stages."""
        return self.encoder_config().eff_patch_size

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MAEConfig:
        """Inverse of :meth:`to_dict`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(
                f"unknown MAEConfig fields {unknown}; known: {sorted(names)}"
            )
        return cls(**d)


class MAEOutput(NamedTuple):
    """Result of :meth:`MaskedAutoencoder.forward`."""

    loss: torch.Tensor  #: scalar MSE on the masked patches
    pred: torch.Tensor  #: (B, n_masked, prod(dec_patch_size) * in_chans)
    mask: torch.Tensor  #: (B, n_patches) bool, True = masked (predicted)


def random_patch_mask(
    batch: int,
    n_patches: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Per-sample random mask with exactly ``n_patches - int(n * (1 - ratio))`` masked.

    Args:
        batch: batch size.
        n_patches: tokens per sample.
        mask_ratio: share to mask, in [0, 1).
        generator: optional seeded CPU generator (reproducible masks).
        device: where the mask lives.

    Returns:
        Bool (batch, n_patches), True = masked.
    """
    noise = torch.rand(batch, n_patches, generator=generator)
    n_keep = int(n_patches * (1 - mask_ratio))
    order = noise.argsort(dim=1)
    mask = torch.zeros(batch, n_patches, dtype=torch.bool)
    mask.scatter_(1, order[:, n_keep:], True)
    return mask.to(device)


class DecoderEmbedding(nn.Module):
    """``dec_embed_dict.sax``: frozen decoder sin-cos table and the mask token."""

    def __init__(self, grid: tuple[int, ...], dec_embed_dim: int) -> None:
        super().__init__()
        self.pos_embed = _frozen_pos_embed(dec_embed_dim, grid)
        self.mask_token = _token(dec_embed_dim)

    def forward(
        self, x_vis: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Visible tokens + their pos, mask tokens + their pos (token order kept)."""
        b, _, c = x_vis.shape
        pe = self.pos_embed.expand(b, -1, -1)
        vis_pe = pe[~mask].reshape(b, -1, c)
        mask_pe = pe[mask].reshape(b, -1, c)
        return x_vis + vis_pe, self.mask_token + mask_pe


class ViTDecoder(nn.Module):
    """``decoder``: ``blocks`` then ``norm`` on the masked queries."""

    def __init__(self, cfg: MAEConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(cfg.dec_embed_dim, cfg.dec_num_heads, cfg.mlp_ratio, cfg.qkv_bias)
            for _ in range(cfg.dec_depth)
        )
        self.norm = nn.LayerNorm(cfg.dec_embed_dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None, n_masked: int
    ) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x, context)
        return self.norm(x[:, x.shape[1] - n_masked :])


class MaskedAutoencoder(nn.Module):
    """CineMA-style MAE for the SAX view (see the module docstring).

    Args:
        config: the architecture and masking ratio.
    """

    def __init__(self, config: MAEConfig) -> None:
        super().__init__()
        self.config = c = config
        self.enc_down_dict = nn.ModuleDict(
            {
                VIEW: DownsampleEncoder(
                    c.image_size, c.in_chans, c.patch_size, c.scale_factor,
                    c.conv_chans, c.conv_n_blocks, c.embed_dim, c.conv_mlp_ratio,
                    c.conv_norm_eps,
                )
            }
        )  # fmt: skip
        self.enc_fusion_dict = nn.ModuleDict(
            {
                VIEW: MultiScaleFusion(
                    c.patch_size, c.scale_factor, c.conv_chans, c.embed_dim, c.norm_eps
                )
            }
        )
        self.encoder = ViTEncoder(
            c.embed_dim, c.depth, c.num_heads, c.mlp_ratio, c.qkv_bias, 0.0, c.norm_eps
        )
        self.dec_linear = nn.Linear(c.embed_dim, c.dec_embed_dim)
        self.dec_embed_dict = nn.ModuleDict(
            {VIEW: DecoderEmbedding(c.grid_size, c.dec_embed_dim)}
        )
        self.decoder = ViTDecoder(c)
        self.pred_head_dict = nn.ModuleDict(
            {VIEW: nn.Linear(c.dec_embed_dim, math.prod(c.dec_patch_size) * c.in_chans)}
        )
        self.apply(init_weights)

    def forward(
        self,
        x: torch.Tensor,
        mask_ratio: float | None = None,
        generator: torch.Generator | None = None,
        mask: torch.Tensor | None = None,
    ) -> MAEOutput:
        """Mask, encode the visible tokens, decode the masked ones, MSE loss.

        Args:
            x: images (B, in_chans, H, W, D) at ``config.image_size``.
            mask_ratio: overrides ``config.mask_ratio``.
            generator: seeded generator for the random mask.
            mask: an explicit (B, n_patches) bool mask (True = masked) instead.

        Returns:
            :class:`MAEOutput` (loss, predicted masked patches, mask).
        """
        c = self.config
        b = x.shape[0]
        n = math.prod(c.grid_size)
        if tuple(x.shape[1:]) != (c.in_chans, *c.image_size):
            raise ConfigError(
                f"MAE input must be (B, {c.in_chans}, {', '.join(map(str, c.image_size))}),"
                f" got {tuple(x.shape)}"
            )
        if mask is None:
            ratio = c.mask_ratio if mask_ratio is None else mask_ratio
            mask = random_patch_mask(b, n, ratio, generator, x.device)
        n_masked = int(mask[0].sum())
        if n_masked == 0:
            raise ConfigError("MAE mask hides no token; use mask_ratio > 0")
        skips, tokens = self.enc_down_dict[VIEW](x, mask)
        vis = tokens[~mask].reshape(b, -1, tokens.shape[-1])
        enc = self.encoder(vis)
        fused = self.enc_fusion_dict[VIEW](skips, enc[:, 1:], mask)
        y = self.dec_linear(torch.cat([enc[:, :1], fused], dim=1))
        y_vis, y_mask = self.dec_embed_dict[VIEW](y[:, 1:], mask)
        if c.cross_attn:
            out = self.decoder(torch.cat([y[:, :1], y_mask], dim=1), y_vis, n_masked)
        else:
            out = self.decoder(
                torch.cat([y[:, :1], y_vis, y_mask], dim=1), None, n_masked
            )
        pred = self.pred_head_dict[VIEW](out)
        target = patchify(x, c.dec_patch_size)
        if c.norm_target:
            mean = target.mean(-1, keepdim=True)
            std = target.var(-1, keepdim=True) ** 0.5
            target = (target - mean) / (std + 1e-6)
        target = target[mask].reshape(pred.shape)
        loss = nn.functional.mse_loss(pred, target.detach())
        return MAEOutput(loss, pred, mask)

    @torch.no_grad()
    def reconstruct(
        self, x: torch.Tensor, mask_seed: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction for figures (eval mode, reproducible mask).

        Args:
            x: images (B, in_chans, H, W, D).
            mask_seed: seed of the random mask.

        Returns:
            ``recon`` (B, in_chans, H, W, D): predictions on masked patches, the input
            on visible ones; ``mask`` (B, H, W, D) bool, True where a voxel was masked.
        """
        was = self.training
        self.eval()
        try:
            out = self(x, generator=torch.Generator().manual_seed(int(mask_seed)))
        finally:
            self.train(was)
        c = self.config
        patches = patchify(x, c.dec_patch_size).clone()
        patches[out.mask] = out.pred.reshape(-1, patches.shape[-1]).to(patches.dtype)
        recon = unpatchify(patches, c.dec_patch_size, c.grid_size)
        vox = upsample_mask(
            out.mask.reshape(x.shape[0], *c.grid_size), c.dec_patch_size
        )
        return recon, vox

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """Encoder weights under CineMA's MAE names (loadable by ``load_pretrained``)."""
        return {
            k: v for k, v in self.state_dict().items() if k.startswith(ENCODER_PREFIXES)
        }


def build_mae(
    size: str = "small", image_size: Sequence[int] = (48, 48, 8), **overrides: Any
) -> MaskedAutoencoder:
    """Build an MAE of a named size (``small`` or CineMA ``base``).

    Args:
        size: named size; the decoder is 512 / 8 / 16 for base and 96 / 2 / 3 for small.
        image_size: (H, W, D).
        **overrides: any :class:`MAEConfig` field.

    Returns:
        The model (CineMA init).

    Raises:
        ConfigError: unknown size or field.
    """
    if size not in MAE_SIZES:
        raise ConfigError(
            f"unknown MAE size {size!r}; choose one of {sorted(MAE_SIZES)}"
        )
    names = {f.name for f in dataclasses.fields(MAEConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"unknown MAE override(s) {unknown}; known: {sorted(names)}")
    cfg = MAEConfig(
        size=size, image_size=tuple(image_size), **{**MAE_SIZES[size], **overrides}
    )
    return MaskedAutoencoder(cfg)


def save_mae(
    model: MaskedAutoencoder,
    path: str | Path,
    metadata: dict[str, Any] | None = None,
    encoder_only: bool = False,
) -> Path:
    """Write the MAE (or only its encoder) as safetensors with JSON metadata.

    Args:
        model: the MAE.
        path: target ``.safetensors`` file.
        metadata: extra JSON-able provenance (seed, steps, data ...).
        encoder_only: keep only ``enc_*`` / ``encoder.*`` keys (smaller file).

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = model.encoder_state_dict() if encoder_only else model.state_dict()
    meta = {
        "format": _FORMAT,
        "config": json.dumps(model.config.to_dict(), sort_keys=True),
        "extra": json.dumps(metadata or {}, sort_keys=True),
    }
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(path), meta
    )
    return path


def load_mae(path: str | Path) -> tuple[MaskedAutoencoder, dict[str, Any]]:
    """Rebuild an MAE written by :func:`save_mae` (full, not encoder-only).

    Returns:
        The model and the extra metadata dict.

    Raises:
        CheckpointError: missing file, foreign format or an encoder-only file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"MAE checkpoint {path} does not exist")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise CheckpointError(
                f"{path} was not written by medlora_lib.models.mae.save_mae "
                f"(metadata format {meta.get('format')!r}); load it into a ConvViT with "
                "load_pretrained instead"
            )
        sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    model = MaskedAutoencoder(MAEConfig.from_dict(json.loads(meta["config"])))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit its own config (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}); was it saved with encoder_only=True?"
        )
    return model, json.loads(meta.get("extra", "{}"))
