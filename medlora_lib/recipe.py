"""CineMA's fine-tuning recipe, one typed switch per part (``book/method.md`` §4,
notebook ``02_single_site_baseline``).

CineMA fine-tunes its classifiers (``cinema/classification/*/config.yaml``,
``cinema/train.py``, ``cinema/optim.py``) with

* training-time augmentation: gamma contrast, Gaussian noise, min-max rescaling, then a
  random affine (in-plane rotation up to ±180°, scaling ±20 %, in-plane translation up to
  60 voxels at 1 mm), each random part with probability 0.5 (:func:`make_augmentation`);
* a learning rate that warms up linearly and then follows a half cycle of a cosine down to
  ``min_lr`` over the whole training (:func:`lr_at`); in a federation the "whole training"
  is the federation's step count: a step's position is
  ``(round - 1 + fraction of the round done) / fed.num_rounds``;
* layer-wise learning-rate decay 0.75 (BEiT / MAE): block ``i`` learns at
  ``0.75 ** (depth - i)`` of the rate, the conv stem and embeddings at
  ``0.75 ** (depth + 1)``, the heads and the final norm at the full rate
  (:func:`layer_id`, :func:`param_groups`);
* early stopping on the validation MCC with patience 5 (:func:`early_stop_round`);
* mixed precision on CUDA (:func:`resolve_precision`) and gradient checkpointing
  (:func:`set_grad_checkpointing`).

Every part is a field of :class:`~medlora_lib.config.TrainConfig` (``data.augment`` for the
augmentation), on in the ``paper`` profile and off in ``cpu`` / ``smoke``, whose results
are therefore those of before the recipe existed. The optimiser state a site keeps across
rounds (``train.optimizer_state``) is handled by :func:`optimizer_state` /
:func:`load_optimizer_state`.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from medlora_lib.config import TrainConfig

__all__ = [
    "CINEMA_AUGMENTATION",
    "lr_at",
    "layer_id",
    "param_groups",
    "set_lr",
    "Precision",
    "resolve_precision",
    "make_augmentation",
    "BatchAugmenter",
    "early_stop_round",
    "model_depth",
    "set_grad_checkpointing",
    "optimizer_state",
    "load_optimizer_state",
]

#: CineMA's training augmentation (``transform:`` of its classification configs); the
#: translation is in mm (60 voxels at CineMA's 1 mm in-plane spacing).
CINEMA_AUGMENTATION: dict[str, Any] = {
    "prob": 0.5,
    "gamma": (0.5, 1.5),
    "noise_std": 0.1,  # MONAI RandGaussianNoise's default, which CineMA keeps
    "rotate_deg": 180.0,  # in-plane, about the slice axis
    "scale_range": 0.2,
    "translate_mm": 60.0,  # in-plane
}


# --------------------------------------------------------------------- learning rate
def lr_at(progress: float, base_lr: float, cfg: TrainConfig) -> float:
    """The learning rate at ``progress`` in [0, 1] of the whole training.

    ``train.schedule="constant"``: ``base_lr``. ``"warmup_cosine"``: CineMA's
    ``adjust_learning_rate`` (MAE's ``lr_sched``) with progress in place of epochs:
    ``base_lr · p / w`` during the warm-up ``p < w = train.warmup_fraction``, then
    ``min_lr + (base_lr - min_lr) · ½ (1 + cos(π (p - w) / (1 - w)))``.
    """
    if cfg.schedule == "constant":
        return float(base_lr)
    p = min(max(float(progress), 0.0), 1.0)
    w = float(cfg.warmup_fraction)
    if w > 0 and p < w:
        return float(base_lr) * p / w
    t = (p - w) / (1.0 - w) if w < 1 else 1.0
    lo = min(float(cfg.min_lr), float(base_lr))
    return lo + (float(base_lr) - lo) * 0.5 * (1.0 + math.cos(math.pi * t))


_BLOCK = re.compile(r"(?:^|\.)encoder\.blocks\.(\d+)\.")
_EMBED = ("cls_token", "pos_embed", "patch_embed", "view_embed")


def layer_id(name: str, depth: int) -> int:
    """CineMA's ``get_layer_id_for_vit`` for a parameter name (PEFT prefixes allowed).

    0: the conv stem (``enc_*``) and the embeddings; ``i + 1``: anything in
    ``encoder.blocks.i`` (LoRA factors included); ``depth + 1``: the rest (final norm,
    fusion norm, heads).
    """
    bare = re.sub(r"^(base_model\.model\.)+", "", name)
    if bare.startswith("enc_") or any(x in bare for x in _EMBED):
        return 0
    m = _BLOCK.search(bare)
    if m:
        return int(m.group(1)) + 1
    return depth + 1


def param_groups(
    named: Sequence[tuple[str, nn.Parameter]], cfg: TrainConfig, depth: int
) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on matrices only, and each group's
    ``lr_scale`` from ``train.layer_decay`` (1 = every scale 1, one group per decay).

    Groups keep the order of ``named`` (first appearance), so with ``layer_decay=1``
    they are exactly the two groups (decay, no decay) of before.
    """
    groups: dict[tuple[bool, float], dict[str, Any]] = {}
    n_layers = depth + 1
    for name, p in named:
        if not p.requires_grad:
            continue
        decay = p.ndim > 1
        scale = 1.0
        if cfg.layer_decay != 1.0:
            scale = float(cfg.layer_decay) ** (n_layers - layer_id(name, depth))
        key = (decay, scale)
        if key not in groups:
            groups[key] = {
                "params": [],
                "names": [],
                "weight_decay": cfg.weight_decay if decay else 0.0,
                "lr_scale": scale,
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    # decayed groups first, as before (AdamW sees the same group order)
    return [g for k, g in groups.items() if k[0]] + [
        g for k, g in groups.items() if not k[0]
    ]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's rate to ``lr × lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = float(lr) * float(group.get("lr_scale", 1.0))


# --------------------------------------------------------------------- precision
@dataclass
class Precision:
    """How a step runs: autocast dtype (None = fp32) and a GradScaler for fp16."""

    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    device_type: str = "cpu"
    note: str = ""

    def autocast(self) -> Any:
        """The autocast context of a forward pass (a no-op in fp32)."""
        return torch.autocast(
            self.device_type, dtype=self.dtype, enabled=self.dtype is not None
        )

    def describe(self) -> str:
        if self.dtype is None:
            return "fp32"
        return {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[
            self.dtype
        ] + (" + GradScaler" if self.scaler is not None else "")


_NOTED: set[str] = set()


def resolve_precision(amp: str, device: torch.device | str) -> Precision:
    """The :class:`Precision` of ``train.amp`` on ``device``.

    On CUDA: ``auto`` = bf16 where the GPU supports it, otherwise fp16 with a
    GradScaler; ``bf16`` / ``fp16`` as asked (bf16 on a GPU without it falls back to
    fp16 + GradScaler, with a warning). On a CPU (or another device) ``auto`` is fp32;
    an explicit ``bf16`` / ``fp16`` falls back to fp32 with a warning that says so.
    """
    device = torch.device(device)
    if amp == "off":
        return Precision(device_type=device.type)
    if device.type != "cuda":
        if amp in ("bf16", "fp16"):
            note = (
                f"train.amp={amp!r}: mixed precision needs a CUDA device and this run "
                f"is on {device.type!r}; training in fp32 instead (train.amp='auto' "
                "chooses this without a warning)"
            )
            if note not in _NOTED:
                _NOTED.add(note)
                warnings.warn(note, RuntimeWarning, stacklevel=2)
            return Precision(device_type=device.type, note=note)
        return Precision(device_type=device.type)
    bf16_ok = torch.cuda.is_bf16_supported()
    if amp == "fp16" or (amp in ("auto", "bf16") and not bf16_ok):
        note = ""
        if amp == "bf16":
            note = "train.amp='bf16': this GPU has no bf16; using fp16 + GradScaler"
            warnings.warn(note, RuntimeWarning, stacklevel=2)
        return Precision(torch.float16, torch.amp.GradScaler("cuda"), "cuda", note=note)
    return Precision(torch.bfloat16, None, "cuda")


# --------------------------------------------------------------------- augmentation
def make_augmentation(spacing: Sequence[float] = (1.0, 1.0, 10.0)) -> Any:
    """CineMA's training augmentation (MONAI) for ``(2, H, W, D)`` images.

    Order and ranges as in ``cinema/classification/dataset.get_image_transforms``:
    ``RandAdjustContrast`` (γ in [0.5, 1.5]), ``RandGaussianNoise`` (σ 0.1),
    ``ScaleIntensity`` (min-max to [0, 1] over both frames), ``RandAffine`` (rotation
    about the slice axis up to ±180°, scale ±0.2, in-plane translation up to 60 mm,
    converted to voxels with ``spacing``; bilinear, zero padding), each random part with
    probability 0.5. Deterministic after ``set_random_state``.
    """
    from monai.transforms import (
        Compose,
        RandAdjustContrast,
        RandAffine,
        RandGaussianNoise,
        ScaleIntensity,
    )

    a = CINEMA_AUGMENTATION
    sx, sy = float(spacing[0]), float(spacing[1])
    return Compose(
        [
            RandAdjustContrast(prob=a["prob"], gamma=a["gamma"]),
            RandGaussianNoise(prob=a["prob"], mean=0.0, std=a["noise_std"]),
            ScaleIntensity(),
            RandAffine(
                prob=a["prob"],
                rotate_range=(0.0, 0.0, a["rotate_deg"] / 180.0 * np.pi),
                scale_range=a["scale_range"],
                translate_range=(a["translate_mm"] / sx, a["translate_mm"] / sy, 0.0),
                mode="bilinear",
                padding_mode="zeros",
            ),
        ]
    )


class BatchAugmenter:
    """Applies :func:`make_augmentation` to each image of a ``{"image": (B,2,H,W,D)}``
    batch on the CPU (before it moves to the device); reseeded every round."""

    def __init__(self, spacing: Sequence[float]) -> None:
        self.transform = make_augmentation(spacing)

    def seed(self, seed: int) -> None:
        self.transform.set_random_state(seed=int(seed) % (2**32))

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = []
        for img in batch["image"].cpu():
            t = self.transform(img)
            t = t.as_tensor() if hasattr(t, "as_tensor") else t  # not a MetaTensor
            out.append(torch.as_tensor(t, dtype=torch.float32))
        return {**batch, "image": torch.stack(out)}


# --------------------------------------------------------------------- early stopping
def early_stop_round(
    rows: Iterable[dict[str, Any]],
    metric: str,
    patience: int,
    min_delta: float = 1e-4,
) -> int | None:
    """The round after which the federation stops early, or None.

    The monitored value of a round is the mean over its sites of ``val_<metric>`` (the
    deployed model). A round improves when it beats the best so far by at least
    ``min_delta`` (CineMA's ``EarlyStopping``); after ``patience`` evaluated rounds in a
    row without improvement, the last of them is returned. ``patience <= 0``: never.
    """
    if patience <= 0:
        return None
    col = f"val_{metric}"
    per: dict[int, list[float]] = {}
    for r in rows:
        if col in r and r[col] is not None:
            per.setdefault(int(r["round"]), []).append(float(r[col]))
    best, waited = -math.inf, 0
    for rnd in sorted(per):
        vals = [v for v in per[rnd] if v == v]
        score = float(np.mean(vals)) if vals else -math.inf
        if score >= best + min_delta:
            best, waited = score, 0
        else:
            waited += 1
            if waited >= patience:
                return rnd
    return None


# --------------------------------------------------------------------- memory
def model_depth(model: nn.Module) -> int | None:
    """The number of ViT blocks of the ConvViT inside ``model`` (None: there is none)."""
    from medlora_lib.models.convvit import ConvViT

    for m in model.modules():
        if isinstance(m, ConvViT):
            return m.depth
    return None


def set_grad_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Switch gradient checkpointing of the ConvViT inside ``model`` (PEFT-wrapped or
    not); returns how many ConvViT modules were switched."""
    from medlora_lib.models.convvit import ConvViT

    n = 0
    for m in model.modules():
        if isinstance(m, ConvViT):
            m.grad_checkpointing = bool(enabled)
            n += 1
    return n


# --------------------------------------------------------------------- optimiser state
_SEP = "::"


def optimizer_state(
    optimizer: torch.optim.Optimizer,
    named: Sequence[tuple[str, nn.Parameter]],
    keep: Iterable[str],
) -> dict[str, torch.Tensor]:
    """AdamW's state of the parameters named in ``keep``, as flat CPU tensors
    (``<name>::exp_avg``, ``<name>::exp_avg_sq``, ``<name>::step``) for safetensors."""
    keep = set(keep)
    out: dict[str, torch.Tensor] = {}
    for name, p in named:
        st = optimizer.state.get(p)
        if name not in keep or not st:
            continue
        for k, v in st.items():
            t = torch.as_tensor(v).detach().to("cpu", copy=True)
            out[f"{name}{_SEP}{k}"] = t.reshape(t.shape or (1,)).float()
    return out


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    named: Sequence[tuple[str, nn.Parameter]],
    flat: dict[str, torch.Tensor] | None,
) -> int:
    """Put a saved :func:`optimizer_state` back; returns the parameters restored.

    A parameter whose saved moments do not match its shape is left fresh (it cannot
    happen for the same experiment, whose state is keyed by run).
    """
    if not flat:
        return 0
    n = 0
    for name, p in named:
        avg, sq, step = (flat.get(f"{name}{_SEP}{k}") for k in _ADAM_KEYS)
        if avg is None or sq is None or step is None or avg.shape != p.shape:
            continue
        optimizer.state[p] = {
            "step": torch.tensor(float(step.reshape(-1)[0])),
            "exp_avg": avg.to(p.device, p.dtype).clone(),
            "exp_avg_sq": sq.to(p.device, p.dtype).clone(),
        }
        n += 1
    return n


_ADAM_KEYS = ("exp_avg", "exp_avg_sq", "step")
