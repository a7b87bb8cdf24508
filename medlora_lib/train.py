"""Local training and evaluation loops, shared by every method and every chapter.

Inputs are a dictionary of tensors with the sample axis first: ``{"image": (N,2,H,W,D)}``
for the full model, or the frozen-prefix cache (``{"tokens": ..., "fusion_skip": ...}``)
for the cached suffix. ``forward(batch) -> logits`` hides which one it is, so the loops
are the same for the full forward pass and the cached one.

Every method gets the same optimiser (AdamW on the trainable parameters, no weight decay
on 1-D parameters), the same class weighting (inverse frequency of the client's training
labels), the same label smoothing and gradient clipping, and the same model selection
(best validation metric, decided before the test split is touched).

Explained in the book: notebook 02 (single-site baseline).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from medlora_lib.config import TrainConfig
from medlora_lib.metrics import binary_metrics

__all__ = [
    "Batch",
    "FitResult",
    "resolve_device",
    "seed_everything",
    "class_weights",
    "make_optimizer",
    "iterate_batches",
    "train_one_epoch",
    "predict_proba",
    "evaluate",
    "fit",
]

Batch = dict[str, torch.Tensor]
Forward = Callable[[Batch], torch.Tensor]


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch and numpy; return a CPU generator for shuffling."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    return torch.Generator().manual_seed(seed)


def class_weights(
    labels: torch.Tensor | np.ndarray, num_classes: int = 2
) -> torch.Tensor:
    """Inverse-frequency class weights ``n / (k · n_c)``; absent classes get weight 1."""
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    counts = torch.bincount(y, minlength=num_classes).float()
    w = torch.ones(num_classes)
    present = counts > 0
    w[present] = y.numel() / (int(present.sum()) * counts[present])
    return w


def make_optimizer(
    params: list[nn.Parameter] | list[tuple[str, nn.Parameter]],
    cfg: TrainConfig,
    depth: int | None = None,
) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (biases, norms and 1-D tensors: none).

    With named parameters and the model's ``depth``, ``train.layer_decay`` < 1 gives
    every group CineMA's layer-wise ``lr_scale`` (:func:`medlora_lib.recipe.param_groups`);
    each group's rate is ``train.lr × lr_scale``.
    """
    from medlora_lib.recipe import param_groups

    named = params and isinstance(params[0], tuple)
    if named:
        pairs = list(params)  # type: ignore[arg-type]
    else:
        pairs = [(str(i), p) for i, p in enumerate(params)]  # type: ignore[arg-type]
    if cfg.layer_decay != 1.0 and not (named and depth is not None):
        raise ValueError("layer_decay needs named parameters and the model depth")
    groups = param_groups(pairs, cfg, depth or 0)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    # foreach=True: one fused update over all adapter tensors. With LoRA there are many
    # small tensors, and the per-tensor loop of the default CPU path costs more than the
    # forward pass of the adapted blocks (measured: 1.7x per epoch on the cached path).
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        foreach=True,
    )


def iterate_batches(
    inputs: Batch,
    labels: torch.Tensor | None,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[Batch, torch.Tensor | None]]:
    """Mini-batches of a dictionary of tensors (same sample order for every key)."""
    n = next(iter(inputs.values())).shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        batch = {k: v[idx] for k, v in inputs.items()}
        yield batch, (labels[idx] if labels is not None else None)


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_one_epoch(
    forward: Forward,
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    inputs: Batch,
    labels: torch.Tensor,
    loss_fn: nn.Module,
    cfg: TrainConfig,
    generator: torch.Generator,
    device: torch.device | None = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    *,
    on_step: Callable[[int, int], None] | None = None,
    augment: Callable[[Batch], Batch] | None = None,
    precision: Any = None,
) -> float:
    """One pass over the data; returns the mean training loss.

    ``extra_loss`` (e.g. FedProx's proximal term) is added to every step's loss.
    ``on_step(i, n)`` runs before step ``i`` of the ``n`` of the epoch (the learning-rate
    schedule); ``augment`` transforms each CPU batch before it moves to ``device``;
    ``precision`` (:class:`medlora_lib.recipe.Precision`) runs the forward pass under
    autocast and, for fp16, scales the loss (gradients are unscaled before clipping).
    """
    device = device or torch.device("cpu")
    n = labels.shape[0]
    steps = (n + cfg.batch_size - 1) // cfg.batch_size
    scaler = getattr(precision, "scaler", None)
    total, count = 0.0, 0
    for i, (batch, y) in enumerate(
        iterate_batches(inputs, labels, cfg.batch_size, True, generator)
    ):
        if on_step is not None:
            on_step(i, steps)
        if augment is not None:
            batch = augment(batch)
        batch, y = _to(batch, device), y.to(device)
        if precision is not None:
            with precision.autocast():
                logits = forward(batch)
            loss = loss_fn(logits.float(), y)
        else:
            logits = forward(batch)
            loss = loss_fn(logits, y)
        if extra_loss is not None:
            loss = loss + extra_loss()
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        total += float(loss.detach()) * y.shape[0]
        count += y.shape[0]
    return total / max(count, 1)


@torch.no_grad()
def predict_proba(
    forward: Forward,
    inputs: Batch,
    batch_size: int = 64,
    device: torch.device | None = None,
    precision: Any = None,
) -> np.ndarray:
    """Probability of the positive class (disease) for every sample (under
    ``precision``'s autocast when given)."""
    device = device or torch.device("cpu")
    out = []
    for batch, _ in iterate_batches(inputs, None, batch_size):
        if precision is not None:
            with precision.autocast():
                logits = forward(_to(batch, device))
        else:
            logits = forward(_to(batch, device))
        out.append(torch.softmax(logits.float(), dim=-1)[:, 1].cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def evaluate(
    forward: Forward,
    inputs: Batch,
    labels: torch.Tensor | np.ndarray,
    batch_size: int = 64,
    device: torch.device | None = None,
    precision: Any = None,
) -> dict[str, Any]:
    """:func:`medlora_lib.metrics.binary_metrics` of the model on ``inputs``."""
    prob = predict_proba(forward, inputs, batch_size, device, precision)
    return binary_metrics(np.asarray(labels), prob)


@dataclass
class FitResult:
    """History of a :func:`fit` call and the selected epoch."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = -1
    best_score: float = float("-inf")


def fit(
    forward: Forward,
    module: nn.Module,
    train: tuple[Batch, torch.Tensor],
    val: tuple[Batch, torch.Tensor] | None,
    cfg: TrainConfig,
    epochs: int,
    seed: int = 0,
    device: torch.device | None = None,
    select: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    augment: Callable[[Batch], Batch] | None = None,
) -> FitResult:
    """Train the trainable parameters of ``module`` for ``epochs`` epochs.

    With ``select`` the trainable parameters of the epoch with the best validation
    ``cfg.selection_metric`` are restored at the end (ties keep the earlier epoch).
    CineMA's recipe applies as configured (:mod:`medlora_lib.recipe`): the learning-rate
    schedule over the ``epochs``, layer-wise decay, mixed precision, and early stopping
    after ``train.patience`` epochs without a validation gain; ``augment`` transforms
    every training batch (raw images only).
    """
    from medlora_lib.recipe import (
        early_stop_round,
        lr_at,
        model_depth,
        resolve_precision,
        set_lr,
    )

    device = device or torch.device("cpu")
    gen = torch.Generator().manual_seed(seed)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer = make_optimizer(named, cfg, model_depth(module))
    precision = resolve_precision(cfg.amp, device)
    weight = class_weights(train[1]) if cfg.class_weighting == "balanced" else None
    loss_fn = nn.CrossEntropyLoss(
        weight=weight.to(device) if weight is not None else None,
        label_smoothing=cfg.label_smoothing,
    )
    result = FitResult()
    trainable = {n for n, _ in named}
    best_state: dict[str, torch.Tensor] | None = None
    for epoch in range(1, epochs + 1):
        module.train()

        def on_step(i: int, n: int, epoch: int = epoch) -> None:
            set_lr(optimizer, lr_at((epoch - 1 + i / n) / epochs, cfg.lr, cfg))

        loss = train_one_epoch(
            forward,
            params,
            optimizer,
            train[0],
            train[1],
            loss_fn,
            cfg,
            gen,
            device,
            on_step=on_step if cfg.schedule != "constant" else None,
            augment=augment,
            precision=precision,
        )
        module.eval()
        row: dict[str, Any] = {"epoch": epoch, "train_loss": loss}
        if val is not None:
            m = evaluate(forward, val[0], val[1], device=device, precision=precision)
            row.update({f"val_{k}": v for k, v in m.items() if k != "notes"})
            score = m[cfg.selection_metric]
            score = float("-inf") if score != score else score  # NaN never wins
            if select and score > result.best_score:
                result.best_score, result.best_epoch = score, epoch
                best_state = {
                    n: p.detach().clone()
                    for n, p in module.named_parameters()
                    if n in trainable
                }
        result.history.append(row)
        if on_epoch:
            on_epoch(row)
        if val is not None and early_stop_round(
            [{"round": r["epoch"], **r} for r in result.history],
            cfg.selection_metric,
            cfg.patience,
            cfg.min_delta,
        ):
            break
    if select and best_state is not None:
        with torch.no_grad():
            for n, p in module.named_parameters():
                if n in best_state:
                    p.copy_(best_state[n])
    else:
        result.best_epoch = len(result.history)
    module.eval()
    return result
