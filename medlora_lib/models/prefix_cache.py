"""Frozen-prefix cache: compute the frozen part of the ConvViT once, train only the suffix.

Chapter ``notebooks/05_block_ablation`` (and used by the training loops of
``notebooks/04_med_dual_lora``).

When LoRA sits only in the last k blocks and the input is not augmented, everything before
the first adapted block — the conv stem, the patch embedding, the fusion down-convolutions and
blocks ``0 .. start_block-1`` — is a fixed function of the input. :func:`build_prefix_cache`
runs :meth:`ConvViT.forward_prefix` once per subject (``torch.no_grad``, eval mode) and stores
its ``tokens`` (N, T+1, C) and ``fusion_skip`` (N, T, C). :class:`CachedSuffixModel` then
runs only ``forward_suffix`` (blocks ``start_block ..``, ``encoder.norm``, the fusion norm and
the heads) on those tensors, with or without peft adapters.

Exactness: in eval mode the cached path gives the same logits as the full forward (up to
float rounding). In training mode it equals the full forward *with the prefix in eval mode*:
stochastic depth (``drop_path``) of the frozen prefix blocks is not applied, while the
adapted suffix blocks keep it. Input augmentation is incompatible with a cache (the prefix
would change every epoch) and is refused.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from medlora_lib.adapters import first_adapted_block
from medlora_lib.errors import ConfigError, DataError

__all__ = [
    "CachedSuffixModel",
    "PrefixCache",
    "PrefixCacheDataset",
    "build_prefix_cache",
    "check_prefix_frozen",
    "estimate_prefix_cache_bytes",
    "first_adapted_block",
]

_BLOCK_RE = re.compile(r"^encoder\.blocks\.(\d+)\.")
_PEFT_PREFIX = "base_model.model."


def _unwrap(model: nn.Module) -> nn.Module:
    from medlora_lib.adapters import unwrap_model

    return unwrap_model(model)


def _depth(model: nn.Module) -> int:
    base = _unwrap(model)
    return len(base.encoder.blocks)


def _in_suffix(name: str, start_block: int) -> bool:
    """True for parameters that run after the prefix (names without peft's prefix)."""
    m = _BLOCK_RE.match(name)
    if m is not None:
        return int(m.group(1)) >= start_block
    return (
        name.startswith("encoder.norm.")
        or name.startswith("pred_head_dict.")
        or re.match(r"^enc_fusion_dict\.[^.]+\.norm\.", name) is not None
    )


def check_prefix_frozen(model: nn.Module, start_block: int) -> None:
    """Refuse a cache whose prefix would not be a fixed function of the input.

    Args:
        model: a ConvViT or the ``PeftModel`` returned by ``apply_adapters``.
        start_block: first block run by the suffix (0..depth).

    Raises:
        ConfigError: ``start_block`` out of range, a LoRA adapter inside blocks
            ``0 .. start_block-1``, or a trainable parameter in the prefix.
    """
    depth = _depth(model)
    if isinstance(start_block, bool) or not isinstance(start_block, int | np.integer):
        raise ConfigError(
            f"start_block={start_block!r} must be an integer in 0..{depth}."
        )
    if not 0 <= int(start_block) <= depth:
        raise ConfigError(
            f"start_block={start_block} is out of range for a model of depth {depth}; use "
            f"0..{depth} (first_adapted_block(config, depth) is the largest exact choice)."
        )
    lora_blocks = set()
    trainable = []
    for name, module in _unwrap(model).named_modules():
        m = _BLOCK_RE.match(name + ".")
        if m and hasattr(module, "lora_A") and int(m.group(1)) < start_block:
            lora_blocks.add(int(m.group(1)))
    for name, p in model.named_parameters():
        name = name.removeprefix(_PEFT_PREFIX)
        if p.requires_grad and not _in_suffix(name, start_block):
            trainable.append(name)
    if lora_blocks:
        first = min(lora_blocks)
        raise ConfigError(
            f"start_block={start_block}, but LoRA adapts block(s) {sorted(lora_blocks)} "
            f"inside the cached prefix, so the cache would not be exact; use start_block <= "
            f"{first} (first_adapted_block(config, depth)) or adapt only later blocks "
            "(AdapterConfig.adapted_blocks, e.g. 'last2')."
        )
    if trainable:
        raise ConfigError(
            f"start_block={start_block}, but {len(trainable)} prefix parameter(s) are "
            f"trainable (e.g. {trainable[:3]}); freeze them or use a smaller start_block."
        )


def estimate_prefix_cache_bytes(
    model_config: Any, n_subjects: int, bytes_per_value: int = 4
) -> int:
    """Memory of a prefix cache before building it: ``N * (2T + 1) * C * bytes``.

    ``T`` = number of patch tokens (``model_config.n_patches``), ``C`` = ``embed_dim``.
    For the ``cpu`` profile (small, 48x48x8: T = 72, C = 96) that is 55 kB per subject; for the
    ``paper`` profile (base, 192x192x16: T = 2304, C = 768) about 14 MB per subject.
    """
    t = int(model_config.n_patches)
    c = int(model_config.embed_dim)
    return int(n_subjects) * (2 * t + 1) * c * int(bytes_per_value)


@dataclass
class PrefixCache:
    """Cached prefix outputs of N subjects (on ``tokens.device``, by default the CPU)."""

    tokens: torch.Tensor
    fusion_skip: torch.Tensor
    start_block: int
    build_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.tokens.shape[0] != self.fusion_skip.shape[0]:
            raise DataError(
                f"PrefixCache: tokens has {self.tokens.shape[0]} subjects but fusion_skip "
                f"has {self.fusion_skip.shape[0]}."
            )

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def nbytes(self) -> int:
        """Memory held by the cache in bytes."""
        return int(
            self.tokens.numel() * self.tokens.element_size()
            + self.fusion_skip.numel() * self.fusion_skip.element_size()
        )

    def as_inputs(self) -> dict[str, torch.Tensor]:
        """``{"tokens", "fusion_skip"}`` with the subject axis first (for ``train.fit``)."""
        return {"tokens": self.tokens, "fusion_skip": self.fusion_skip}

    def state(
        self, index: Sequence[int] | slice | torch.Tensor, device: Any = None
    ) -> dict[str, torch.Tensor]:
        """The suffix input for the subjects ``index`` (a batch), optionally moved to ``device``."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long)
        out = {"tokens": self.tokens[index], "fusion_skip": self.fusion_skip[index]}
        if device is not None:
            out = {k: v.to(device, non_blocking=True) for k, v in out.items()}
        return out

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        device: Any = None,
    ) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """Yield ``(indices, state)`` batches; cheaper than a DataLoader for in-memory tensors."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            yield idx, self.state(idx, device)

    def to(self, device: Any) -> PrefixCache:
        """A copy on ``device`` (e.g. move the whole cache to the GPU once)."""
        return PrefixCache(
            self.tokens.to(device),
            self.fusion_skip.to(device),
            self.start_block,
            self.build_seconds,
        )


class PrefixCacheDataset(Dataset):
    """Map-style dataset over a :class:`PrefixCache`: items ``(state, label)``.

    ``state`` is ``{"tokens", "fusion_skip"}`` for one subject; PyTorch's default collate
    turns a batch into batched tensors that :class:`CachedSuffixModel` accepts.
    """

    def __init__(self, cache: PrefixCache, labels: Any = None) -> None:
        self.cache = cache
        if labels is not None:
            labels = torch.as_tensor(np.asarray(labels))
            if labels.shape[0] != len(cache):
                raise DataError(
                    f"PrefixCacheDataset: {labels.shape[0]} labels for {len(cache)} cached "
                    "subjects; pass one label per cached subject, in the same order."
                )
        self.labels = labels

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> Any:
        state = {
            "tokens": self.cache.tokens[i],
            "fusion_skip": self.cache.fusion_skip[i],
        }
        if self.labels is None:
            return state
        return state, self.labels[i]


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def build_prefix_cache(
    model: nn.Module,
    images: Any,
    start_block: int,
    batch_size: int = 32,
    augmentation: bool = False,
    storage_device: Any = "cpu",
) -> PrefixCache:
    """Run ``forward_prefix`` once per subject and keep its outputs.

    Args:
        model: a ConvViT or the ``PeftModel`` from ``apply_adapters`` (LoRA only in blocks
            ``>= start_block``). Run on the model's device, in eval mode (restored after).
        images: (N, in_frames, H, W, D) tensor or array, as the model's input.
        start_block: first block *not* cached, usually ``first_adapted_block(config, depth)``.
        batch_size: subjects per forward pass while building.
        augmentation: the training loop's augmentation flag; a cache is refused when True.
        storage_device: where the cache lives (``"cpu"`` by default; the GPU is faster when
            it fits, see :func:`estimate_prefix_cache_bytes`).

    Returns:
        The :class:`PrefixCache` (``nbytes`` = its memory, ``build_seconds`` = build time).

    Raises:
        ConfigError: augmentation on, adapters or trainable tensors inside the prefix, bad
            ``start_block`` or ``batch_size``.
        DataError: images of the wrong shape.
    """
    if augmentation:
        raise ConfigError(
            "build_prefix_cache: augmentation is on, so the frozen prefix is not a fixed "
            "function of the subject; turn augmentation off or train without the cache."
        )
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or batch_size < 1
    ):
        raise ConfigError(
            f"build_prefix_cache: batch_size={batch_size!r} must be >= 1."
        )
    check_prefix_frozen(model, start_block)
    base = _unwrap(model)
    x_all = torch.as_tensor(
        np.asarray(images) if not torch.is_tensor(images) else images
    )
    cfg = getattr(base, "config", None)
    want = None
    if cfg is not None and hasattr(cfg, "image_size") and hasattr(cfg, "in_frames"):
        want = (int(cfg.in_frames), *(int(s) for s in cfg.image_size))
    if x_all.ndim != 5 or (want is not None and tuple(x_all.shape[1:]) != want):
        raise DataError(
            f"build_prefix_cache: images have shape {tuple(x_all.shape)}; expected "
            f"(N, {', '.join(map(str, want)) if want else 'frames, H, W, D'}) as the "
            "model's input (preprocess with the same profile as the model)."
        )
    device = _model_device(model)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    tokens, skips = [], []
    try:
        for i in range(0, x_all.shape[0], batch_size):
            x = x_all[i : i + batch_size].to(device=device, dtype=torch.float32)
            out = base.forward_prefix(x, start_block)
            tokens.append(out["tokens"].to(storage_device))
            skips.append(out["fusion_skip"].to(storage_device))
    finally:
        model.train(was_training)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    return PrefixCache(
        tokens=torch.cat(tokens) if tokens else torch.empty(0),
        fusion_skip=torch.cat(skips) if skips else torch.empty(0),
        start_block=int(start_block),
        build_seconds=elapsed,
    )


class CachedSuffixModel(nn.Module):
    """Runs only the suffix (blocks ``start_block ..`` + norms + heads) on cached states.

    ``model`` keeps its parameters and adapters (an optimiser over ``model.parameters()``
    works unchanged); ``forward(state)`` returns the logits ``(B, num_classes)``.

    Raises:
        ConfigError: adapters or trainable tensors inside the prefix, bad ``start_block``.
    """

    def __init__(self, model: nn.Module, start_block: int) -> None:
        super().__init__()
        check_prefix_frozen(model, start_block)
        self.model = model
        self.start_block = int(start_block)

    def forward(
        self,
        state: Mapping[str, torch.Tensor] | None = None,
        *,
        tokens: torch.Tensor | None = None,
        fusion_skip: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits from ``state = {"tokens", "fusion_skip"}`` (or the two keyword tensors)."""
        if state is None:
            state = {"tokens": tokens, "fusion_skip": fusion_skip}
        missing = [k for k in ("tokens", "fusion_skip") if state.get(k) is None]
        if missing:
            raise DataError(
                f"CachedSuffixModel: the state lacks {missing}; pass a batch from "
                "PrefixCache.state / PrefixCacheDataset."
            )
        return _unwrap(self.model).forward_suffix(dict(state), self.start_block)
