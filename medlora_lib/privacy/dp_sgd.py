"""Sample-level DP-SGD at every site with Opacus (chapter ``notebooks/08_privacy``).

With ``privacy.dp_sgd`` each site trains its round with DP-SGD (Abadi et al. 2016)
instead of :func:`medlora_lib.train.train_one_epoch`, built from Opacus' own parts:

* **per-sample gradients** — :class:`opacus.GradSampleModule` hooks every module that
  owns a trainable tensor. Only the LoRA matrices (peft's ``lora_A`` / ``lora_B``, plain
  ``nn.Linear`` layers) and the heads train, and with the frozen-prefix cache the
  forward pass runs only the suffix blocks, so per-sample gradients are cheap. A
  trainable module without an Opacus grad sampler would use Opacus' functorch fallback
  (``GradSampleModule`` does that by itself); on the ConvViT + peft every trainable
  module is an ``nn.Linear`` or ``nn.LayerNorm``, which have exact samplers;
* **clipping and noise** — :class:`opacus.optimizers.DPOptimizer` around the project's
  AdamW: each sample's gradient is clipped to ``privacy.sgd_max_grad_norm`` (L2, over
  all trainable tensors together), the clipped gradients are summed, Gaussian noise of
  standard deviation ``σ · C`` is added, and the sum is divided by the expected batch
  size. ``train.grad_clip`` does not apply: per-sample clipping replaces it;
* **Poisson sampling** — :class:`opacus.utils.uniform_sampler.UniformWithReplacementSampler`:
  every step takes each of the site's ``n`` records with probability
  ``q = train.batch_size / n`` (batches of varying size, possibly empty), ``int(1/q)``
  steps an epoch — what the accountant's amplification by subsampling assumes;
* **accounting** — Opacus' :class:`~opacus.accountants.RDPAccountant` or
  :class:`~opacus.accountants.PRVAccountant` (``privacy.accountant``) steps once per
  optimiser step. Its history ``[(σ, q, steps), ...]`` is part of the site's private
  state: the ClientApp stores it in the round's ``round.json`` (:data:`META_KEY`) and
  restores it from the site's newest saved round, so ε keeps counting across rounds
  and across a SuperNode restart; it never enters a message — only the ε spent
  (``dp-epsilon``) does.

With ``privacy.target_epsilon > 0`` the noise multiplier is Opacus'
:func:`~opacus.accountants.utils.get_noise_multiplier` for the site's own ``q`` and
the steps of all ``fed.num_rounds`` × ``train.local_epochs`` epochs, so a site that
takes part in every round ends at (just below) the target.

Choices (the chapter discusses them):

* **class weighting** — ``train.class_weighting="balanced"`` becomes a fixed weight per
  sample, ``w[y_i]`` (inverse class frequency of the site's training labels, mean 1),
  on its cross-entropy; the loss is the *sum* of the weighted per-sample losses, so
  Opacus' per-sample gradient is exactly sample *i*'s and the clipping bounds it. (The
  non-private loss normalises by the batch's weights, which would couple the samples of
  a batch.) Like ``n`` in ``q``, the class counts are treated as public facts of the
  site. Label smoothing applies per sample, before the weight;
* **FedProx** — ``μ/2 ||w - w_t||²`` is not a per-sample loss. Its gradient
  ``μ (w - w_t)`` depends only on the current tensors (themselves outputs of earlier
  private steps) and the received global state, so it is added to the noised gradient
  after the DP step (post-processing: no privacy cost, nothing to clip);
* **randomness** — in the Simulation Runtime the batches and the noise are seeded from
  the round seed (reproducible results for the book); on a deployed SuperNode both
  come from fresh OS randomness: anyone who knew the seed could subtract the noise, and
  amplification by subsampling needs batches nobody else can predict.
"""

from __future__ import annotations

import contextlib
import functools
import json
import secrets
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from medlora_lib.errors import ConfigError

__all__ = [
    "META_KEY",
    "DPSGDRound",
    "sample_rate",
    "steps_per_epoch",
    "planned_steps",
    "noise_multiplier",
    "make_accountant",
    "accountant_epsilon",
    "check_dp_sgd",
    "saved_dp_state",
    "train_dp_sgd",
]

#: Key of the DP-SGD state in a round's ``round.json`` (the site's private state).
META_KEY = "dp_sgd"

Batch = dict[str, torch.Tensor]


@dataclass
class DPSGDRound:
    """What one round of DP-SGD did and what the site keeps of it.

    ``state`` is JSON (the accountant's mechanism and history plus this round's
    numbers): the ClientApp writes it with the round's private tensors.
    """

    losses: list[float]
    epsilon: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    state: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------ planning
def sample_rate(num_examples: int, batch_size: int) -> float:
    """Poisson sampling rate ``q = batch_size / n`` (1 when the batch holds them all)."""
    if num_examples <= 0:
        raise ConfigError(
            "config field `privacy.dp_sgd`: the site has no training records to sample"
        )
    return min(1.0, batch_size / num_examples)


def steps_per_epoch(q: float) -> int:
    """Steps per epoch at rate ``q``: ``int(1/q)``, as Opacus' sampler and data loader."""
    return max(1, int(1 / q))


def planned_steps(cfg: Any, q: float) -> int:
    """Optimiser steps of a site that takes part in all ``fed.num_rounds`` rounds."""
    return int(cfg.fed.num_rounds) * int(cfg.train.local_epochs) * steps_per_epoch(q)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide the accountants' numerical notes (PRV's log(0) at q = 1, RDP's 'optimal
    order is the largest / smallest alpha': a looser, still valid bound)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"opacus\.")
        yield


def make_accountant(kind: str, state: dict[str, Any] | None = None) -> Any:
    """An Opacus accountant (``rdp`` / ``prv``), continuing from a saved ``state``.

    Raises:
        ConfigError: the saved state belongs to another accountant.
    """
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=kind)
    if state:
        if state.get("accountant") != kind:
            raise ConfigError(
                f"config field `privacy.accountant`: the site's saved DP-SGD state was "
                f"kept by the {state.get('accountant')!r} accountant, this run asks for "
                f"{kind!r}; start a new run (or keep privacy.accountant)"
            )
        acc.load_state_dict(
            {
                "mechanism": acc.mechanism(),
                "history": [
                    (float(s), float(q), int(k)) for s, q, k in state["history"]
                ],
            }
        )
    return acc


def accountant_epsilon(acc: Any, delta: float) -> float:
    """ε spent by ``acc``'s history at ``delta`` (0 before the first step)."""
    if not acc.history:
        return 0.0
    with _quiet():
        return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=64)
def _target_sigma(
    target: float, delta: float, q: float, steps: int, kind: str
) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    with _quiet():
        return float(
            get_noise_multiplier(
                target_epsilon=target,
                target_delta=delta,
                sample_rate=q,
                steps=steps,
                accountant=kind,
            )
        )


def noise_multiplier(cfg: Any, q: float) -> float:
    """The DP-SGD noise multiplier σ of a site sampling at rate ``q``.

    ``privacy.sgd_noise_multiplier``, or — with ``privacy.target_epsilon > 0`` — the
    σ Opacus chooses so that :func:`planned_steps` steps spend the target.

    Raises:
        ConfigError: the target cannot be reached (names ``privacy.target_epsilon``
            and ``fed.num_rounds``, and the least ε this accountant can certify).
    """
    from opacus.accountants.utils import MAX_SIGMA

    p = cfg.privacy
    if p.target_epsilon <= 0:
        return float(p.sgd_noise_multiplier)
    steps = planned_steps(cfg, q)
    # The least ε the accountant certifies: at Opacus' largest σ the mechanism's own
    # loss is ~0 for any q, what is left is the conversion to (ε, δ). Computed without
    # subsampling (closed form; the subsampled RDP series converges slowly at huge σ)
    # so that an unreachable target is refused at once.
    floor = accountant_epsilon(
        make_accountant(
            p.accountant,
            {"accountant": p.accountant, "history": [(MAX_SIGMA, 1.0, steps)]},
        ),
        p.delta,
    )
    if p.target_epsilon > floor:
        try:
            return _target_sigma(
                float(p.target_epsilon), float(p.delta), float(q), steps, p.accountant
            )
        except ValueError:  # Opacus: "The privacy budget is too low."
            pass
    raise ConfigError(
        f"config field `privacy.target_epsilon`: {p.target_epsilon:g} cannot be "
        f"reached: over fed.num_rounds={cfg.fed.num_rounds} rounds x "
        f"train.local_epochs={cfg.train.local_epochs} ({steps} DP-SGD steps at "
        f"q={q:.3g}) even Opacus' largest noise multiplier ({MAX_SIGMA:g}) spends "
        f"ε≈{floor:.3g} at δ={p.delta:g} with the {p.accountant!r} accountant. Raise "
        f"privacy.target_epsilon above {floor:.3g}"
        + (
            ", or use privacy.accountant='prv' (tighter)"
            if p.accountant == "rdp"
            else ""
        )
        + ", or raise privacy.delta"
    )


def check_dp_sgd(cfg: Any) -> None:
    """Refuse a DP-SGD config that cannot give a guarantee, before the run starts.

    Each site checks its own sample rate again in its first round (it alone knows its
    ``n``); here the rate is taken as 1, where reachability is the same (the least ε an
    accountant certifies does not depend on ``q`` once σ is huge).

    Raises:
        ConfigError: no noise (``privacy.sgd_noise_multiplier = 0`` without a target),
            or an unreachable ``privacy.target_epsilon``.
    """
    p = cfg.privacy
    if not p.dp_sgd:
        return
    if p.target_epsilon <= 0 and p.sgd_noise_multiplier == 0:
        raise ConfigError(
            "config field `privacy.sgd_noise_multiplier`: 0 adds no noise, so DP-SGD "
            "would clip without any guarantee (ε = ∞); use a value > 0 (1.0 or more), "
            "a privacy.target_epsilon > 0, or privacy.dp_sgd=false"
        )
    noise_multiplier(cfg, 1.0)


# ------------------------------------------------------------------------ site state
def saved_dp_state(store: Any, run_key: str) -> dict[str, Any] | None:
    """The DP-SGD state of the site's newest saved round (``None``: none yet).

    The newest round, not the newest before the message's round: when a server that
    lost its last round sends that round again, the site's first answer was already
    released, so its steps stay counted (the private tensors restart from the round
    before, the ε does not).
    """
    rounds = store.rounds(run_key)
    if not rounds:
        return None
    path = store.run_dir(run_key) / f"round-{rounds[-1]:04d}" / "round.json"
    return json.loads(path.read_text()).get(META_KEY)


# ------------------------------------------------------------------------ training
def _generators(seed: int, fresh: bool, device: torch.device) -> tuple[Any, Any]:
    """Batch-sampling (CPU) and noise (on ``device``) generators: seeded from the round
    seed in simulation, from the OS's randomness on a deployed site."""
    if fresh:
        s_batch, s_noise = secrets.randbits(63), secrets.randbits(63)
    else:
        s_batch = seed
        s_noise = (seed * 0x9E3779B1 + 0x7F4A7C15) % (2**63)
    batch = torch.Generator().manual_seed(s_batch)
    noise = torch.Generator(device=device).manual_seed(s_noise)
    return batch, noise


def train_dp_sgd(
    forward: Callable[[Batch], torch.Tensor],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: Batch,
    labels: torch.Tensor,
    cfg: Any,
    *,
    seed: int,
    class_weight: torch.Tensor | None = None,
    state: dict[str, Any] | None = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    fresh_randomness: bool = False,
    device: torch.device | None = None,
    on_step: Callable[[float], None] | None = None,
    augment: Callable[[Batch], Batch] | None = None,
) -> DPSGDRound:
    """``train.local_epochs`` epochs of DP-SGD on the trainable tensors of ``model``.

    Args:
        forward: ``batch -> logits`` (the cached suffix or the full model).
        model: the site's model (its trainable tensors are the optimiser's).
        optimizer: the round's AdamW (learning rate already set).
        inputs, labels: the site's training data (sample axis first).
        cfg: the experiment (``privacy``, ``train``, ``fed``).
        seed: the round seed (batches and noise in simulation).
        class_weight: per-class weight (``train.class_weighting="balanced"``) or None.
        state: the saved DP-SGD state (:func:`saved_dp_state`); None: a fresh accountant.
        extra_loss: FedProx's proximal term; its gradient is added after the DP step.
        fresh_randomness: draw batches and noise from the OS (a deployed site).
        device: where the model is.
        on_step: called before every step with the fraction of the round done (the
            learning-rate schedule, ``train.schedule``).
        augment: transforms every CPU batch (``data.augment``; raw images only).

    Returns:
        A :class:`DPSGDRound`: per-epoch losses (weighted mean cross-entropy), ε spent
        so far at ``privacy.delta``, σ, q, this round's steps and the state to save.

    Raises:
        ConfigError: an unreachable ``privacy.target_epsilon``, or a trainable module
            Opacus cannot compute per-sample gradients for.
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    device = device or torch.device("cpu")
    p = cfg.privacy
    n = int(labels.shape[0])
    q = sample_rate(n, cfg.train.batch_size)
    sigma = noise_multiplier(cfg, q)
    acc = make_accountant(p.accountant, state)
    params = [t for t in model.parameters() if t.requires_grad]
    try:
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    except NotImplementedError as exc:
        raise ConfigError(
            f"config field `privacy.dp_sgd`: Opacus cannot compute per-sample gradients "
            f"of this model's trainable tensors ({exc}); train fewer parts (e.g. "
            "adapter.train_final_norms=false) or privacy.dp_sgd=false"
        ) from None
    batch_gen, noise_gen = _generators(seed, fresh_randomness, device)
    dp_opt = DPOptimizer(
        optimizer,
        noise_multiplier=sigma,
        max_grad_norm=float(p.sgd_max_grad_norm),
        expected_batch_size=max(1, round(q * n)),
        loss_reduction="mean",
        generator=noise_gen,
    )
    dp_opt.attach_step_hook(acc.get_optimizer_hook_fn(sample_rate=q))
    sampler = UniformWithReplacementSampler(
        num_samples=n, sample_rate=q, generator=batch_gen
    )
    weight = class_weight.to(device) if class_weight is not None else None
    losses: list[float] = []
    steps = 0
    try:
        with warnings.catch_warnings():
            # the first LoRA layer's input (frozen activations) needs no gradient:
            # the hook still gets the output gradients, which is all Opacus reads
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            epochs = cfg.train.local_epochs
            per_epoch = max(len(sampler), 1)
            for epoch in range(epochs):
                total, wsum = 0.0, 0.0
                for i, idx in enumerate(sampler):
                    if on_step is not None:
                        on_step((epoch + min(i / per_epoch, 1.0)) / epochs)
                    dp_opt.zero_grad(set_to_none=True)
                    if not idx:  # an empty Poisson batch: noise only, still a step
                        for t in params:
                            t.grad_sample = torch.zeros(
                                (0, *t.shape), device=t.device, dtype=t.dtype
                            )
                    else:
                        ix = torch.as_tensor(idx)
                        batch = {k: v[ix] for k, v in inputs.items()}
                        if augment is not None:
                            batch = augment(batch)
                        batch = {k: v.to(device) for k, v in batch.items()}
                        y = labels[ix].to(device)
                        per = nn.functional.cross_entropy(
                            forward(batch),
                            y,
                            reduction="none",
                            label_smoothing=cfg.train.label_smoothing,
                        )
                        w = weight[y] if weight is not None else torch.ones_like(per)
                        weighted = per * w
                        weighted.sum().backward()
                        total += float(weighted.detach().sum())
                        wsum += float(w.sum())
                    if dp_opt.pre_step():  # clip, sum, noise, / expected batch size
                        if extra_loss is not None:  # post-processing (module doc)
                            grads = torch.autograd.grad(
                                extra_loss(), params, allow_unused=True
                            )
                            for t, g in zip(params, grads, strict=True):
                                if g is not None:
                                    t.grad.add_(g)
                        optimizer.step()
                    steps += 1
                losses.append(total / wsum if wsum else float("nan"))
    finally:
        dp_opt.zero_grad(set_to_none=True)
        gsm._close()  # remove the hooks and Opacus' attributes: the model is as before
        for t in params:
            if hasattr(t, "summed_grad"):
                del t.summed_grad
    eps = accountant_epsilon(acc, p.delta)
    history = [[float(s), float(r), int(k)] for s, r, k in acc.history]
    return DPSGDRound(
        losses=losses,
        epsilon=eps,
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps,
        state={
            "accountant": p.accountant,
            "history": history,
            "epsilon": eps,
            "delta": p.delta,
            "noise_multiplier": sigma,
            "sample_rate": q,
            "steps": steps,
            "max_grad_norm": float(p.sgd_max_grad_norm),
        },
    )
