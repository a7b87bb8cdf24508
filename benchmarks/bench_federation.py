"""Federation benchmark: Flower's share of a run, seconds per round, peak memory, bytes.

Side by side in one run (chapter ``notebooks/06_communication_analysis``):

1. **Flower's share** — the same training (same methods, rounds, seeds) through the plain
   in-process loop (``simulate(..., runtime="inprocess")``, no Flower, one site after the
   other) and through :func:`medlora_lib.fl.simulate` (``flwr run`` on a Simulation-Runtime
   SuperLink, Ray);
   both wall times and ``share = 1 - plain / flower``. The simulation runs twice: as
   users run it (one client per CPU at a time) and with one client at a time like the
   plain loop — the like-for-like orchestration share — and a third time with Flower's
   own 100 ms LinkState sweep instead of ``fl/flower_poll``'s on-arrival one. Its time is given with and
   without its one-off start-up (Ray + actors), which several experiments in one call
   amortise.
2. **Seconds per round and peak memory per method** — each method in its own fresh
   process through the in-process loop (peak RSS = the child's ``ru_maxrss``), and seconds
   per round inside the simulation.
3. **Bytes per round per method** — measured from the ArrayRecords of the simulation's
   messages vs the closed form (``adapters.shared_bytes``); they must agree.

Usage::

    .venv/bin/python benchmarks/bench_federation.py            # cpu profile (default)
    .venv/bin/python benchmarks/bench_federation.py --smoke    # seconds, for CI / a check
    .venv/bin/python benchmarks/bench_federation.py --rounds 3 --methods fedavg_lora med_dual_lora
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

import pandas as pd

from medlora_lib.experiments import ALL_METHODS as ALL  # noqa: E402


def _config(profile: str, method: str, rounds: int | None, extra: list[str]):
    from medlora_lib.config import get_config

    overrides = list(extra)
    if rounds is not None:
        overrides.append(f"fed.num_rounds={rounds}")
    return get_config(profile, overrides=overrides, method=method)


def _inprocess_child(args: tuple) -> dict:
    """Run methods one after the other in this (fresh) process through the plain loop."""
    profile, methods, rounds, extra = args
    import medlora_lib.adapters  # noqa: F401  (imports outside the timing)
    from medlora_lib.fl import simulate

    out = {}
    t0 = time.perf_counter()
    for method in methods:
        cfg = _config(profile, method, rounds, extra)
        res = simulate(cfg, runtime="inprocess", verbose=False)
        out[method] = {
            "plain_s": res.seconds,
            "plain_s_per_round": res.seconds_per_round(),
        }
    total = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"methods": out, "total_s": total, "peak_rss_mb": peak_kb / 1024}


def _in_child(args: tuple) -> dict:
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_inprocess_child, (args,))


def _sweep_ab(cfg, pairs: int) -> int:
    """Steady-state s / round of one experiment, one client at a time, alternating
    the on-arrival sweep (``fl/flower_poll``) and Flower's 100 ms one; the machine's
    drift falls on both alike."""
    from medlora_lib.fl import simulate

    per: dict[str, list[float]] = {"on-arrival": [], "flower-100ms": []}
    for i in range(pairs):
        for mode in ("on-arrival", "flower-100ms"):
            if mode == "flower-100ms":
                os.environ["MEDLORA_FLOWER_POLL"] = "flower"
            try:
                [r] = simulate([cfg], verbose=False, max_parallel=1)
            finally:
                os.environ.pop("MEDLORA_FLOWER_POLL", None)
            assert r.provenance.get("flower_sweep") == mode, r.provenance
            per[mode].append(r.seconds_per_round())
            print(f"pair {i + 1} {mode:13s} {per[mode][-1]:.3f} s / round", flush=True)
    on = float(pd.Series(per["on-arrival"]).median())
    off = float(pd.Series(per["flower-100ms"]).median())
    print(
        f"{cfg.method} at {cfg.profile}, {cfg.fed.num_rounds} rounds, one client at a "
        f"time, median of {pairs}: on-arrival {on:.3f} s / round, Flower's sweep "
        f"{off:.3f} s / round; saved {off - on:.3f} s a round ({1 - on / off:.1%})"
    )
    return 0


PARTS = ("compute", "state", "handler_other", "idle")
PART_HELP = {
    "wall": "first push to last reply (the round's exchanges)",
    "compute": "training + evaluation in the handlers",
    "state": "the sites' state writes",
    "handler_other": "the rest of the handlers (state reads, records, configs)",
    "idle": "no handler running: Flower's hand-offs, Ray, the server's pull",
}


def _traced(cfg, max_parallel: int | None = None):
    """One traced simulation of ``cfg``: its result and :func:`fl.trace.breakdown`'s
    rows of its train / evaluate messages (the sites' hellos left out)."""
    import tempfile

    from medlora_lib.fl import simulate
    from medlora_lib.fl.trace import breakdown, read_trace, tracing

    with tempfile.TemporaryDirectory(prefix="medlora-trace-") as d, tracing(d):
        [r] = simulate([cfg], verbose=False, max_parallel=max_parallel)
        msgs = breakdown(read_trace(d))
    return r, msgs[msgs["phase"] != "query"].copy()


def _trace(cfg, profile: str, rounds: int | None, extra: list[str], pairs: int) -> int:
    """Where a round's time goes (``fl/trace.py``): ``pairs`` alternations of the plain
    loop (a fresh child) and one simulation with one client at a time, traced message
    by message; every figure is ms per round (median over rounds after the first, then
    over the pairs), so the machine's drift falls on both alike."""
    from medlora_lib.fl.trace import per_round

    meds, flower_rounds, plain_rounds = [], [], []
    n_msgs = n_sites = 0
    span = ""
    for i in range(pairs):
        plain = _in_child((profile, [cfg.method], rounds, extra))["methods"][cfg.method]
        plain_rounds.append(plain["plain_s_per_round"])
        r, msgs = _traced(cfg, max_parallel=1)
        rounds_df = per_round(msgs)
        rounds_df = rounds_df[
            rounds_df["round"] > rounds_df["round"].min()
        ]  # 1: builds
        per = rounds_df.groupby("round")[["wall", *PARTS]].sum()
        meds.append(per.median() * 1e3)
        flower_rounds.append(r.seconds_per_round())
        n_msgs, n_sites = len(msgs), msgs["site"].nunique()
        span = f"{int(per.index.min())}..{int(per.index.max())}"
        print(
            f"pair {i + 1}: plain loop {plain_rounds[-1]:.3f} s / round, Flower "
            f"{flower_rounds[-1]:.3f} s / round (share "
            f"{1 - plain_rounds[-1] / flower_rounds[-1]:.1%}), traced wall "
            f"{meds[-1]['wall']:.0f} ms, idle {meds[-1]['idle']:.1f} ms",
            flush=True,
        )
    med = pd.DataFrame(meds).median()
    flower_round = float(pd.Series(flower_rounds).median())
    plain_round = float(pd.Series(plain_rounds).median())
    print(
        f"{cfg.method} at {profile}, {cfg.fed.num_rounds} rounds, one client at a time, "
        f"{pairs} pair(s); {n_msgs} traced messages a run, {n_sites} sites; ms per round, "
        f"median over rounds {span} and the pairs:"
    )
    for k in ("wall", *PARTS):
        print(f"  {k:14s} {med[k]:8.1f}  {PART_HELP.get(k, '')}")
    print(
        f"Flower s / round {flower_round:.3f} vs plain loop {plain_round:.3f}: share "
        f"{1 - plain_round / flower_round:.1%}; of the traced round: idle "
        f"{med['idle'] / med['wall']:.1%} (Flower + Ray), medlora's state writes + "
        f"message handling {(med['state'] + med['handler_other']) / med['wall']:.1%}"
    )
    return 0


def _trace_parallel(cfg, profile: str) -> int:
    """How busy the actors are when the simulation runs as users run it (one client per
    CPU at a time): per round, each actor's handler time against the round's wall time;
    the rest is the round's barrier (a fast site waits for a slow one), the server's
    aggregation and the hand-offs."""
    r, msgs = _traced(cfg)
    msgs["busy"] = msgs["t_exit"] - msgs["t_enter"]
    actors = int(msgs["pid"].nunique())
    rows = []
    for rnd, g in msgs.groupby("round"):
        wall = sum(
            float(h["t_reply"].max() - h["t_push"].min()) for _, h in g.groupby("phase")
        )
        busy = g.groupby("pid")["busy"].sum()
        rows.append(
            {
                "round": rnd,
                "wall": wall,
                "busy_per_actor": float(busy.sum()) / actors,
                "busiest": float(busy.max()),
                "compute": float(g["compute"].sum()) / actors,
            }
        )
    per = pd.DataFrame(rows).set_index("round")
    per = per[per.index > per.index.min()]  # round 1 builds the runtimes
    med = per.median() * 1e3
    print(
        f"{cfg.method} at {profile}, {cfg.fed.num_rounds} rounds, {actors} actors (one "
        f"client per CPU); ms per round, median over rounds "
        f"{int(per.index.min())}..{int(per.index.max())}: wall {med['wall']:.0f}, "
        f"handler time per actor {med['busy_per_actor']:.0f} (compute "
        f"{med['compute']:.0f}), the busiest actor {med['busiest']:.0f}"
    )
    print(
        f"the actors are busy {med['busy_per_actor'] / med['wall']:.1%} of a round; "
        f"the busiest {med['busiest'] / med['wall']:.1%}; Flower s / round "
        f"{r.seconds_per_round():.3f}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="smoke profile, 2 rounds")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--rounds", type=int, default=None, help="override fed.num_rounds")
    ap.add_argument("--methods", nargs="*", default=list(ALL))
    ap.add_argument("--set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument(
        "--out", type=Path, default=None, help="write bench_federation.json"
    )
    ap.add_argument(
        "--sweep-ab",
        type=int,
        default=0,
        metavar="N",
        help="only the LinkState sweep A/B: N alternating pairs of one-client-at-a-"
        "time simulations (the first method), fl/flower_poll's sweep vs Flower's own",
    )
    ap.add_argument(
        "--trace",
        action="store_true",
        help="only the per-message breakdown of the first federated method (one "
        "client at a time, fl/trace.py) beside the plain loop's s / round",
    )
    ap.add_argument(
        "--trace-parallel",
        action="store_true",
        help="only how busy the actors are in a simulation run as users run it (one "
        "client per CPU, the first federated method, fl/trace.py)",
    )
    ap.add_argument(
        "--pairs",
        type=int,
        default=1,
        metavar="N",
        help="with --trace: N alternating (plain loop, traced simulation) pairs",
    )
    args = ap.parse_args(argv)
    profile = "smoke" if args.smoke else args.profile
    rounds = args.rounds if args.rounds is not None else (2 if args.smoke else None)
    extra = list(args.set)
    if args.smoke and not any(s.startswith("model.pretrained") for s in extra):
        extra.append('model.pretrained="none"')
    if not any(s.startswith("train.num_threads") for s in extra):
        # Ray gives each simulated client 1 CPU (OMP_NUM_THREADS=1); the plain loop gets
        # the same, so both compute alike (on a busy 2-core machine torch's default of 2
        # threads per process is also many times slower: oversubscription).
        extra.append("train.num_threads=1")
    print("$ " + " ".join([Path(sys.executable).name, *sys.argv]), flush=True)

    from medlora_lib.comm import closed_form_bytes
    from medlora_lib.fl import FEDERATED_METHODS, simulate
    from medlora_lib.pipeline import resolve_data_dir

    resolve_data_dir(
        _config(profile, "local", rounds, extra)
    )  # data made once, not timed
    methods = [m for m in args.methods if m in ALL]
    fed = [m for m in methods if m in FEDERATED_METHODS]
    if args.trace_parallel:
        return _trace_parallel(_config(profile, fed[0], rounds, extra), profile)
    if args.trace:
        return _trace(
            _config(profile, fed[0], rounds, extra), profile, rounds, extra, args.pairs
        )
    if args.sweep_ab:
        return _sweep_ab(_config(profile, fed[0], rounds, extra), args.sweep_ab)

    # 2a: every method alone in a fresh process, plain loop: peak memory, s / round
    plain = []
    for m in methods:
        res = _in_child((profile, [m], rounds, extra))
        plain.append(
            {"method": m, **res["methods"][m], "peak_rss_mb": res["peak_rss_mb"]}
        )
        print(f"plain loop  {m:14s} {plain[-1]['plain_s']:7.1f} s", flush=True)
    plain_df = pd.DataFrame(plain).set_index("method")

    # 1a: the federated methods one after the other in ONE process, plain loop
    plain_fed = float("nan")
    if fed:
        plain_fed = _in_child((profile, fed, rounds, extra))["total_s"]
        print(
            f"plain loop, {len(fed)} federated methods in one process: {plain_fed:.1f} s"
        )

    # 1b + 2b + 3: the federated methods through Flower, all in ONE simulation
    sim_df = pd.DataFrame()
    flower_total = 0.0
    flower_seq_total = flower_seq_exp = flower_sweep_exp = float("nan")
    seq_round = sweep_round = float("nan")
    sweeps = sweeps_off = set()
    if fed:
        cfgs = [_config(profile, m, rounds, extra) for m in fed]
        t0 = time.perf_counter()
        results = simulate(cfgs, verbose=False)
        flower_total = time.perf_counter() - t0
        rows = []
        for r in results:
            cf = closed_form_bytes(r.config)["shared_bytes"]
            ups = r.comm["bytes_up_per_client_round"]
            n_clients = r.rounds["client"].nunique()
            rows.append(
                {
                    "method": r.method,
                    "flower_s": r.seconds,
                    "flower_s_per_round": r.seconds_per_round(),
                    "bytes_up_client_round": ups[0] if len(ups) == 1 else ups,
                    "closed_form_bytes": cf,
                    "bytes_round_all_clients": (ups[0] if ups else 0) * n_clients * 2,
                    "match": r.comm["matches_closed_form"],
                    "mean_test_BA": float(
                        r.selected()
                        .set_index("client")
                        .loc["mean", "balanced_accuracy"]
                    ),
                }
            )
        sim_df = pd.DataFrame(rows).set_index("method")
        # 4: what keeping state costs a round: the server's checkpoint and each site's
        # writes under its state-dir, against the steady-state seconds per round
        ck = pd.concat([r.rounds for r in results])
        per_round = float(sim_df["flower_s_per_round"].median())
        ck_s = float(ck.groupby(["method", "round"])["checkpoint_s"].max().median())
        st_s = float(ck["state_seconds"].median())

        # 1c: the same simulation with ONE client at a time (1 CPU for Ray), i.e. the
        # plain loop's parallelism: the difference is orchestration alone
        t0 = time.perf_counter()
        seq = simulate(cfgs, verbose=False, max_parallel=1)
        flower_seq_total = time.perf_counter() - t0
        flower_seq_exp = float(sum(r.seconds for r in seq))
        sweeps = {r.provenance.get("flower_sweep", "?") for r in seq}

        # 1d: the same again with Flower's own 100 ms LinkState sweep (fl/flower_poll
        # off), so the sweep's cost is printed beside it from the same run
        os.environ["MEDLORA_FLOWER_POLL"] = "flower"
        try:
            seq_flower = simulate(cfgs, verbose=False, max_parallel=1)
        finally:
            os.environ.pop("MEDLORA_FLOWER_POLL", None)
        flower_sweep_exp = float(sum(r.seconds for r in seq_flower))
        seq_round = float(pd.Series([r.seconds_per_round() for r in seq]).mean())
        sweep_round = float(
            pd.Series([r.seconds_per_round() for r in seq_flower]).mean()
        )
        sweeps_off = {r.provenance.get("flower_sweep", "?") for r in seq_flower}

    table = plain_df.join(sim_df, how="left")
    for m in methods:
        if m not in fed:
            table.loc[m, "closed_form_bytes"] = 0
            table.loc[m, "match"] = True
    pd.set_option("display.width", 200)
    print()
    print(f"profile={profile} rounds={rounds or 'profile default'}")
    print(table.to_string(float_format=lambda v: f"{v:.2f}"))

    if fed:
        flower_exp = float(sim_df["flower_s"].sum())
        print()
        print(
            f"Flower's share ({len(fed)} federated methods, same training): plain loop "
            f"{plain_fed:.1f} s; simulate() {flower_total:.1f} s incl. Ray start-up, "
            f"{flower_exp:.1f} s excl.; ratio simulate/plain = "
            f"{flower_total / plain_fed:.2f} (incl.), {flower_exp / plain_fed:.2f} (excl.); "
            f"orchestration share = {1 - plain_fed / flower_total:.0%} (incl.), "
            f"{1 - plain_fed / flower_exp:.0%} (excl.)"
        )
        print(
            f"like for like (one client at a time in both): plain loop {plain_fed:.1f} s; "
            f"simulate() {flower_seq_total:.1f} s incl. Ray start-up, "
            f"{flower_seq_exp:.1f} s excl.; orchestration share = "
            f"{1 - plain_fed / flower_seq_total:.0%} (incl.), "
            f"{1 - plain_fed / flower_seq_exp:.0%} (excl.) [sweep: {', '.join(sweeps)}]"
        )
        print(
            f"  the same with Flower's own 100 ms LinkState sweep: {flower_sweep_exp:.1f} s "
            f"excl.; orchestration share = {1 - plain_fed / flower_sweep_exp:.0%} "
            f"(excl.) [sweep: {', '.join(sweeps_off)}]"
        )
        steady_plain = float(plain_df.loc[fed, "plain_s_per_round"].mean())
        print(
            "like for like, steady state (median s / round after round 1, mean over "
            f"methods; the issue's measure): plain loop {steady_plain:.3f} s; Flower "
            f"{seq_round:.3f} s -> Flower's share {1 - steady_plain / seq_round:.1%} "
            f"[{', '.join(sweeps)}]; with Flower's own sweep {sweep_round:.3f} s -> "
            f"{1 - steady_plain / sweep_round:.1%} [{', '.join(sweeps_off)}]"
        )
        steady_flower = float(sim_df["flower_s_per_round"].mean())
        print(
            f"steady state (median s / round, mean over methods): plain "
            f"{steady_plain:.2f} s, Flower {steady_flower:.2f} s, ratio "
            f"{steady_flower / steady_plain:.2f} (orchestration share "
            f"{1 - steady_plain / steady_flower:.0%}); the rest of the difference is "
            "start-up (Ray, actors importing torch, first model / cache builds)"
        )
        print(
            "note: both use 1 torch thread per client (train.num_threads=1); the "
            "simulation runs up to one client per CPU at a time, the plain loop one "
            "after the other."
        )
    if fed:
        print(
            f"persistence per round (median): server checkpoint {ck_s * 1e3:.1f} ms, "
            f"a site's state writes {st_s * 1e3:.1f} ms (in parallel across sites), "
            f"round {per_round:.2f} s -> {(ck_s + st_s) / per_round:.1%} of a round"
        )
    ok = bool(table["match"].fillna(True).all())
    print(f"bytes measured == closed form for every method: {ok}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_federation.json").write_text(
            json.dumps(
                {
                    "profile": profile,
                    "rounds": rounds,
                    "table": json.loads(table.reset_index().to_json(orient="records")),
                    "flower_total_s": flower_total,
                    "plain_federated_total_s": plain_fed,
                    "flower_one_client_at_a_time_total_s": flower_seq_total,
                    "flower_one_client_at_a_time_excl_s": flower_seq_exp,
                    "flower_own_sweep_one_client_at_a_time_excl_s": flower_sweep_exp,
                    "plain_s_per_round": steady_plain if fed else None,
                    "flower_one_client_at_a_time_s_per_round": seq_round,
                    "flower_own_sweep_s_per_round": sweep_round,
                },
                indent=2,
            )
        )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
