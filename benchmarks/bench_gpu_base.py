"""What a paper-profile round costs: CineMA-base, 192×192×16, through the library's own path.

One site's round of the ``paper`` profile as the library runs it
(:meth:`medlora_lib.fl.task.ClientRuntime.train_round` then ``evaluate_round``): CineMA's
recipe (augmentation, so no frozen-prefix cache; warm-up + cosine; layer decay 0.75;
gradient checkpointing; kept optimiser moments; AMP ``auto`` = bf16 autocast on a GPU
with bf16, fp16 + GradScaler otherwise, fp32 on a CPU), Med-DualLoRA on the last two
blocks. Random weights (``model.pretrained=none``): time and memory do not depend on
them. In-memory random subjects stand in for a prepared site.

Printed side by side, each the median of ``--repeats`` rounds after one warm-up round:

* ``paper``: the profile as it is;
* ``no-ckpt``: the same without gradient checkpointing (what checkpointing buys / costs);
* ``cached``: without augmentation, so the frozen prefix is cached (the floor of a
  round: only the two adapted blocks and the heads run);

with seconds per optimiser step, per round, per training subject, peak memory (GPU:
``torch.cuda.max_memory_allocated``; CPU: the peak RSS of the variant's own process,
next to its RSS right after building the site's runtime), and the
extrapolation to one round of the paper protocol's largest site and to the whole
federation (``--paper-subjects`` training subjects over 4 sites, ``fed.num_rounds``).

    python benchmarks/bench_gpu_base.py                  # CUDA if present, else CPU
    python benchmarks/bench_gpu_base.py --device cpu --subjects 8 --repeats 1

Recorded in ``book/gpu_colab.md`` (§ "What a round costs"); GPU figures only once
measured on a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def _peak_rss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20


def _site(n: int, size: tuple[int, int, int], seed: int = 0):
    from medlora_lib.pipeline import ClientData

    g = torch.Generator().manual_seed(seed)

    def split(k: int, tag: str):
        x = torch.rand(k, 2, *size, generator=g)
        y = torch.arange(k) % 2
        return (x, y), [f"{tag}{i:03d}" for i in range(k)]

    (tr, s_tr), (va, s_va) = split(n, "tr"), split(max(2, n // 4), "va")
    return ClientData("Siemens", {"train": tr, "val": va}, {"train": s_tr, "val": s_va})


def _variant(cfg, name: str):
    if name == "no-ckpt":
        return dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, grad_checkpointing=False)
        )
    if name == "cached":
        return dataclasses.replace(
            cfg, data=dataclasses.replace(cfg.data, augment=False)
        )
    return cfg


def measure(cfg, site, repeats: int) -> dict:
    """Median round of ``cfg`` on ``site`` (train + evaluate), its memory and steps."""
    from medlora_lib.adapters import get_shared_state
    from medlora_lib.fl.task import ClientRuntime, clear_runtime_cache

    clear_runtime_cache()
    cuda = torch.device(cfg.train.device).type == "cuda"
    rt = ClientRuntime.build(cfg, {"Siemens": site}, "Siemens", data_key="bench")
    built_mib = _peak_rss_mib()
    shared = get_shared_state(rt.model)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, evals, private, opt = [], [], None, None
    for rnd in range(1, repeats + 2):  # round 1 warms up
        t0 = time.perf_counter()
        out = rt.train_round(shared, private, rnd, optimizer_state=opt)
        if cuda:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        rt.evaluate_round(out.shared, out.private)
        if cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        shared, private, opt = out.shared, out.private, out.optimizer
        if rnd > 1:
            times.append(t1 - t0)
            evals.append(t2 - t1)
    n = site.num_examples()
    steps = (n + cfg.train.batch_size - 1) // cfg.train.batch_size
    train_s = statistics.median(times)
    return {
        "precision": rt.precision.describe(),
        "prefix_cache": rt.start_block is not None,
        "grad_checkpointing": cfg.train.grad_checkpointing,
        "train_s_per_round": round(train_s, 3),
        "eval_s_per_round": round(statistics.median(evals), 3),
        "s_per_step": round(train_s / steps, 4),
        "s_per_train_subject": round(train_s / n, 4),
        "peak_mib": round(
            torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mib()
        ),
        "peak_kind": "GPU allocated" if cuda else "host peak RSS",
        "host_peak_rss_mib": round(_peak_rss_mib()),
        "host_rss_after_build_mib": round(built_mib),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--subjects", type=int, default=None, help="training subjects")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--variants", nargs="*", default=["paper", "no-ckpt", "cached"])
    ap.add_argument(
        "--paper-subjects",
        type=int,
        default=0,
        help="training subjects of the paper protocol's federation, for the "
        "extrapolation (0: print none)",
    )
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process
    args = ap.parse_args()
    from medlora_lib.config import get_config

    cuda = args.device == "cuda" or (
        args.device == "auto" and torch.cuda.is_available()
    )
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu, or on a GPU machine")
        return 1
    device = "cuda" if cuda else "cpu"
    subjects = args.subjects or (32 if cuda else 8)
    repeats = args.repeats or (3 if cuda else 1)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg = get_config(
        "paper",
        method="med_dual_lora",
        overrides={"model.pretrained": "none", "train.device": device},
    )
    if args.one:  # one variant in a fresh process: its own peak memory
        site = _site(subjects, tuple(cfg.data.image_size))
        print("RESULT " + json.dumps(measure(_variant(cfg, args.one), site, repeats)))
        return 0
    rows = {}
    for name in args.variants:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            name,
            "--device",
            device,
            "--subjects",
            str(subjects),
            "--repeats",
            str(repeats),
        ]
        run = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
        if run.returncode or not lines:
            print(run.stdout[-2000:], run.stderr[-4000:], file=sys.stderr)
            return 1
        rows[name] = json.loads(lines[-1][len("RESULT ") :])
        print(f"{name:>8s}: {json.dumps(rows[name])}", flush=True)
    out = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": cfg.train.batch_size,
        "train_subjects": subjects,
        "variants": rows,
    }
    if "paper" in rows and "no-ckpt" in rows:
        a, b = rows["paper"], rows["no-ckpt"]
        out["ckpt_time_ratio"] = round(a["s_per_step"] / b["s_per_step"], 3)
        out["ckpt_memory_ratio"] = round(a["peak_mib"] / max(b["peak_mib"], 1), 3)
    if "paper" in rows and "cached" in rows:
        out["paper_over_cached"] = round(
            rows["paper"]["s_per_step"] / rows["cached"]["s_per_step"], 2
        )
    if args.paper_subjects and "paper" in rows:
        per = rows["paper"]["s_per_train_subject"]
        out["paper_protocol"] = {
            "train_subjects": args.paper_subjects,
            "rounds": cfg.fed.num_rounds,
            "train_hours": round(
                per * args.paper_subjects * cfg.fed.num_rounds / 3600, 2
            ),
            "note": "sites train one after another on one device; evaluation extra",
        }
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
