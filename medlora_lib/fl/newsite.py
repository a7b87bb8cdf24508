"""A new site joins a finished Med-DualLoRA federation (chapter ``notebooks/07_beyond_the_paper``).

The question: a hospital that was not part of the federation (here: one vendor held out
with ``fed.exclude``) receives the learned **global** adapter (and the shared head). What
does it get

* **zero-shot** — deploying the global adapter as it is (its local adapter is still zero);
* **join** — training only its own **local** adapter (and the head) on top of the frozen
  global adapter, with the same budget (rounds × local epochs), optimiser, class weighting
  and validation-based selection as every method of the book;

compared with training alone (``local``)? :func:`join_new_site` runs the join through the
same :class:`~medlora_lib.fl.task.ClientRuntime` as every other method, so the data, the
prefix cache and the evaluation are identical; the global adapter's tensors are frozen
(``requires_grad=False``) and checked unchanged at the end.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from medlora_lib.config import ExperimentConfig
from medlora_lib.errors import ConfigError

__all__ = ["join_new_site", "join_new_sites"]


def _is_global_lora(name: str) -> bool:
    from medlora_lib.adapters import GLOBAL_ADAPTER

    return f".lora_A.{GLOBAL_ADAPTER}." in name or f".lora_B.{GLOBAL_ADAPTER}." in name


def join_new_site(
    federation: Any,
    newcomer: str,
    verbose: bool = False,
) -> tuple[Any, dict[str, float]]:
    """Let ``newcomer`` join the finished federation ``federation``.

    Args:
        federation: the :class:`~medlora_lib.fl.simulate.RunResult` of a ``med_dual_lora``
            run whose config left ``newcomer`` out (``fed.exclude``); it must hold the
            final global state (``final_shared``; every run of :func:`simulate` does).
        newcomer: the client name (e.g. ``"Canon"``).
        verbose: print one line per round.

    Returns:
        ``(result, zero_shot)``: a ``RunResult`` of the newcomer's join training (method
        ``med_dual_lora``, one client; ``exp_id`` ``join-<newcomer>``), and the
        newcomer's metrics of the global adapter alone before any local training.

    Raises:
        ConfigError: the federation is not Med-DualLoRA, has no final state, or did not
            leave ``newcomer`` out.
    """
    from medlora_lib.adapters import METHODS
    from medlora_lib.fl.federation import InProcessSites, run_rounds
    from medlora_lib.fl.result import build_result
    from medlora_lib.fl.simulate import plan
    from medlora_lib.fl.sites import load_options, load_site
    from medlora_lib.fl.task import ClientRuntime

    cfg: ExperimentConfig = federation.config
    if not METHODS[cfg.method].has_local_adapter:
        with_local = [m for m, s in METHODS.items() if s.has_local_adapter]
        raise ConfigError(
            f"join_new_site: the federation ran {cfg.method!r}; a site can join with its "
            f"own local adapter only on a federation of a method that has one "
            f"({', '.join(with_local)})"
        )
    if newcomer not in cfg.fed.exclude:
        raise ConfigError(
            f"join_new_site: {newcomer!r} took part in the federation; run the "
            f"federation with `fed.exclude=[{newcomer!r}]` first"
        )
    if not federation.final_shared:
        raise ConfigError(
            "join_new_site: the federation's result holds no final global state "
            "(final_shared); rerun it with medlora_lib.fl.simulate"
        )
    join_cfg = dataclasses.replace(cfg, fed=dataclasses.replace(cfg.fed, exclude=()))
    (p,) = plan([join_cfg], use_cache=False, scratch=Path("."))
    if newcomer not in p.sites:
        raise ConfigError(
            f"join_new_site: {newcomer!r} is not a site of {p.data_dir} "
            f"(sites: {p.sites})"
        )
    t0 = time.perf_counter()
    data = {newcomer: load_site(p.data_dir, newcomer, **load_options(cfg))}
    rt = ClientRuntime.build(join_cfg, data, newcomer, data_key=str(p.data_dir))
    frozen = []
    for name, param in rt.model.named_parameters():
        if _is_global_lora(name):
            param.requires_grad_(False)
            frozen.append(name)
    if not frozen:
        raise ConfigError("join_new_site: the model has no global adapter to freeze")
    start = {k: v.clone() for k, v in federation.final_shared.items()}
    zero_shot = rt.evaluate_round(start, None)[newcomer]
    # one site, no server: each round's "aggregate" is the site's own new state (its
    # head trains; the frozen global adapter comes back unchanged)
    sites = InProcessSites({newcomer: rt}, federated=False)
    out = run_rounds(
        sites, join_cfg, start, label=f"join {newcomer}", verbose=verbose, min_sites=1
    )
    shared = out["final_shared"]
    changed = [
        k
        for k, v in federation.final_shared.items()
        if _is_global_lora(k) and not torch.equal(v, shared[k])
    ]
    if changed:
        raise RuntimeError(
            f"join_new_site: the frozen global adapter changed: {changed}"
        )
    result = build_result(
        join_cfg,
        out["rows"],
        time.perf_counter() - t0,
        exp_id=f"join-{newcomer}",
        runtime="inprocess",
        final_shared=shared,
    )
    return result, zero_shot


def join_new_sites(
    joins: list[tuple[Any, str]],
    verbose: bool = False,
    max_parallel: int | None = None,
) -> list[tuple[Any, dict[str, float]]]:
    """:func:`join_new_site` for each ``(federation, newcomer)`` of ``joins``, in worker
    processes where the cores allow (chapter ``07_beyond_the_paper``'s 12 joins; the rule
    of :func:`medlora_lib.fl.simulate.worker_count`: ``cpu``-profile joins on a CPU,
    ``max_parallel`` caps it, 1 = one after the other in this process). Each join seeds
    itself and sets its own thread count, so the numbers are those of the one-process
    loop (tested).

    Returns:
        ``(result, zero_shot)`` per join, in the order of ``joins``.

    Raises:
        ConfigError: as :func:`join_new_site` (raised here again from a worker).
    """
    from medlora_lib.fl.simulate import map_in_workers, worker_count

    joins = list(joins)
    workers = worker_count([fed.config for fed, _ in joins], max_parallel)
    if verbose and workers > 1:
        print(f"[join] {len(joins)} joins in {workers} worker processes")
    return map_in_workers(
        "medlora_lib.fl.newsite:join_new_site",
        [(fed, v, verbose) for fed, v in joins],
        workers,
    )
