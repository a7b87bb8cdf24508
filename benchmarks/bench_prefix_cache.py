"""Benchmark: one training epoch with the full forward vs with the frozen-prefix cache.

Chapter ``notebooks/05_block_ablation``. At the ``cpu`` profile (small ConvViT, 48x48x8,
batch 16), with LoRA on the last 2 of 12 blocks (Med-DualLoRA), times one epoch of
forward + backward + AdamW over N subjects

* through the full model (``model(x)``), and
* through :class:`~medlora_lib.models.prefix_cache.CachedSuffixModel` on a prefix cache
  built once (the one-off build time and the cache's memory are reported separately).

Inputs are random volumes in [0, 1] of the model's input shape: the cost of a forward pass
does not depend on the values. Run::

    .venv/bin/python benchmarks/bench_prefix_cache.py            # cpu profile, ~10 s
    .venv/bin/python benchmarks/bench_prefix_cache.py --subjects 64 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import platform
import shlex
import statistics
import sys
import time

import torch
from torch import nn

from medlora_lib.adapters import AdapterConfig, apply_adapters
from medlora_lib.models import build_convvit
from medlora_lib.models.prefix_cache import (
    CachedSuffixModel,
    build_prefix_cache,
    first_adapted_block,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Path:
    """One training path: its forward, its optimiser and its per-step timings."""

    def __init__(self, forward, params, inputs, device: torch.device) -> None:
        self.forward, self.inputs, self.device = forward, inputs, device
        self.params = params
        # the same optimiser settings as medlora_lib.train.make_optimizer (foreach)
        self.opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05, foreach=True)
        self.times: list[float] = []

    def step(self, idx: torch.Tensor, labels: torch.Tensor, timed: bool = True) -> None:
        """forward + CE + backward + AdamW step on the subjects ``idx``."""
        _sync(self.device)
        t0 = time.perf_counter()
        logits = self.forward(self.inputs(idx))
        loss = nn.functional.cross_entropy(logits, labels[idx].to(self.device))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        _sync(self.device)
        if timed:
            self.times.append(time.perf_counter() - t0)


def _epoch(paths: list[_Path], labels, batch_size: int, seed: int) -> None:
    """One shuffled epoch for every path, steps interleaved (A, B, A, B, ...).

    Interleaving exposes both paths to the same background load on a shared machine, so
    their ratio stays meaningful even when absolute times drift.
    """
    n = labels.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    for path in paths:  # warm-up step (allocator, kernels), not timed
        path.step(order[:batch_size], labels, timed=False)
    for i in range(0, n, batch_size):
        for path in paths:
            path.step(order[i : i + batch_size], labels)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subjects", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, nargs=3, default=(48, 48, 8))
    p.add_argument("--size", default="small", choices=("small", "base"))
    p.add_argument("--depth", type=int, default=None, help="override the size's depth")
    p.add_argument("--adapted-blocks", default="last2")
    p.add_argument("--method", default="med_dual_lora")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    overrides = {} if args.depth is None else {"depth": args.depth}
    base = build_convvit(args.size, image_size=tuple(args.image_size), **overrides)
    depth = base.config.depth
    cfg = AdapterConfig(
        method=args.method, adapted_blocks=args.adapted_blocks, lora_rank=args.lora_rank
    )
    start = first_adapted_block(cfg, depth)
    model_full = apply_adapters(copy.deepcopy(base), cfg, seed=args.seed).to(device)
    model_cached = apply_adapters(copy.deepcopy(base), cfg, seed=args.seed).to(device)

    gen = torch.Generator().manual_seed(args.seed)
    images = torch.rand(args.subjects, 2, *args.image_size, generator=gen)
    labels = torch.randint(0, 2, (args.subjects,), generator=gen)

    cache = build_prefix_cache(
        model_cached, images, start, batch_size=32, storage_device=device
    )
    suffix = CachedSuffixModel(model_cached, start).train()
    model_full.train()
    full = _Path(
        model_full,
        [q for q in model_full.parameters() if q.requires_grad],
        lambda idx: images[idx].to(device),
        device,
    )
    cached = _Path(
        suffix,
        [q for q in model_cached.parameters() if q.requires_grad],
        lambda idx: cache.state(idx.to(cache.tokens.device)),
        device,
    )
    _epoch([full, cached], labels, args.batch_size, args.seed + 1)
    t_full, t_cached = sum(full.times), sum(cached.times)
    med_full, med_cached = (
        statistics.median(full.times),
        statistics.median(cached.times),
    )

    # exactness check (eval mode) on a few subjects with the trained cached model ----
    model_cached.eval()
    suffix.eval()
    with torch.no_grad():
        k = min(8, args.subjects)
        idx = torch.arange(k)
        diff = (
            (suffix(cache.state(idx)) - model_cached(images[:k].to(device))).abs().max()
        )

    n_batches = len(full.times)
    speedup = t_full / t_cached
    saved = t_full - t_cached
    breakeven = cache.build_seconds / saved if saved > 0 else float("inf")
    mib = cache.nbytes / 2**20

    cmd = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
    print(f"command : {cmd}")
    print(
        f"setup   : {args.size} ConvViT depth {depth}, image {tuple(args.image_size)}, "
        f"{args.subjects} subjects, batch {args.batch_size} ({n_batches} steps), "
        f"method {args.method}, adapted_blocks={args.adapted_blocks!r} -> start_block "
        f"{start}, rank {args.lora_rank}"
    )
    print(
        f"machine : {platform.machine()}, device {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; steps of both paths interleaved"
    )
    print()
    head = f"{'path':<14}{'build (s)':>10}{'epoch (s)':>11}{'median ms/step':>16}{'memory':>12}"
    print(head)
    print("-" * len(head))
    print(
        f"{'full forward':<14}{'-':>10}{t_full:>11.2f}{1e3 * med_full:>16.1f}{'-':>12}"
    )
    print(
        f"{'prefix cache':<14}{cache.build_seconds:>10.2f}{t_cached:>11.2f}"
        f"{1e3 * med_cached:>16.1f}{mib:>8.1f} MiB"
    )
    print()
    print(f"speed-up per epoch        : {speedup:.1f}x (target >= 3x)")
    print(f"speed-up, median step     : {med_full / med_cached:.1f}x")
    print(f"cache build pays off after: {breakeven:.2f} epoch(s)")
    print(f"max |logit diff| (eval)   : {float(diff):.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
