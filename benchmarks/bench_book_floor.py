"""The book's compute floor per notebook: FLOPs counted, kernel speed measured, ratio printed.

Chapters: every notebook that trains (``03_fedavg_lora``, ``04_med_dual_lora``,
``05_block_ablation``, ``07_beyond_the_paper``); issue 12's target is each heavy notebook
at most 1.2x its eager-kernel floor.

Usage::

    .venv/bin/python benchmarks/bench_book_floor.py                  # cpu profile
    .venv/bin/python benchmarks/bench_book_floor.py --notebooks 03 05 --timings T.json

What it does, per notebook, in one run:

1. **The experiments the notebook trains**, from the very functions the notebook calls
   (``medlora_lib.experiments``: the main comparison, the capacity controls, the
   ablation, the shift sweep and the late-site federations) with the parameters the
   book runs it with (its ``parameters`` cell, and what ``medlora book --profile``
   passes); an experiment an earlier notebook already ran is not counted again (the
   book reads it from the run cache).
2. **FLOPs** with ``torch.utils.flop_counter.FlopCounterMode``: each experiment runs
   in process (``simulate(..., runtime="inprocess")``, the same round code as the Flower
   apps) for one round. The one-time part (building the sites' runtimes, i.e. the
   frozen-prefix cache) is counted apart and the round's part is multiplied by the
   notebook's rounds: at the ``cpu`` profile every round trains the same steps
   (``train.patience=0``: no early stop) and evaluates the validation split. The
   counted round is a run's last, whose test split is always evaluated; in the book a
   middle round evaluates it only when its validation value beats the earlier rounds'
   (``fl.federation.plan_test_evaluations``), so the count is an upper bound by at most
   the test split's evaluations (the floor a little high, the ratio a little low).
   Replicates differ only in seed (same split sizes), so one seed per experiment group
   is counted and multiplied by the group's seeds (``--all-seeds`` counts each one);
   checked: the round part is linear in the rounds and equal across seeds. A frozen prefix is counted
   once per data set and replicate split (the benchmark's process keeps it for the
   experiments that share it; the book's processes may build it more than once).
3. **Kernel speed**: one training step (forward + backward, batch ``train.batch_size``)
   of the profile's model with LoRA on the last two blocks, without the prefix cache,
   one thread (the book's per-process setting), FLOPs counted the same way and timed
   (best of ``--repeats``). The floor of a notebook is its FLOPs / (that speed x the
   machine's cores): both cores busy with eager kernels all the time, nothing else.
4. **Measured**: the notebook's seconds in the last ``make book`` (``timings.json``
   written by ``medlora_lib.bookrun``; ``--timings``), printed side by side with the
   floor as measured / floor.

Not counted (the floor is then lower than the real work, the ratio higher): data
generation (numpy) and chapter 08 (differential privacy needs the Flower runtime).
Chapter 07's late-site joins (``join_new_site``) are counted with the federation that
left the site out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from medlora_lib import experiments as ex  # noqa: E402
from medlora_lib.config import ExperimentConfig, config_hash, get_config  # noqa: E402


def book_parameters(stem: str, profile: str) -> dict[str, Any]:
    """What the book runs notebook ``stem`` with at ``profile``: its ``parameters``
    cell, overridden by what ``medlora book --profile`` passes."""
    from medlora_lib.bookrun import notebook_parameters, parameter_defaults

    nb = next((ROOT / "notebooks").glob(f"{stem}_*.ipynb"))
    return {**parameter_defaults(nb), **notebook_parameters(nb, profile)}


def notebook_configs(profile: str) -> dict[str, list[ExperimentConfig]]:
    """The experiments each training notebook runs, in book order (before dedup), from
    its own parameters and the experiments functions it calls."""
    p3, p4, p5, p7 = (book_parameters(k, profile) for k in ("03", "04", "05", "07"))

    def rounds(p: dict[str, Any]) -> dict[str, Any]:
        return {"fed.num_rounds": p["num_rounds"]}

    controls = ex.capacity_control_configs(profile, p4["seeds"], rounds(p4))
    sweep = (
        ex.shift_sweep_configs(
            profile, p7["seeds"], p7["sweep_methods"], overrides=rounds(p7)
        )
        if p7["run_sweep"]
        else []
    )
    held_out, refs = ex.new_site_join_configs(
        profile, p7["newcomers"], p7["seeds"], rounds(p7)
    )
    return {
        "03": ex.comparison_configs(profile, ex.ALL_METHODS, p3["seeds"], rounds(p3)),
        "04": [c for group in controls.values() for c in group],
        "05": ex.ablation_configs(
            profile,
            p5["method"],
            p5["seeds"],
            p5["block_choices"],
            p5["rank_choices"],
            rounds(p5),
        )[1],
        "07": [c for _, c in sweep] + held_out + refs,
    }


def _group_key(cfg: ExperimentConfig) -> str:
    """The experiment without its seed: replicates of one group cost the same."""
    d = cfg.to_dict()
    d.pop("seed", None)
    return json.dumps(d, sort_keys=True, default=str)


class Counter:
    """Total FLOPs, with the runtimes' build (prefix cache) counted apart."""

    def __init__(self) -> None:
        self.mode = FlopCounterMode(display=False)
        self.build = 0

    def __enter__(self) -> Counter:
        from medlora_lib.fl import task

        self._orig = task.ClientRuntime.build
        orig, counter = self._orig, self

        def build(*args: Any, **kwargs: Any) -> Any:
            before = counter.mode.get_total_flops()
            try:
                return orig(*args, **kwargs)
            finally:
                counter.build += counter.mode.get_total_flops() - before

        task.ClientRuntime.build = build  # type: ignore[method-assign]
        self.mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        from medlora_lib.fl import task

        self.mode.__exit__(*exc)
        task.ClientRuntime.build = self._orig  # type: ignore[method-assign]

    @property
    def total(self) -> int:
        return int(self.mode.get_total_flops())


def _rounds(cfg: ExperimentConfig, rounds: int) -> tuple[int, int]:
    """(build FLOPs, other FLOPs) of ``cfg`` run for ``rounds`` rounds in process; a
    federation that leaves a site out (chapter 07) is followed by that site's join."""
    from medlora_lib.fl import simulate
    from medlora_lib.fl.newsite import join_new_site

    run = dataclasses.replace(cfg, fed=dataclasses.replace(cfg.fed, num_rounds=rounds))
    with Counter() as c:
        result = simulate(run, use_cache=False, verbose=False, runtime="inprocess")
        if cfg.fed.exclude:
            join_new_site(result, cfg.fed.exclude[0])
    return c.build, c.total - c.build


def count_flops(cfg: ExperimentConfig) -> tuple[int, int]:
    """(one-time FLOPs, FLOPs of one round) of ``cfg``, from one in-process round.

    A late-site federation also trains the newcomer's join, which evaluates the global
    adapter once before its rounds: its one-time part is told apart from its rounds by a
    second run of two rounds (same prefix, so nothing is built again).
    """
    build, one = _rounds(cfg, 1)
    if not cfg.fed.exclude:
        return build, one
    build2, two = _rounds(cfg, 2)
    per_round = two - one
    return build + build2 + (one - per_round), per_round


def kernel_speed(profile: str, repeats: int) -> tuple[float, float, int]:
    """(FLOP/s of one thread, seconds, FLOPs) of one training step of the profile's
    model with LoRA on the last two blocks, inputs not cached."""
    from medlora_lib.fl.task import build_adapted_model

    cfg = get_config(profile, method="fedavg_lora")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_adapted_model(cfg)
    model.train()
    batch = cfg.train.batch_size
    x = torch.rand(batch, 2, *cfg.data.image_size)
    y = torch.randint(0, 2, (batch,))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(x)
        logits = out if isinstance(out, torch.Tensor) else out["logits"]
        loss_fn(logits, y).backward()
        opt.step()

    with FlopCounterMode(display=False) as fc:
        step()
    flops = int(fc.get_total_flops())
    step()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    return flops / best, best, flops


def find_timings(path: Path | None, profile: str) -> dict[str, float]:
    """Per-notebook seconds of the last book build (``{"03": s, ...}``), or {}."""
    if path is None:
        hits = sorted(
            (ROOT / "_build").glob(f"executed-{profile}/timings.json"),
            key=lambda p: p.stat().st_mtime,
        )
        path = hits[-1] if hits else None
    if path is None or not path.exists():
        return {}
    secs = json.loads(path.read_text()).get("seconds", {})
    return {stem[:2]: float(s) for stem, s in secs.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--notebooks", nargs="+", default=["03", "04", "05", "07"])
    ap.add_argument("--timings", type=Path, default=None, help="a bookrun timings.json")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--all-seeds", action="store_true", help="count every replicate")
    args = ap.parse_args(argv)

    threads = int(get_config(args.profile).train.num_threads)
    torch.set_num_threads(threads)
    cores = len(os.sched_getaffinity(0))
    speed, step_s, step_flops = kernel_speed(args.profile, args.repeats)
    torch.set_num_threads(threads)
    print(
        f"kernel speed ({args.profile}, one training step, batch "
        f"{get_config(args.profile).train.batch_size}, 1 thread): "
        f"{step_flops / 1e9:.2f} GFLOP in {step_s * 1e3:.1f} ms = "
        f"{speed / 1e9:.1f} GFLOP/s; floor uses {cores} cores"
    )

    per_nb = notebook_configs(args.profile)
    seen: set[str] = set()
    measured = find_timings(args.timings, args.profile)
    counted: dict[str, tuple[int, int]] = {}
    rows = []
    t_all = time.perf_counter()
    for nb, configs in per_nb.items():
        new = []
        for c in configs:
            h = config_hash(c)
            if h not in seen:
                seen.add(h)
                new.append(c)
        if nb not in args.notebooks:
            continue
        groups: dict[str, list[ExperimentConfig]] = defaultdict(list)
        for c in new:
            groups[config_hash(c) if args.all_seeds else _group_key(c)].append(c)
        flops = 0
        t0 = time.perf_counter()
        for key, members in groups.items():
            if key not in counted:
                counted[key] = count_flops(members[0])
            b, r = counted[key]
            # each replicate's split has its own frozen prefix, built once per process
            flops += (b + r * members[0].fed.num_rounds) * len(members)
        floor = flops / (speed * cores)
        meas = measured.get(nb)
        rows.append((nb, len(new), flops, floor, meas))
        print(
            f"[{nb}] {len(new)} runs in {len(groups)} groups counted in "
            f"{time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    print(f"(counting took {time.perf_counter() - t_all:.0f} s)\n")
    print(
        f"{'notebook':>8} | {'runs':>4} | {'TFLOP':>7} | {'floor s':>8} | "
        f"{'measured s':>10} | {'measured / floor':>16}"
    )
    for nb, n, flops, floor, meas in rows:
        ratio = f"{meas / floor:.2f}x" if meas else "no timings.json"
        m = f"{meas:.0f}" if meas else "-"
        print(
            f"{nb:>8} | {n:>4} | {flops / 1e12:>7.2f} | {floor:>8.0f} | {m:>10} | "
            f"{ratio:>16}"
        )
    if not measured:
        print("\nmeasured: run `make book` first (or pass --timings PATH)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
