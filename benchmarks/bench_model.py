"""Forward / forward+backward time and peak memory of the ConvViT on this CPU.

Chapter: notebooks/00_foundation_model_and_lora (what the model costs).

Usage::

    .venv/bin/python benchmarks/bench_model.py            # small b16 48^2x8, base b1 192^2x16
    .venv/bin/python benchmarks/bench_model.py --skip-base --repeats 5

Peak memory is the growth of the process's peak RSS (``ru_maxrss``) during the case,
so run the cases smallest first (as here); it includes weights, activations and
gradients. The frozen-prefix cache comparison lives in the adapters benchmark.
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time

import torch

from medlora_lib.models import build_convvit


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def bench(size: str, image: tuple[int, int, int], batch: int, repeats: int) -> dict:
    """Time eval forward (no grad) and train forward+backward; return one table row."""
    torch.manual_seed(0)
    rss0 = _rss_mib()
    model = build_convvit(size, image, in_frames=2, num_classes=2)
    x = torch.rand(batch, 2, *image)
    y = torch.randint(0, 2, (batch,))
    n_params = sum(p.numel() for p in model.parameters())

    model.eval()
    with torch.no_grad():
        if repeats > 1:
            model(x)  # warm-up
        t = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            t.append(time.perf_counter() - t0)
    fwd = min(t)
    model.train()
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    t = []
    for _ in range(repeats + (1 if repeats > 1 else 0)):  # first is warm-up
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss_fn(model(x), y).backward()
        t.append(time.perf_counter() - t0)
    fb = min(t[1:] if len(t) > 1 else t)
    return {
        "model": size,
        "input": f"{batch}x2x{'x'.join(map(str, image))}",
        "params (M)": f"{n_params / 1e6:.2f}",
        "tokens": model.config.n_patches + 1,
        "fwd (s/batch)": f"{fwd:.3f}",
        "fwd+bwd (s/batch)": f"{fb:.3f}",
        "peak RSS +MiB": f"{_rss_mib() - rss0:.0f}",
    }


def main(argv: list[str] | None = None) -> None:
    """Print the benchmark table (markdown)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (best kept)")
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads (0 = default)"
    )
    ap.add_argument("--skip-base", action="store_true", help="only the small model")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [("small", (48, 48, 8), 16)]
    if not args.skip_base:
        cases.append(("base", (192, 192, 16), 1))
    print(f"$ {' '.join([sys.executable.split('/')[-1], *sys.argv])}", flush=True)
    rows = []
    for s, img, b in cases:
        # base on CPU is slow (~minutes per fwd+bwd): one timed repeat is enough
        reps = args.repeats if s == "small" else 1
        rows.append(bench(s, img, b, reps))
        print(f"  done: {rows[-1]}", file=sys.stderr, flush=True)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, repeats {args.repeats} (best)"
    )
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
