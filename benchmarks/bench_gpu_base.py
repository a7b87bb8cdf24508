"""GPU check: one training step of CineMA-base with LoRA on the last two blocks.

bf16 autocast, batch 8, input (2, 192, 192, 16), Med-DualLoRA adapters (rank 8, targets
q/kv/proj, last two blocks), heads trainable. Prints step time (median of repeats,
after warm-up), peak GPU memory, and the same with the frozen-prefix cache.
Random weights are used (the real ones change nothing about time or memory).

    python benchmarks/bench_gpu_base.py            # needs a CUDA device

Without a GPU it says so and exits 0 (nothing to measure). Recorded in the book:
notebooks/00_foundation_model_and_lora (section 6).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from medlora_lib.adapters import AdapterConfig, apply_adapters, first_adapted_block
from medlora_lib.models import build_convvit


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (run this on a GPU machine)")
        return 0
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    model = build_convvit("base", image_size=(192, 192, 16))
    acfg = AdapterConfig(method="med_dual_lora", lora_rank=8, adapted_blocks="last2")
    model = apply_adapters(model, acfg, seed=0).to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    x = torch.rand(args.batch_size, 2, 192, 192, 16, device=dev)
    y = torch.randint(0, 2, (args.batch_size,), device=dev)
    start = first_adapted_block(acfg, model)

    def timed(step) -> tuple[float, float]:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), torch.cuda.max_memory_allocated() / 2**20

    def full_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        state = model.forward_prefix(x, start)

    def cached_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(
                model.forward_suffix(state, start), y
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    t_full, m_full = timed(full_step)
    t_cached, m_cached = timed(cached_step)
    out = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "full_step_s": round(t_full, 4),
        "full_peak_mib": round(m_full),
        "cached_step_s": round(t_cached, 4),
        "cached_peak_mib": round(m_cached),
        "trainable_params": sum(p.numel() for p in params),
    }
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
