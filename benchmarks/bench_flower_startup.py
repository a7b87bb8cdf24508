"""Benchmark: the fixed cost of one Flower run, before its first round — what every
``simulate()`` call, ``medlora run``, each deployment test and each notebook's Flower run
pays once — with what it was before and the parts that remain, side by side.

1. **The FAB.** ``flwr run APP`` lists every file under ``APP`` before it filters them
   by ``.gitignore`` and ``fab-include``; on the checkout (its ``.venv`` and run cache
   included) that walk is most of the CLI's time. medlora points ``flwr run`` at
   :func:`medlora_lib.fl.runner.staged_app` (the same bundle files, the same FAB bytes).
   Printed: Flower's own build of the checkout vs of the staged folder, in this process.
2. **Imports.** Every Flower process imports what its app needs: the ServerApp and each
   Ray actor (ClientApp) in the Simulation Runtime, each SuperNode's ClientApp process in
   a deployment. Printed, each in a fresh interpreter: ``torch``; the ClientApp module;
   the ClientApp module plus ``monai`` (what it cost while ``medlora_lib.data`` imported
   MONAI at module level: ``import monai`` loads all of MONAI, transformers' BERT
   included); ``peft`` (built at the first train message and by the ServerApp).
3. ``--run``: one ``smoke`` FedAvg-LoRA round (4 sites) through ``simulate`` with the
   staged bundle, then with ``flwr run`` on the checkout itself; wall time of each and
   the difference.

Run::

    .venv/bin/python benchmarks/bench_flower_startup.py          # ~1 min
    .venv/bin/python benchmarks/bench_flower_startup.py --run    # + ~4 min
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fab_seconds(app: Path) -> tuple[float, int]:
    from flwr.cli.build import build_fab_from_disk

    t0 = time.perf_counter()
    fab = build_fab_from_disk(app)
    return time.perf_counter() - t0, len(fab)


def _import_seconds(modules: str, repeat: int) -> float:
    """Median wall time of ``import <modules>`` in a fresh interpreter."""
    code = (
        "import time; t0 = time.perf_counter(); "
        f"import {modules}; print(time.perf_counter() - t0)"
    )
    times = []
    for _ in range(repeat):
        out = subprocess.run(
            [sys.executable, "-W", "ignore", "-c", code],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        times.append(float(out.stdout.strip().splitlines()[-1]))
    return sorted(times)[len(times) // 2]


def _smoke_config():
    from medlora_lib.config import get_config

    return get_config(
        "smoke",
        method="fedavg_lora",
        seed=101,
        overrides={"fed.num_rounds": 1, "model.pretrained": "none"},
    )


def _one_round(app_dir: Path | None) -> float:
    from medlora_lib.fl import simulate

    cfg = _smoke_config()
    t0 = time.perf_counter()
    simulate(cfg, verbose=False, app_dir=app_dir)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="fresh interpreters per row")
    ap.add_argument("--run", action="store_true", help="also time one smoke round")
    ap.add_argument("--pairs", type=int, default=2, help="--run: alternated pairs")
    args = ap.parse_args(argv)
    from medlora_lib.fl.runner import project_dir, staged_app

    print(f"$ python benchmarks/bench_flower_startup.py {shlex.join(sys.argv[1:])}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; "
        f"python {platform.python_version()}"
    )
    root = project_dir()
    files = sum(len(f) for _, _, f in os.walk(root))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_stage0 = time.perf_counter()
        staged = staged_app(root, Path(tmp) / "app")
        t_stage = time.perf_counter() - t_stage0
        t_root, n_root = _fab_seconds(root)
        t_staged, n_staged = _fab_seconds(staged)
    print(f"\n1. the FAB ({files:,} files under {root})")
    print(f"   {'what':<44} {'seconds':>8} {'FAB bytes':>10}")
    print(f"   {'Flower builds it from the checkout':<44} {t_root:>8.2f} {n_root:>10,}")
    print(
        f"   {'staged_app + Flower builds from the copy':<44} "
        f"{t_stage + t_staged:>8.2f} {n_staged:>10,}"
    )
    print(f"   {'saved on every flwr run':<44} {t_root - t_stage - t_staged:>8.2f}")

    print(f"\n2. imports, each in a fresh interpreter (median of {args.repeat})")
    rows = [
        ("torch", "torch"),
        ("the ClientApp module (now)", "medlora_lib.fl.client_app"),
        ("ClientApp module + monai (before)", "medlora_lib.fl.client_app, monai"),
        ("the ServerApp module", "medlora_lib.fl.server_app"),
        ("torch + peft (the model, at the first train)", "torch, peft"),
    ]
    got = {}
    for label, mods in rows:
        got[label] = _import_seconds(mods, args.repeat)
        print(f"   {label:<46} {got[label]:>6.1f} s")
    saved = got["ClientApp module + monai (before)"] - got["the ClientApp module (now)"]
    print(
        f"   MONAI no longer imported: {saved:.1f} s in each ClientApp process "
        "(2 Ray actors per simulation here, 1 per SuperNode in a deployment)"
    )
    if args.run:
        from medlora_lib.pipeline import resolve_data_dir

        resolve_data_dir(_smoke_config(), verbose=False)  # the data made before timing
        # alternated, so that drift of this shared machine falls on both alike
        staged_s, root_s = [], []
        for _ in range(args.pairs):
            staged_s.append(_one_round(None))
            root_s.append(_one_round(root))
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        print(
            "\n3. one smoke FedAvg-LoRA round, 4 sites, through simulate() "
            f"(median of {args.pairs}, alternated)"
        )
        print(f"   {'flwr run on the staged bundle (now)':<44} {med(staged_s):>7.1f} s")
        print(f"   {'flwr run on the checkout':<44} {med(root_s):>7.1f} s")
        print(f"   {'difference':<44} {med(root_s) - med(staged_s):>7.1f} s")


if __name__ == "__main__":
    main()
