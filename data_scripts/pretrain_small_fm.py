"""Pretrain the embedded small foundation model by masked autoencoding (MAE).

The stand-in for CineMA that every chapter uses by default: the small ConvViT, trained
the way CineMA was (single cine frames, 75 % of the patch tokens masked, a light
decoder, MSE on the masked patches only) on a large **unlabelled** pool of synthetic
multi-vendor short-axis volumes. The pool comes from its own seed stream, disjoint from
every subject used for fine-tuning (:func:`medlora_lib.data.synthetic.pretraining_pool`).

Writes ``medlora_lib/assets/small_fm.safetensors`` (encoder + decoder, CineMA's key names,
loadable by ``load_pretrained(model, "small")``) and ``small_fm_card.json`` (the model
card: data, steps, time, loss curve, command, versions).

Reproduce the shipped weights (the defaults below are the ones it was made with; about
15 minutes on 2 CPU cores: 2 min to draw the pool, 13 min for the 2,000 steps):

    python data_scripts/pretrain_small_fm.py

Chapter: notebooks/00_foundation_model_and_lora.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from medlora_lib.data.synthetic import SynthConfig, pretraining_pool
from medlora_lib.models import build_mae, save_mae
from medlora_lib.results import provenance, write_json

ASSETS = Path(__file__).resolve().parent.parent / "medlora_lib" / "assets"


def make_pool(n_subjects: int, seed: int, profile: str) -> torch.Tensor:
    """(2·n, 1, H, W, D): ED and ES of each pool subject as separate single frames."""
    cfg = SynthConfig.for_profile(profile, seed=seed)
    frames = []
    for img in pretraining_pool(n_subjects, cfg):
        frames.extend([img[0], img[1]])
    return torch.from_numpy(np.stack(frames)[:, None].astype(np.float32))


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 1 % of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def val_loss(model, data: torch.Tensor, seed: int, batch: int = 128) -> float:
    """Masked-patch MSE on held-out frames with fixed masks."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for i in range(0, len(data), batch):
        out = model(data[i : i + batch], generator=g)
        total += float(out.loss) * len(data[i : i + batch])
    model.train()
    return total / len(data)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=1200, help="unlabelled pool size")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", default="cpu", choices=["smoke", "cpu"])
    ap.add_argument("--out", type=Path, default=ASSETS / "small_fm.safetensors")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--depth",
        type=int,
        default=None,
        help="encoder blocks (default: the 'small' size's, CineMA's 12)",
    )
    args = ap.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pool = make_pool(args.subjects, args.seed, args.profile)
    t_data = time.perf_counter() - t0
    n_val = max(32, len(pool) // 20)
    perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(args.seed))
    val, train = pool[perm[:n_val]], pool[perm[n_val:]]
    print(
        f"pool: {len(pool)} frames ({args.subjects} subjects) in {t_data:.0f} s; "
        f"train {len(train)}, val {len(val)}",
        flush=True,
    )

    cfg = SynthConfig.for_profile(args.profile)
    overrides = {} if args.depth is None else {"depth": args.depth}
    model = build_mae("small", image_size=cfg.image_size, **overrides)
    model.train()
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    val_at_init = val_loss(model, val, seed=123)
    gen = torch.Generator().manual_seed(args.seed + 1)
    warmup = max(1, args.steps // 20)
    curve, val_curve = [], [(0, val_at_init)]
    t_train = time.perf_counter()
    running = None
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup)
        idx = torch.randint(len(train), (args.batch_size,), generator=gen)
        out = model(train[idx], generator=gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        loss = float(out.loss.detach())
        running = loss if running is None else 0.95 * running + 0.05 * loss
        if step % 10 == 0 or step == args.steps - 1:
            curve.append((step, loss))
        if (step + 1) % 250 == 0 or step == args.steps - 1:
            v = val_loss(model, val, seed=123)
            val_curve.append((step + 1, v))
            print(
                f"step {step + 1:5d}  train {running:.5f}  val {v:.5f}  "
                f"({time.perf_counter() - t_train:.0f} s)",
                flush=True,
            )
    train_seconds = time.perf_counter() - t_train
    model.eval()
    card = {
        "name": "medlora small foundation model (stand-in for CineMA)",
        "architecture": model.config.to_dict(),
        "objective": "masked autoencoding, mask ratio "
        f"{model.config.mask_ratio}, MSE on masked patches (unnormalised targets)",
        "data": {
            "source": "medlora_lib.data.synthetic.pretraining_pool (unlabelled, "
            "disjoint seed stream from every fine-tuning subject)",
            "subjects": args.subjects,
            "frames": len(pool),
            "train_frames": len(train),
            "val_frames": len(val),
            "profile": args.profile,
            "image_size": list(cfg.image_size),
            "spacing_mm": list(cfg.spacing),
            "heterogeneity": cfg.heterogeneity,
            "seed": args.seed,
        },
        "optimisation": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "optimizer": "AdamW betas (0.9, 0.95)",
            "lr": args.lr,
            "schedule": f"linear warm-up {warmup} steps, cosine to 1 %",
            "weight_decay": args.weight_decay,
            "grad_clip": 5.0,
        },
        "seconds": {"data": round(t_data, 1), "train": round(train_seconds, 1)},
        "val_loss_at_init": val_at_init,
        "val_loss_final": val_curve[-1][1],
        "loss_curve": {"step": [s for s, _ in curve], "loss": [v for _, v in curve]},
        "val_curve": {
            "step": [s for s, _ in val_curve],
            "loss": [v for _, v in val_curve],
        },
        "command": command,
        "provenance": provenance(),
    }
    save_mae(
        model,
        args.out,
        metadata={"card": "small_fm_card.json", "steps": args.steps, "seed": args.seed},
    )
    write_json(args.out.with_name(args.out.stem + "_card.json"), card)
    size_mb = args.out.stat().st_size / 1e6
    print(
        f"wrote {args.out} ({size_mb:.1f} MB); val loss {val_at_init:.4f} -> "
        f"{val_curve[-1][1]:.4f}; {train_seconds:.0f} s training"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
