"""In-process runs one after the other vs in worker processes, like for like.

Chapters ``02_single_site_baseline`` / ``03_fedavg_lora``: chapter 03's ``local`` and
``centralized`` runs (5 seeds each, ``cpu`` profile, 20 rounds) through
``simulate(..., runtime="inprocess")``, once with ``max_parallel=1`` (one process, the
old behaviour) and once with the default (``fl.simulate.inprocess_workers``), no cache.
Prints both wall times, their ratio, and checks the numbers are the same.

Usage::

    .venv/bin/python benchmarks/bench_inprocess.py [--seeds 0 1 2 3 4] [--rounds 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from medlora_lib import experiments as ex  # noqa: E402
from medlora_lib.fl import simulate  # noqa: E402
from medlora_lib.fl.simulate import inprocess_workers, plan  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args(argv)
    configs = ex.comparison_configs(
        "cpu", ["local", "centralized"], args.seeds, {"fed.num_rounds": args.rounds}
    )
    simulate(configs[:1], runtime="inprocess", verbose=False)  # the data set, warm
    workers = inprocess_workers(plan(configs, False, Path("/tmp")))
    times, results = {}, {}
    for label, cap in (("one process", 1), (f"{workers} workers", None)):
        t0 = time.perf_counter()
        results[label] = simulate(
            configs, runtime="inprocess", max_parallel=cap, verbose=False
        )
        times[label] = time.perf_counter() - t0
    base, par = times.values()
    a, b = results.values()
    same = all(
        x.rounds.drop(columns=["train_seconds", "elapsed_s"]).equals(
            y.rounds.drop(columns=["train_seconds", "elapsed_s"])
        )
        for x, y in zip(a, b, strict=True)
    )
    print(
        f"{len(configs)} in-process runs (local + centralized x {len(args.seeds)} seeds)"
    )
    for label, t in times.items():
        print(f"  {label:>12}: {t:7.1f} s")
    print(f"  speed-up {base / par:.2f}x; same numbers: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
