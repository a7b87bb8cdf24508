"""CineMA's ConvViT classifier, re-implemented in plain torch with CineMA's exact names.

Chapter: notebooks/00_foundation_model_and_lora (the foundation model).

The model is a conv stem (two ConvMAE stages), a patch embedding, a pre-norm ViT
encoder with a CLS token, a multi-scale fusion of the conv skips with the ViT tokens,
and two linear heads (mean fused token, CLS token) whose logits are averaged. Every
parameter name and the state-dict order equal CineMA's ``cinema.convvit.ConvViT``
for the SAX view (``enc_down_dict.sax.*``, ``enc_fusion_dict.sax.*``, ``encoder.*``,
``pred_head_dict.{sax,cls}.*``), so the public ``cinema.safetensors`` loads unchanged
(see :func:`medlora_lib.models.load_pretrained`).

For the frozen-prefix cache the forward pass is split in two:
:meth:`ConvViT.forward_prefix` (conv stem, patch embedding, ``blocks[:k]`` and the
fusion skip) and :meth:`ConvViT.forward_suffix` (``blocks[k:]``, norm, fusion, heads);
``model(x)`` is literally ``forward_suffix(forward_prefix(x, 0), 0)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from medlora_lib.errors import ConfigError
from medlora_lib.models.pos_embed import sincos_pos_embed_tensor

__all__ = [
    "SIZES",
    "ConvViTConfig",
    "ConvViT",
    "build_convvit",
    "ConvLayerNorm",
    "MaskedConvBlock",
    "DownsampleEncoder",
    "MultiScaleFusion",
    "Attention",
    "Block",
    "ViTEncoder",
    "DropPath",
    "patchify",
    "unpatchify",
    "init_weights",
]

VIEW = "sax"

#: Named architecture sizes. ``base`` is CineMA; ``small`` is the CPU stand-in.
SIZES: dict[str, dict[str, Any]] = {
    "base": {
        "embed_dim": 768,
        "depth": 12,
        "num_heads": 12,
        "conv_chans": (64, 128),
    },
    "small": {
        "embed_dim": 96,
        "depth": 12,
        "num_heads": 3,
        "conv_chans": (16, 32),
    },
}

Reduce = Literal["all", "cls", "patch"]


def _tuple(v: Any) -> tuple[int, ...]:
    return tuple(int(x) for x in v)


@dataclass
class ConvViTConfig:
    """Architecture of a (SAX, 3-D) ConvViT; validated, JSON-serialisable.

    Saved next to every checkpoint (safetensors metadata) so a file can rebuild its
    model. Defaults are the ``small`` size; :func:`build_convvit` fills named sizes.
    """

    size: str = field(default="small", metadata={"help": "named size it came from"})
    image_size: tuple[int, int, int] = field(
        default=(48, 48, 8), metadata={"help": "input (H, W, D) in voxels"}
    )
    in_frames: int = field(
        default=2, metadata={"help": "input channels = cine frames (ED, ES)"}
    )
    num_classes: int = field(default=2, metadata={"help": "logits per head"})
    embed_dim: int = field(default=96, metadata={"help": "ViT width"})
    depth: int = field(default=6, metadata={"help": "number of ViT blocks"})
    num_heads: int = field(default=3, metadata={"help": "attention heads"})
    mlp_ratio: float = field(default=4.0, metadata={"help": "ViT MLP hidden / width"})
    conv_chans: tuple[int, ...] = field(
        default=(16, 32), metadata={"help": "channels of each conv stage"}
    )
    conv_n_blocks: int = field(default=2, metadata={"help": "MaskedConvBlocks/stage"})
    conv_mlp_ratio: int = field(default=4, metadata={"help": "conv MLP hidden ratio"})
    patch_size: tuple[int, int, int] = field(
        default=(4, 4, 1), metadata={"help": "kernel = stride of the first conv"}
    )
    scale_factor: tuple[int, int, int] = field(
        default=(2, 2, 1), metadata={"help": "downsampling of later stages"}
    )
    drop_path: float = field(default=0.1, metadata={"help": "DropPath of every block"})
    qkv_bias: bool = True
    norm_eps: float = field(default=1e-5, metadata={"help": "ViT LayerNorm eps"})
    conv_norm_eps: float = field(default=1e-6, metadata={"help": "conv LayerNorm eps"})
    reduce: Reduce = field(default="all", metadata={"help": "all | cls | patch"})

    def __post_init__(self) -> None:
        self.image_size = _tuple(self.image_size)  # type: ignore[assignment]
        self.conv_chans = _tuple(self.conv_chans)
        self.patch_size = _tuple(self.patch_size)  # type: ignore[assignment]
        self.scale_factor = _tuple(self.scale_factor)  # type: ignore[assignment]
        for name in ("image_size", "patch_size", "scale_factor"):
            v = getattr(self, name)
            if len(v) != 3 or any(x < 1 for x in v):
                raise ConfigError(
                    f"ConvViTConfig.{name} must be 3 positive ints (H, W, D), got {v}"
                )
        for name in ("in_frames", "num_classes", "embed_dim", "depth", "num_heads"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"ConvViTConfig.{name} must be >= 1")
        if not self.conv_chans:
            raise ConfigError("ConvViTConfig.conv_chans must list at least one stage")
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"ConvViTConfig.embed_dim ({self.embed_dim}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(
                f"ConvViTConfig.drop_path must be in [0, 1), got {self.drop_path}"
            )
        if self.reduce not in ("all", "cls", "patch"):
            raise ConfigError(
                f"ConvViTConfig.reduce must be 'all', 'cls' or 'patch', got {self.reduce!r}"
            )
        eff = self.eff_patch_size
        bad = [(s, p) for s, p in zip(self.image_size, eff, strict=True) if s % p != 0]
        if bad:
            raise ConfigError(
                f"ConvViTConfig.image_size {self.image_size} is not divisible by the "
                f"effective patch size {eff} (= patch_size x scale_factor^"
                f"{len(self.conv_chans)}); pad or crop the volumes to a multiple, e.g. "
                f"{tuple(max(p, s // p * p) for s, p in zip(self.image_size, eff, strict=True))}"
            )

    # derived geometry -------------------------------------------------------------
    @property
    def patch_sizes(self) -> list[tuple[int, ...]]:
        """Kernel of the first conv, each later conv stage, and the ViT patch embed."""
        return [self.patch_size] + [self.scale_factor] * len(self.conv_chans)

    @property
    def eff_patch_size(self) -> tuple[int, ...]:
        """Voxels covered by one ViT token: patch_size x scale_factor^n_stages."""
        return tuple(math.prod(ps[i] for ps in self.patch_sizes) for i in range(3))

    @property
    def grid_size(self) -> tuple[int, ...]:
        """ViT token grid (h, w, d)."""
        return tuple(
            s // p for s, p in zip(self.image_size, self.eff_patch_size, strict=True)
        )

    @property
    def n_patches(self) -> int:
        """Number of patch tokens (without CLS)."""
        return math.prod(self.grid_size)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def to_json(self) -> str:
        """JSON string (stored in checkpoint metadata)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConvViTConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise a ConfigError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(
                f"unknown ConvViTConfig fields {unknown}; known: {sorted(names)}"
            )
        return cls(**d)


# ----------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------
def init_weights(m: nn.Module) -> None:
    """CineMA init: xavier-uniform Linear weights, zero biases, LayerNorm 1 / 0."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        if m.weight is not None:
            nn.init.ones_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _token(embed_dim: int) -> nn.Parameter:
    t = nn.Parameter(torch.zeros(1, 1, embed_dim))
    nn.init.normal_(t, std=0.02)
    return t


def _frozen_pos_embed(embed_dim: int, grid: tuple[int, ...]) -> nn.Parameter:
    p = nn.Parameter(torch.empty(1, math.prod(grid), embed_dim), requires_grad=False)
    with torch.no_grad():
        p.copy_(sincos_pos_embed_tensor(embed_dim, grid))
    return p


class DropPath(nn.Module):
    """Stochastic depth per sample (timm semantics, scale_by_keep); identity in eval."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ConvLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of a (B, C, *spatial) tensor (CineMA)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.movedim(1, -1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.movedim(-1, 1).contiguous()


class ConvNormAct(nn.Module):
    """Strided patch-embedding conv, channel LayerNorm, exact GELU (``patch_embed``)."""

    def __init__(
        self, in_chans: int, out_chans: int, kernel: tuple[int, ...], eps: float
    ):
        super().__init__()
        self.conv = nn.Conv3d(in_chans, out_chans, kernel_size=kernel, stride=kernel)
        self.norm = ConvLayerNorm(out_chans, eps=eps)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class ConvMlp(nn.Module):
    """1x1x1 conv MLP: fc1, GELU, fc2."""

    def __init__(self, chans: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv3d(chans, hidden, kernel_size=1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv3d(hidden, chans, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MaskedConvBlock(nn.Module):
    """ConvMAE block: x += conv2(dw5(conv1(LN1 x) * mask)); x += mlp(LN2 x).

    ``mask`` (B, *spatial), 1 = visible, zeroes masked voxels before the depthwise
    5x5x5 conv so that masked content cannot leak into visible voxels (MAE only).
    """

    def __init__(self, chans: int, mlp_ratio: int = 4, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = ConvLayerNorm(chans, eps=eps)
        self.norm2 = ConvLayerNorm(chans, eps=eps)
        self.conv1 = nn.Conv3d(chans, chans, kernel_size=1)
        self.conv2 = nn.Conv3d(chans, chans, kernel_size=1)
        self.dw_conv = nn.Conv3d(chans, chans, kernel_size=5, padding=2, groups=chans)
        self.mlp = ConvMlp(chans, chans * mlp_ratio)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        if mask is not None:
            h = h * mask.unsqueeze(1).to(h.dtype)
        x = x + self.conv2(self.dw_conv(h))
        return x + self.mlp(self.norm2(x))


def patchify(image: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """(B, C, H, W, D) -> (B, h*w*d, p*q*r*C): tokens (h, w, d), features channel fastest."""
    b, c, h, w, d = image.shape
    p, q, r = patch_size
    x = image.reshape(b, c, h // p, p, w // q, q, d // r, r)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(b, (h // p) * (w // q) * (d // r), p * q * r * c)


def unpatchify(
    x: torch.Tensor, patch_size: Sequence[int], grid_size: Sequence[int]
) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, N, p*q*r*C) -> (B, C, H, W, D)."""
    b = x.shape[0]
    p, q, r = patch_size
    gh, gw, gd = grid_size
    x = x.reshape(b, gh, gw, gd, p, q, r, -1)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, -1, gh * p, gw * q, gd * r)


class PatchEmbed(nn.Module):
    """Patchify (channel fastest) then a Linear ``proj`` (CineMA ``PatchEmbed``)."""

    def __init__(self, in_chans: int, patch: tuple[int, ...], embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch
        self.proj = nn.Linear(in_chans * math.prod(patch), embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(patchify(x, self.patch_size))


def upsample_mask(mask: torch.Tensor, factor: Sequence[int]) -> torch.Tensor:
    """Nearest upsampling of a (B, h, w, d) mask by an integer factor per axis."""
    for axis, f in enumerate(factor):
        if f > 1:
            mask = mask.repeat_interleave(f, dim=axis + 1)
    return mask


class DownsampleEncoder(nn.Module):
    """Conv stem + patch embedding + ``linear`` + fixed ``pos_embed`` of one view.

    Registered as ``enc_down_dict.sax``; ``pos_embed`` comes first in the state dict.
    """

    def __init__(
        self,
        image_size: tuple[int, ...],
        in_chans: int,
        patch_size: tuple[int, ...],
        scale_factor: tuple[int, ...],
        conv_chans: Sequence[int],
        conv_n_blocks: int,
        embed_dim: int,
        conv_mlp_ratio: int = 4,
        conv_norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.patch_sizes = [tuple(patch_size)] + [tuple(scale_factor)] * len(conv_chans)
        grid = tuple(image_size)
        for ps in self.patch_sizes:
            grid = tuple(s // p for s, p in zip(grid, ps, strict=True))
        self.grid_size = grid
        self.pos_embed = _frozen_pos_embed(embed_dim, grid)
        self.conv_blocks = nn.ModuleList()
        cin = in_chans
        for ps, ch in zip(self.patch_sizes[:-1], conv_chans, strict=True):
            block = nn.Module()
            block.patch_embed = ConvNormAct(cin, ch, ps, conv_norm_eps)
            block.conv = nn.ModuleList(
                MaskedConvBlock(ch, conv_mlp_ratio, conv_norm_eps)
                for _ in range(conv_n_blocks)
            )
            self.conv_blocks.append(block)
            cin = ch
        self.patch_embed = PatchEmbed(cin, self.patch_sizes[-1], embed_dim)
        self.linear = nn.Linear(embed_dim, embed_dim)

    def pos_embed_for(self, grid: tuple[int, ...]) -> torch.Tensor:
        """The table for ``grid``; trilinearly interpolated when it differs (CineMA)."""
        if grid == self.grid_size:
            return self.pos_embed
        e = self.pos_embed.shape[-1]
        pe = self.pos_embed.float().reshape(1, *self.grid_size, e).movedim(-1, 1)
        pe = F.interpolate(pe, size=grid, mode="trilinear")
        return pe.movedim(1, -1).reshape(1, -1, e).to(self.pos_embed.dtype)

    def forward(
        self, image: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Conv stem and patch tokens.

        Args:
            image: (B, C, H, W, D).
            mask: optional (B, n_patches) bool at the token grid, True = masked (MAE).

        Returns:
            The skips of every conv stage and tokens (B, n_patches, E) with pos_embed.
        """
        b = image.shape[0]
        spatial = tuple(image.shape[2:])
        eff = tuple(math.prod(ps[i] for ps in self.patch_sizes) for i in range(3))
        if image.ndim != 5 or any(s % p for s, p in zip(spatial, eff, strict=True)):
            raise ConfigError(
                f"input of shape {tuple(image.shape)} must be (B, C, H, W, D) with "
                f"H, W, D divisible by the effective patch size {eff}; pad or crop it"
            )
        grid = tuple(s // p for s, p in zip(spatial, eff, strict=True))
        conv_masks: list[torch.Tensor | None] = [None] * len(self.conv_blocks)
        if mask is not None:
            visible = ~mask.reshape(b, *grid)
            for i in range(len(self.conv_blocks) - 1, -1, -1):
                visible = upsample_mask(visible, self.patch_sizes[i + 1])
                conv_masks[i] = visible
        skips = []
        x = image
        for block, cm in zip(self.conv_blocks, conv_masks, strict=True):
            x = block.patch_embed(x)
            for conv in block.conv:
                x = conv(x, cm)
            skips.append(x)
        x = self.linear(self.patch_embed(x)) + self.pos_embed_for(grid)
        return skips, x


class MultiScaleFusion(nn.Module):
    """``enc_fusion_dict.sax``: strided convs bring every skip to the token grid."""

    def __init__(
        self,
        patch_size: tuple[int, ...],
        scale_factor: tuple[int, ...],
        conv_chans: Sequence[int],
        embed_dim: int,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        n = len(conv_chans)
        sizes = [tuple(patch_size)] + [tuple(scale_factor)] * n
        self.down_convs = nn.ModuleList()
        for i, ch in enumerate(conv_chans):
            # skip i sits after sizes[:i+1]; the token grid after all sizes
            k = tuple(math.prod(s[a] for s in sizes[i + 1 :]) for a in range(3))
            self.down_convs.append(nn.Conv3d(ch, embed_dim, kernel_size=k, stride=k))
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)

    def skip_tokens(self, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        """Sum of the down-convolved skips, flattened to (B, n_patches, E)."""
        out = None
        for skip, conv in zip(skips, self.down_convs, strict=True):
            d = conv(skip).flatten(2).transpose(1, 2)
            out = d if out is None else out + d
        return out

    def forward(
        self, skips: Sequence[torch.Tensor], x: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """LN(x + sum of skips); with ``mask`` (True = masked) only visible tokens."""
        s = self.skip_tokens(skips)
        if mask is not None:
            s = s[~mask].reshape(x.shape[0], -1, x.shape[-1])
        return self.norm(x + s)


class Attention(nn.Module):
    """Multi-head attention with separate ``q`` and ``kv`` (K rows first, then V)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Self-attention, or cross-attention to ``context`` (un-normalised keys)."""
        ctx = x if context is None else context
        b, n, c = x.shape
        m = ctx.shape[1]
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(ctx).reshape(b, m, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """timm ``Mlp``: fc1, exact GELU, fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (``encoder.blocks.{i}``)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), context))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class ViTEncoder(nn.Module):
    """``encoder``: ``cls_token``, ``blocks``, ``norm``."""

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.cls_token = _token(embed_dim)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_path, norm_eps)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)

    def prepend_cls(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, E) -> (B, 1+N, E); the CLS token gets no positional embedding."""
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepend_cls(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


# ----------------------------------------------------------------------------------
# the classifier
# ----------------------------------------------------------------------------------
class ConvViT(nn.Module):
    """CineMA ConvViT for one SAX view (see the module docstring).

    Args:
        config: the architecture; ``config.in_frames`` input channels.
    """

    def __init__(self, config: ConvViTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.enc_down_dict = nn.ModuleDict(
            {
                VIEW: DownsampleEncoder(
                    c.image_size,
                    c.in_frames,
                    c.patch_size,
                    c.scale_factor,
                    c.conv_chans,
                    c.conv_n_blocks,
                    c.embed_dim,
                    c.conv_mlp_ratio,
                    c.conv_norm_eps,
                )
            }
        )
        self.enc_fusion_dict = nn.ModuleDict(
            {
                VIEW: MultiScaleFusion(
                    c.patch_size, c.scale_factor, c.conv_chans, c.embed_dim, c.norm_eps
                )
            }
        )
        self.encoder = ViTEncoder(
            c.embed_dim,
            c.depth,
            c.num_heads,
            c.mlp_ratio,
            c.qkv_bias,
            c.drop_path,
            c.norm_eps,
        )
        self.apply(init_weights)
        #: recompute block activations in the backward pass (medlora_lib.recipe)
        self.grad_checkpointing = False
        # created after init_weights, as in CineMA: PyTorch's default Linear init
        self.pred_head_dict = nn.ModuleDict(
            {v: nn.Linear(c.embed_dim, c.num_classes) for v in (VIEW, "cls")}
        )

    @property
    def depth(self) -> int:
        """Number of ViT blocks."""
        return len(self.encoder.blocks)

    def _check_start(self, start_block: int) -> None:
        if not 0 <= start_block <= self.depth:
            raise ConfigError(
                f"start_block must be in 0..{self.depth}, got {start_block}"
            )

    def forward_prefix(
        self, x: torch.Tensor, start_block: int
    ) -> dict[str, torch.Tensor]:
        """Everything that does not depend on blocks ``start_block`` and later.

        Args:
            x: image (B, in_frames, H, W, D).
            start_block: first block *not* run (0..depth).

        Returns:
            ``{"tokens": (B, N+1, E) after blocks[:start_block], CLS first,
            "fusion_skip": (B, N, E) = sum of the flattened fusion down-convs}``.
        """
        self._check_start(start_block)
        skips, tokens = self.enc_down_dict[VIEW](x)
        fusion_skip = self.enc_fusion_dict[VIEW].skip_tokens(skips)
        tokens = self.encoder.prepend_cls(tokens)
        for blk in self.encoder.blocks[:start_block]:
            tokens = self._block(blk, tokens)
        return {"tokens": tokens, "fusion_skip": fusion_skip}

    def _block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One ViT block; with ``grad_checkpointing`` (training, gradients needed) its
        activations are recomputed in the backward pass instead of stored (the RNG state
        is restored, so drop-path draws the same mask)."""
        if (
            self.grad_checkpointing
            and self.training
            and torch.is_grad_enabled()
            and (x.requires_grad or any(p.requires_grad for p in blk.parameters()))
        ):
            from torch.utils.checkpoint import checkpoint

            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def encode_suffix(
        self, state: dict[str, torch.Tensor], start_block: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run blocks[start_block:], ``encoder.norm`` and fusion.

        Returns:
            cls (B, E) and fused patch tokens (B, N, E).
        """
        self._check_start(start_block)
        x = state["tokens"]
        for blk in self.encoder.blocks[start_block:]:
            x = self._block(blk, x)
        x = self.encoder.norm(x)
        fusion = self.enc_fusion_dict[VIEW]
        fused = fusion.norm(x[:, 1:] + state["fusion_skip"])
        return x[:, 0], fused

    def head(
        self, cls: torch.Tensor, fused: torch.Tensor, reduce: str | None = None
    ) -> torch.Tensor:
        """Logits (B, num_classes) from the CLS token and the fused patch tokens."""
        reduce = reduce or self.config.reduce
        if reduce == "cls":
            return self.pred_head_dict["cls"](cls)
        patch = self.pred_head_dict[VIEW](fused.mean(dim=1))
        if reduce == "patch":
            return patch
        if reduce == "all":
            return (patch + self.pred_head_dict["cls"](cls)) / 2
        raise ConfigError(f"reduce must be 'all', 'cls' or 'patch', got {reduce!r}")

    def forward_suffix(
        self,
        state: dict[str, torch.Tensor],
        start_block: int,
        reduce: str | None = None,
    ) -> torch.Tensor:
        """Logits (B, num_classes) from a :meth:`forward_prefix` state."""
        cls, fused = self.encode_suffix(state, start_block)
        return self.head(cls, fused, reduce)

    def forward(self, x: torch.Tensor, reduce: str | None = None) -> torch.Tensor:
        """Logits (B, num_classes); ``reduce`` defaults to ``config.reduce``."""
        return self.forward_suffix(self.forward_prefix(x, 0), 0, reduce)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Frozen features for linear probes.

        Returns:
            ``cls`` (B, E): the normed CLS token; ``patch_mean`` (B, E): the mean of the
            fused patch tokens (what the ``sax`` head sees).
        """
        cls, fused = self.encode_suffix(self.forward_prefix(x, 0), 0)
        return {"cls": cls, "patch_mean": fused.mean(dim=1)}


def build_convvit(
    size: str = "small",
    image_size: Sequence[int] = (48, 48, 8),
    in_frames: int = 2,
    num_classes: int = 2,
    **overrides: Any,
) -> ConvViT:
    """Build a ConvViT of a named size; every number can be overridden.

    Args:
        size: ``"small"`` (96 wide, 12 blocks, 3 heads, conv [16, 32]) or ``"base"``
            (CineMA: 768, 12, 12, [64, 128]).
        image_size: (H, W, D) input size.
        in_frames: input channels (2 = ED + ES).
        num_classes: classes per head.
        **overrides: any :class:`ConvViTConfig` field (``embed_dim``, ``depth``,
            ``num_heads``, ``mlp_ratio``, ``conv_chans``, ``conv_n_blocks``,
            ``patch_size``, ``scale_factor``, ``drop_path``, ``reduce`` ...).

    Returns:
        The model, CineMA-initialised, in training mode.

    Raises:
        ConfigError: unknown size or field, or inconsistent numbers.
    """
    if size not in SIZES:
        raise ConfigError(
            f"unknown ConvViT size {size!r}; choose one of {sorted(SIZES)}"
        )
    fields = {f.name for f in dataclasses.fields(ConvViTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(
            f"unknown ConvViT override(s) {unknown}; known: {sorted(fields)}"
        )
    kw = {**SIZES[size], **overrides}
    cfg = ConvViTConfig(
        size=size,
        image_size=tuple(image_size),
        in_frames=in_frames,
        num_classes=num_classes,
        **kw,
    )
    return ConvViT(cfg)
