"""Peak host RAM of a reduced ``paper`` run on CPU, and its extrapolation to the paper.

Chapter: book/gpu_colab.md ("Memory"). Everything runs through the library's real path:
a synthetic prepared folder at 192 x 192 x 16 (the paper profile's preprocessing), a
CineMA-format checkpoint file of the real size (an MAE of CineMA-base written here with
seeded random values; no download), and

1. **one site in a fresh process** (what a ClientApp process does for the site it
   serves: ``load_site`` + ``ClientRuntime.build`` + one ``train_round`` +
   ``evaluate_round``), once as the paper profile says and once with the frozen-prefix
   cache switched the other way. Printed next to the baselines of the same process
   (after ``import torch`` + the library, after building CineMA-base with its weights)
   and the array bytes, with the peak (``ru_maxrss``) of each step;
2. **the whole federation** (``simulate``, Flower's Simulation Runtime, 1 round): the
   peak of the summed RSS of this process and every process it starts (psutil,
   sampled every 0.2 s), and the largest single process;
3. the per-component sizes (exact bytes) and the **extrapolation** to the paper's
   protocol (ACDC + M&Ms + M&Ms-2 on one GPU) against the 12 GB target.

    .venv/bin/python benchmarks/bench_memory.py                 # 2 sites x 4 subjects
    .venv/bin/python benchmarks/bench_memory.py --per-site 6 --skip-federation

CPU-measured: on a GPU the model, activations and optimiser state move to GPU memory;
host RAM keeps the arrays (and the prefix cache), the process baselines (plus the CUDA
runtime's host share, not measured here) and the transient copy made while loading the
checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GB = 1e9  # decimal units throughout (Colab's 12.7 GB is decimal too)
MB = 1e6
TARGET_GB = 12.0
#: subjects of the paper protocol's data (../shared/reference/datasets.md): ACDC 150,
#: M&Ms-1 open 345 (Siemens 95, Philips 125, GE 75, Canon 50), M&Ms-2 360 (Siemens,
#: Philips, GE; its per-vendor split is not in the reference, see the extrapolation)
PAPER = {"ACDC": 150, "M&Ms": 345, "M&Ms-2": 360}
SIEMENS_KNOWN = 150 + 95  # ACDC + M&Ms vendor A, before M&Ms-2's Siemens share


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _config(data: Path, weights: Path, overrides: list[str]):
    from medlora_lib.config import get_config

    return get_config(
        "paper",
        overrides=[
            f'data.data_dir="{data}"',
            f'model.pretrained="{weights}"',
            "fed.num_rounds=1",
            "train.device=cpu",
            *overrides,
        ],
        method="med_dual_lora",
    )


def child(args: argparse.Namespace) -> None:
    """One site in this (fresh) process; print a JSON line of figures."""
    out = {"start": _rss()}
    import torch

    import medlora_lib  # noqa: F401
    from medlora_lib.fl.sites import load_options, load_site
    from medlora_lib.fl.task import ClientRuntime, build_adapted_model, held_bytes

    out["imported"] = _rss()
    cfg = _config(Path(args.data), Path(args.weights), args.set or [])
    model = build_adapted_model(cfg)
    out["model_built"] = _rss()
    out["model_built_peak"] = _maxrss()
    out["model_bytes"] = held_bytes(model)
    del model
    site = args.site
    data = load_site(args.data, site, **load_options(cfg))
    out["n_subjects"] = sum(int(x.shape[0]) for x, _ in data.splits.values())
    out["array_bytes"] = sum(held_bytes(x) for x, _ in data.splits.values())
    rt = ClientRuntime.build(cfg, {site: data}, site, str(args.data))
    del data
    out["prefix_cache"] = rt.start_block is not None
    from medlora_lib.adapters import unwrap_model as unwrap
    from medlora_lib.models.prefix_cache import estimate_prefix_cache_bytes

    out["prefix_bytes_per_subject"] = estimate_prefix_cache_bytes(
        unwrap(rt.model).config, 1
    )
    out["runtime_bytes"] = held_bytes(rt)
    out["built"] = _rss()
    out["built_peak"] = _maxrss()
    t0 = time.perf_counter()
    from medlora_lib.adapters import get_shared_state

    res = rt.train_round(get_shared_state(rt.model), None, 1)
    out["train_seconds"] = time.perf_counter() - t0
    out["n_train"] = res.num_examples
    out["trained_peak"] = _maxrss()
    rt.evaluate_round(res.shared, res.private)
    out["peak"] = _maxrss()
    out["trainable_params"] = sum(
        p.numel() for p in rt.model.parameters() if p.requires_grad
    )
    out["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(out), flush=True)


def _run_child(data: Path, weights: Path, site: str, overrides: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", "--data", str(data)]
    cmd += ["--weights", str(weights), "--site", site]
    if overrides:
        cmd += ["--set", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _make_inputs(work: Path, per_site: int, sites: list[str]) -> tuple[Path, Path]:
    """The prepared folder and a CineMA-base-size MAE checkpoint file."""
    import torch
    from safetensors.torch import save_file

    from medlora_lib.config import get_config
    from medlora_lib.data.synthetic import make_synthetic
    from medlora_lib.models.mae import build_mae
    from medlora_lib.pipeline import synthetic_config

    scfg = dataclasses.replace(
        synthetic_config(get_config("paper")),
        subjects_per_vendor=dict.fromkeys(sites, per_site),
    )
    data = make_synthetic(work / "data", scfg)
    torch.manual_seed(0)
    mae = build_mae("base", (192, 192, 16))
    weights = work / "cinema_format_mae.safetensors"
    save_file({k: v.contiguous() for k, v in mae.state_dict().items()}, str(weights))
    return data, weights


def _role(p, me) -> str:
    if p.pid == me.pid:
        return "driver (simulate)"
    text = " ".join(p.cmdline()[:3])
    if "ClientAppActor" in text or "ClientAppActor" in p.name():
        return "client process (Ray actor)"
    if "flwr-simulation" in text:
        return "server (flwr-simulation: ServerApp)"
    return "Flower / Ray infrastructure"


def federation_peak(data: Path, weights: Path, overrides: list[str]) -> dict:
    """Peak summed RSS of this process and its descendants during one simulate(),
    with the processes' roles at that moment, and each role's own peak."""
    import psutil

    from medlora_lib.fl import simulate

    cfg = _config(data, weights, overrides)
    me = psutil.Process()
    peak: dict = {"sum": 0, "at_peak": {}, "role_peak": {}}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            roles: dict[str, list[int]] = {}
            for p in [me, *me.children(recursive=True)]:
                try:
                    roles.setdefault(_role(p, me), []).append(p.memory_info().rss)
                except psutil.Error:
                    continue
            total = sum(sum(v) for v in roles.values())
            if total > peak["sum"]:
                peak.update(sum=total, at_peak={k: list(v) for k, v in roles.items()})
            for k, v in roles.items():
                peak["role_peak"][k] = max(peak["role_peak"].get(k, 0), max(v))
            time.sleep(0.2)

    base = me.memory_info().rss
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    simulate(cfg, verbose=False)
    seconds = time.perf_counter() - t0
    done.set()
    t.join()
    return {**peak, "driver_before": base, "seconds": seconds}


def _gb(b: float) -> str:
    return f"{b / GB:.2f} GB"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-site", type=int, default=4, help="subjects per site")
    ap.add_argument("--sites", default="Siemens,Philips", help="vendors (sites)")
    ap.add_argument("--skip-federation", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    ap.add_argument("--site", help=argparse.SUPPRESS)
    ap.add_argument("--set", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return
    print(f"$ {' '.join([Path(sys.executable).name, *sys.argv])}", flush=True)
    sites = [s for s in args.sites.split(",") if s]
    from medlora_lib.config import get_config

    paper = get_config("paper")
    profile_cache = paper.train.use_prefix_cache and not paper.data.augment
    other = [
        "data.augment=false",
        f"train.use_prefix_cache={str(not profile_cache).lower()}",
    ]
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        data, weights = _make_inputs(Path(tmp), args.per_site, sites)
        ckpt_bytes = weights.stat().st_size
        rows = {
            "paper profile": _run_child(data, weights, sites[0], []),
            f"prefix cache {'off' if profile_cache else 'on'}": _run_child(
                data, weights, sites[0], other
            ),
        }
        fed = None
        if not args.skip_federation:
            try:
                fed = federation_peak(data, weights, [])
            except ImportError:
                print("psutil is not installed: the federation peak is skipped")
    import torch

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"CineMA-base, 192x192x16, med_dual_lora, 1 round, batch "
        f"{paper.train.batch_size}; CPU-measured"
    )
    print(f"\n## 1. One site ({sites[0]}, {args.per_site} subjects) in a fresh process")
    cols = list(rows)
    print("| step (RSS, peak so far) | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    steps = [
        ("process start", "start"),
        ("baseline: import torch + medlora_lib", "imported"),
        ("+ CineMA-base with its weights (peak)", "model_built_peak"),
        ("+ site arrays + runtime built (peak)", "built_peak"),
        ("+ 1 train round (peak)", "trained_peak"),
        ("+ evaluation = process peak", "peak"),
    ]
    for label, key in steps:
        print(f"| {label} | " + " | ".join(_gb(rows[c][key]) for c in cols) + " |")
    print(
        "| prefix cache used | "
        + " | ".join(str(rows[c]["prefix_cache"]) for c in cols)
        + " |"
    )
    print(
        "| train round (s) | "
        + " | ".join(f"{rows[c]['train_seconds']:.0f}" for c in cols)
        + " |"
    )
    r = rows["paper profile"]
    per_subject = r["array_bytes"] / r["n_subjects"]
    prefix_per_subject = r["prefix_bytes_per_subject"]
    optimiser = 2 * 4 * r["trainable_params"]  # AdamW: exp_avg + exp_avg_sq, fp32
    print("\n## 2. Components (exact bytes)")
    print("| component | size | where it lives with one GPU |")
    print("|---|---|---|")
    print(
        f"| CineMA-base + adapters (weights) | {_gb(r['model_bytes'])} | GPU (built "
        "on the host first) |"
    )
    print(
        f"| checkpoint file read while loading | {_gb(ckpt_bytes)} | host, transient |"
    )
    print(
        f"| arrays per subject (2x192x192x16 fp32) | {per_subject / MB:.2f} MB | "
        "host (batches are copied to the GPU) |"
    )
    print(
        "| prefix cache per subject (tokens + fusion skip) | "
        f"{prefix_per_subject / MB:.2f} MB | host |"
    )
    print(
        f"| activations + gradients of one batch ({r['n_train']} subjects), "
        f"CPU | {_gb(r['trained_peak'] - r['built_peak'])} | GPU |"
    )
    print(
        f"| AdamW state ({r['trainable_params'] / 1e6:.2f} M trainable) | "
        f"{optimiser / MB:.1f} MB | GPU |"
    )
    if fed:
        print(
            f"\n## 3. The federation (simulate, {len(sites)} sites x "
            f"{args.per_site} subjects, 1 round, {fed['seconds']:.0f} s)"
        )
        print("| process | RSS at the summed peak | its own peak |")
        print("|---|---|---|")
        print(f"| driver before the run (baseline) | {_gb(fed['driver_before'])} | |")
        for role, v in sorted(fed["at_peak"].items()):
            print(
                f"| {role} x {len(v)} | {_gb(sum(v))} | "
                f"{_gb(fed['role_peak'][role])} (largest one) |"
            )
        print(f"| **all, summed** | **{_gb(fed['sum'])}** | |")
    extrapolate(r, ckpt_bytes, per_subject, prefix_per_subject, fed, args)


def extrapolate(
    r: dict, ckpt: int, raw: float, prefix: float, fed: dict | None, args
) -> None:
    """Host RAM of the paper protocol on one GPU: two client processes (half a GPU
    each), the server and the rest of the federation, from the measured figures."""
    total = sum(PAPER.values())
    # M&Ms-2 adds 360 subjects to Siemens, Philips and GE in a split the reference does
    # not give: the largest site has at most 245 + 360 subjects, and the two sites
    # served at once at most 245 + 125 + 360 (the two largest without M&Ms-2, plus it)
    biggest, two_sites = SIEMENS_KNOWN + 360, SIEMENS_KNOWN + 125 + 360
    from medlora_lib.fl.task import site_cache_bytes

    budget = site_cache_bytes()  # MEDLORA_SITE_CACHE_GB, or the library's default
    clients = "client process (Ray actor)"
    if fed and clients in fed["role_peak"]:
        # a client process without its arrays: measured peak minus this run's arrays
        # (CPU activations and weights included: on a GPU they leave the host)
        client_fixed = fed["role_peak"][clients] - args.per_site * raw
        rest = fed["sum"] - sum(fed["at_peak"].get(clients, []))
        source = "measured federation (section 3)"
    else:
        client_fixed = r["peak"] - r["array_bytes"]
        rest = r["imported"] + ckpt + r["model_bytes"]  # the server, at least
        source = "one-site process (section 1); Flower / Ray processes not counted"
    print("\n## 4. Extrapolation to the paper protocol (one GPU; host RAM)")
    print(
        f"subjects: ACDC {PAPER['ACDC']} + M&Ms {PAPER['M&Ms']} + M&Ms-2 "
        f"{PAPER['M&Ms-2']} = {total}: arrays {_gb(total * raw)}, or as prefix cache "
        f"{_gb(total * prefix)}; largest site <= {biggest} subjects, two sites served "
        f"at once <= {two_sites}"
    )
    print(
        f"fixed parts from the {source}: a client process without arrays "
        f"{_gb(client_fixed)}, everything but the clients {_gb(rest)}"
    )
    # a GPU run keeps a batch's activations and gradients in GPU memory
    act = r["trained_peak"] - r["built_peak"]
    print(
        "| inputs held, other sites kept | one client (bound) | whole run, CPU bound "
        f"| whole run on one GPU (minus 2 x {_gb(act)} activations) |"
    )
    print("|---|---|---|---|")
    for label, per_sub, keep in [
        ("arrays, MEDLORA_SITE_CACHE_GB=0", raw, 0.0),
        (f"arrays, MEDLORA_SITE_CACHE_GB={budget / GB:g}", raw, budget),
        ("prefix cache, MEDLORA_SITE_CACHE_GB=0", prefix, 0.0),
    ]:
        one = client_fixed + biggest * per_sub + keep
        everything = rest + 2 * client_fixed + two_sites * per_sub + 2 * keep
        gpu = everything - 2 * act

        def verdict(b: float) -> str:
            return f"{_gb(b)} ({'within' if b <= TARGET_GB * GB else 'over'} 12 GB)"

        print(f"| {label} | {_gb(one)} | {verdict(everything)} | {verdict(gpu)} |")
    print(
        "(upper bounds: a client's CPU-measured peak includes the model, the "
        "checkpoint read and the activations, which a GPU run moves off the host; the "
        "CUDA runtime's host share, typically a few hundred MB per process, comes on "
        "top.)"
    )


if __name__ == "__main__":
    main()
