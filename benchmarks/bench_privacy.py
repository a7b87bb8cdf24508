"""Privacy benchmark: what DP costs one site's training round, side by side with the
non-private round in the same run (chapter ``notebooks/08_privacy``).

At the ``cpu`` profile (small ConvViT, 48x48x8, frozen-prefix cache, LoRA on the last 2
blocks) one site's :meth:`~medlora_lib.fl.task.ClientRuntime.train_round` is timed

* without privacy (the project's AdamW loop, ``train.grad_clip``), and
* with DP-SGD (``privacy.dp_sgd``: Opacus' per-sample gradients, clipping, noise,
  Poisson sampling and the accountant's step; :mod:`medlora_lib.privacy.dp_sgd`);

and a whole federation round (every site, the server, Flower's Simulation Runtime) with
and without SecAgg+ (``privacy.secagg``: :func:`medlora_lib.fl.secagg.secagg_cost`, both
runs in one Flower run; ``--secagg-rounds 0`` skips it).

Both run on the same runtime (same model, same cached activations), repeats
interleaved (off, on, off, on, ...) so that both see the same background load on a
shared machine; the figure is the median seconds per round and the ratio DP / plain
(target: at most 2x). Run::

    .venv/bin/python benchmarks/bench_privacy.py                  # cpu profile
    .venv/bin/python benchmarks/bench_privacy.py --smoke          # seconds, a check
    .venv/bin/python benchmarks/bench_privacy.py --site GE --repeats 7
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import shlex
import statistics
import sys
import time

import torch


def _config(profile: str, method: str, extra: list[str], dp: bool):
    from medlora_lib.config import get_config

    over = list(extra) + (["privacy.dp_sgd=true"] if dp else [])
    return get_config(profile, method=method, overrides=over)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="smoke profile (seconds)")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--method", default="med_dual_lora")
    ap.add_argument("--site", default=None, help="default: the first site")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument(
        "--secagg-rounds",
        type=int,
        default=4,
        help="rounds of the SecAgg+ comparison (0: skip)",
    )
    args = ap.parse_args(argv)
    profile = "smoke" if args.smoke else args.profile

    from medlora_lib.adapters import get_shared_state
    from medlora_lib.fl.sites import load_options, load_site, site_names
    from medlora_lib.fl.task import ClientRuntime
    from medlora_lib.pipeline import resolve_data_dir

    plain_cfg = _config(profile, args.method, args.set, dp=False)
    dp_cfg = _config(profile, args.method, args.set, dp=True)
    data_dir = resolve_data_dir(plain_cfg, verbose=False)  # made once, not timed
    site = args.site or site_names(data_dir, plain_cfg.fed.partition_by)[0]
    data = load_site(data_dir, site, **load_options(plain_cfg))
    t0 = time.perf_counter()
    rt = ClientRuntime.build(plain_cfg, {site: data}, site, data_key=str(data_dir))
    build_s = time.perf_counter() - t0
    dp_rt = dataclasses.replace(rt, cfg=dp_cfg)  # same model and cached activations
    start = get_shared_state(rt.model)

    # one warm-up round each (allocator, Opacus' imports, the accountant), not timed
    rt.train_round(start, None, 0)
    dp_rt.train_round(start, None, 0)
    times: dict[str, list[float]] = {"plain": [], "dp_sgd": []}
    last = None
    for rep in range(1, args.repeats + 1):
        for name, r in (("plain", rt), ("dp_sgd", dp_rt)):
            t0 = time.perf_counter()
            out = r.train_round(start, None, rep)
            times[name].append(time.perf_counter() - t0)
            if name == "dp_sgd":
                last = out
    n = int(rt.train_labels.shape[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["dp_sgd"] / med["plain"]
    p, t = dp_cfg.privacy, dp_cfg.train

    rows = [
        ("no privacy", med["plain"], min(times["plain"]), "-", "-"),
        (
            "DP-SGD (Opacus)",
            med["dp_sgd"],
            min(times["dp_sgd"]),
            f"{ratio:.2f}x",
            f"ε={last.epsilon:.3g} after 1 round",
        ),
    ]
    if args.secagg_rounds > 0:
        from medlora_lib.fl.secagg import secagg_cost

        over = {}
        for item in args.set:
            k, v = item.split("=", 1)
            over[k] = v
        sec = secagg_cost(profile, args.secagg_rounds, args.method, 0, over)
        plain_r, sec_r = sec.loc[False], sec.loc[True]
        rows += [
            (
                "federation round",
                plain_r["seconds_per_round"],
                float("nan"),
                "-",
                f"{int(plain_r['sites'])} sites, {plain_r['messages_per_site_round']:.0f} "
                f"msgs / site, {plain_r['wire_MB_per_round']:.3f} MB",
            ),
            (
                "  with SecAgg+",
                sec_r["seconds_per_round"],
                float("nan"),
                f"{sec_r['seconds_per_round'] / plain_r['seconds_per_round']:.2f}x",
                f"{sec_r['messages_per_site_round']:.0f} msgs / site, "
                f"{sec_r['wire_MB_per_round']:.3f} MB; final tensors differ by "
                f"{sec_r['final_max_abs_diff']:.1e}",
            ),
        ]

    cmd = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
    print(f"command : {cmd}")
    print(
        f"setup   : profile {profile}, method {args.method}, site {site} ({n} training "
        f"subjects), image {tuple(plain_cfg.data.image_size)}, batch {t.batch_size}, "
        f"{t.local_epochs} local epoch(s), prefix cache from block {rt.start_block}; "
        f"runtime built in {build_s:.1f} s (not timed)"
    )
    print(
        f"DP-SGD  : σ={last.dp_state['noise_multiplier']:g}, C={p.sgd_max_grad_norm:g}, "
        f"q={last.dp_state['sample_rate']:.3g} (Poisson), "
        f"{last.dp_state['steps']} steps / round, {p.accountant} accountant, "
        f"δ={p.delta:g}"
    )
    print(
        f"machine : {platform.machine()} {platform.processor() or ''}, device "
        f"{rt.device}, torch {torch.__version__}, {torch.get_num_threads()} torch "
        f"thread(s); {args.repeats} repeats, interleaved, after one warm-up each"
    )
    print()
    head = f"{'round':<18}{'median s':>10}{'min s':>9}{'ratio':>8}  note"
    print(head)
    print("-" * (len(head) + 24))
    for label, m, lo, r, note in rows:
        print(f"{label:<18}{m:>10.3f}{lo:>9.3f}{r:>8}  {note}")
    print()
    verdict = "within" if ratio <= 2.0 else "ABOVE"
    print(f"DP-SGD / plain, median s per round: {ratio:.2f}x ({verdict} the 2x target)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
