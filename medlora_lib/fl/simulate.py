"""Run experiments: ``simulate(config) -> RunResult`` (the one entry for every method).

Chapters ``notebooks/02_single_site_baseline``, ``03_fedavg_lora`` and ``04_med_dual_lora``.

* Federated methods run as ``flwr run <project> --run-config … --federation-config
  "num-supernodes=K …"`` against a Simulation-Runtime SuperLink on loopback
  (:mod:`medlora_lib.fl.runner`): the project's own ``ServerApp`` / ``ClientApp``
  (:mod:`medlora_lib.fl.server_app`, :mod:`medlora_lib.fl.client_app`), one virtual
  SuperNode per site. Several configs passed together run inside **one** Flower run
  (``run.batch``; Ray starts once) — one run per number of sites.
* ``local`` (each site alone) and ``centralized`` (pooled data; a reference) run
  in-process — no server, nothing to send — through the same round loop
  (:func:`medlora_lib.fl.federation.run_rounds`), the same rounds × local epochs, the
  same evaluation and selection. Several of them at the ``cpu`` profile run in worker
  processes, one per core (:func:`inprocess_workers`), with the same numbers.

With ``use_cache=True`` every experiment's run folder is its cache entry
(:func:`medlora_lib.fl.runcache.cache_path`): a finished result is read back, an
interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medlora_lib.config import ExperimentConfig, RunOptions, config_hash, to_run_config
from medlora_lib.errors import ConfigError
from medlora_lib.fl.result import (
    RunResult,
    build_result,
    select_rounds,
    steady_seconds_per_round,
)
from medlora_lib.fl.runcache import cache_path
from medlora_lib.fl.task import (
    FEDERATED_METHODS,
    ClientRuntime,
    build_adapted_model,
    validate_config,
)

__all__ = [
    "RunResult",
    "Planned",
    "simulate",
    "plan",
    "run_inprocess",
    "inprocess_workers",
    "worker_count",
    "run_in_workers",
    "map_in_workers",
    "build_result",
    "cache_path",
    "select_rounds",
    "steady_seconds_per_round",
    "federation_config",
]


@dataclass
class Planned:
    """One validated experiment: its data folder, sites and run folder."""

    cfg: ExperimentConfig
    data_dir: Path
    sites: list[str]
    run_dir: Path
    label: str


def plan(
    configs: list[ExperimentConfig], use_cache: bool, scratch: Path
) -> list[Planned]:
    """Validate every config (ConfigError / DataError before anything starts)."""
    from medlora_lib.fl.sites import site_names
    from medlora_lib.pipeline import resolve_data_dir

    out = []
    for i, cfg in enumerate(configs):
        if not isinstance(cfg, ExperimentConfig):
            raise ConfigError(
                "simulate: expected an ExperimentConfig (get_config(...)), got "
                f"{type(cfg).__name__}"
            )
        validate_config(cfg)
        if cfg.model.pretrained != "none":  # missing weights: in seconds, not in Flower
            from medlora_lib.models.checkpoint import resolve_weights

            resolve_weights(cfg.model.pretrained)
        data_dir = resolve_data_dir(cfg, verbose=False)
        from medlora_lib.data.manifest import read_manifest

        manifest = read_manifest(data_dir)  # every listed array exists
        names = site_names(data_dir, cfg.fed.partition_by)
        from medlora_lib.errors import DataError
        from medlora_lib.fl.sites import site_of

        train = manifest[manifest["split"] == "train"]
        has_train = set(site_of(train, cfg.fed.partition_by))
        empty = [n for n in names if n not in has_train and n not in cfg.fed.exclude]
        if empty:
            raise DataError(
                f"{data_dir / 'manifest.csv'}: site(s) {empty} have no training "
                "subjects; re-split the data (medlora prepare ... --overwrite) or leave "
                f"them out with fed.exclude={empty}"
            )
        unknown = [c for c in cfg.fed.exclude if c not in names]
        if unknown:
            raise ConfigError(
                f"config field `fed.exclude`: {unknown} are not sites of {data_dir} "
                f"under fed.partition_by={cfg.fed.partition_by!r} (sites: {names})"
            )
        names = [n for n in names if n not in cfg.fed.exclude]
        if not names:
            raise ConfigError(
                f"{data_dir}: no site left to train (the manifest lists none, or "
                "`fed.exclude` removes them all)"
            )
        from medlora_lib.adapters import METHODS

        if METHODS[cfg.method].federated and len(names) < cfg.fed.min_sites:
            raise ConfigError(
                f"{data_dir} holds {len(names)} site(s) ({', '.join(names)}) but "
                f"fed.min_sites={cfg.fed.min_sites}; a federation needs at least that "
                "many (lower fed.min_sites, or add sites)"
            )
        run_dir = (
            cache_path(cfg, data_dir) if use_cache else scratch / f"{i}-{cfg.method}"
        )
        label = f"{i}-{cfg.method}-s{cfg.seed}-{config_hash(cfg, 6)}"
        out.append(Planned(cfg, data_dir, names, run_dir, label))
    return out


def run_inprocess(p: Planned, verbose: bool = False) -> RunResult:
    """The plain in-process loop (no Flower) for any method.

    ``local`` and ``centralized`` always run here. For a federated method it runs the
    same training and sample-weighted aggregation as the Flower apps — the benchmark's
    reference for Flower's share of a run, and a cross-check (same seed, same numbers).
    """
    from medlora_lib.adapters import METHODS, get_shared_state
    from medlora_lib.fl.federation import run_in_process
    from medlora_lib.fl.sites import load_options, load_sites
    from medlora_lib.fl.task import trim_caches

    cfg = p.cfg
    data = load_sites(p.data_dir, p.sites, **load_options(cfg))
    key = str(p.data_dir)
    if METHODS[cfg.method].pooled:
        runtimes = {"pooled": ClientRuntime.build(cfg, data, None, data_key=key)}
    else:
        runtimes = {s: ClientRuntime.build(cfg, data, s, data_key=key) for s in p.sites}
    # the runtimes hold what they use; the rest of the loaded arrays (the pooled
    # copies' originals, or arrays replaced by the prefix cache) can go
    del data
    initial = get_shared_state(build_adapted_model(cfg))
    out = run_in_process(cfg, runtimes, initial, verbose=verbose, label=p.label)
    # this experiment's models and arrays go with it; its prefix-cache entries stay
    # within MEDLORA_SITE_CACHE_GB for a later experiment with the same prefix
    del runtimes
    trim_caches()
    return build_result(
        cfg,
        out["rows"],
        out["seconds"],
        out["failures"],
        exp_id=p.label,
        runtime="inprocess",
        final_shared=out["final_shared"]
        if METHODS[cfg.method].shared_parts or METHODS[cfg.method].pooled
        else None,
    )


def federation_config(
    num_sites: int, configs: list[ExperimentConfig], max_parallel: int | None = None
) -> str:
    """``--federation-config`` for ``num_sites`` virtual SuperNodes on this machine.

    One CPU per site, as many sites at once as CPUs (or ``max_parallel``); with CUDA
    available (and ``train.device`` not ``cpu``) two sites share each GPU.
    """
    cpus = max(1, min(os.cpu_count() or 1, num_sites, max_parallel or num_sites))
    gpus = 0.0
    if torch.cuda.is_available() and all(c.train.device != "cpu" for c in configs):
        gpus = 0.5
    parts = [
        f"num-supernodes={num_sites}",
        "client-resources-num-cpus=1",
        f"client-resources-num-gpus={gpus}",
        f"init-args-num-cpus={cpus}",
    ]
    if gpus:
        parts.append("init-args-num-gpus=1")
    return " ".join(parts)


def _run_flower(
    group: list[Planned],
    scratch: Path,
    record_messages: bool,
    verbose: bool,
    app_dir: Path | None,
    max_parallel: int | None = None,
) -> None:
    from medlora_lib.fl.runner import LoopbackSuperLink, flwr_run, write_run_config

    items = []
    for p in group:
        opts = RunOptions(dir=str(p.run_dir), record_messages=record_messages)
        items.append(to_run_config(p.cfg, opts))
    base = dict(items[0])
    if len(items) > 1:
        base["run.batch"] = json.dumps(items)
    work = scratch / f"flower-{uuid.uuid4().hex[:6]}"
    rc = write_run_config(work / "run-config.toml", base)
    with LoopbackSuperLink(work, simulation=True) as link:
        status = flwr_run(
            link,
            rc,
            federation_config(
                len(group[0].sites), [p.cfg for p in group], max_parallel
            ),
            app_dir=app_dir,
            log=work / "flwr-run.log",
            verbose=verbose,
        )
    missing = [p for p in group if not (p.run_dir / "results.json").exists()]
    if missing:
        from medlora_lib.fl.runner import DeploymentError, _tail

        raise DeploymentError(
            f"the Flower run (exit status {status}) ended without a result for "
            f"{[p.label for p in missing]}; its log ({work / 'flwr-run.log'}) ends:\n"
            + _tail(work / "flwr-run.log", 4000)
        )


def inprocess_workers(planned: list[Planned], max_parallel: int | None = None) -> int:
    """How many processes run ``planned`` (all in-process experiments) at once.

    Chapters ``02_single_site_baseline`` and ``03_fedavg_lora``: their ``local`` and
    ``centralized`` runs would otherwise use one core of the two while the other idles.
    More than one only for several ``cpu``-profile experiments on a CPU device: a worker
    process costs a few seconds to start (torch and the library imported), more than a
    ``smoke`` run lasts, and on a GPU (the ``paper`` profile) one process already keeps
    the device busy and a second would double the host memory. ``max_parallel`` caps it
    (1 = one after the other, in this process).
    """
    return worker_count([p.cfg for p in planned], max_parallel)


def worker_count(
    configs: list[ExperimentConfig], max_parallel: int | None = None
) -> int:
    """:func:`inprocess_workers`'s rule for any in-process jobs, one per config (an
    experiment, or chapter 07's join of a new site, ``fl.newsite.join_new_sites``)."""
    from medlora_lib.train import resolve_device

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    limit = min(len(configs), cores, max_parallel or cores)
    if limit < 2:
        return 1
    if any(
        c.profile != "cpu" or resolve_device(c.train.device).type != "cpu"
        for c in configs
    ):
        return 1
    return limit


def run_in_workers(chunks: list[list[Any]]) -> None:
    """Run each chunk of jobs in its own worker process
    (:mod:`medlora_lib.fl.inprocess_worker`: a :class:`Planned` experiment saves its
    result to its run folder, a :class:`~medlora_lib.fl.inprocess_worker.WorkerCall`
    pickles its return value to its ``out`` file) and wait for all. A job's error is
    raised here again, with its type; an error or Ctrl-C stops every worker."""
    import pickle
    import subprocess
    import sys

    from medlora_lib.config import default_cache_dir

    default_cache_dir().mkdir(parents=True, exist_ok=True)
    jobs = Path(tempfile.mkdtemp(prefix="medlora-inprocess-", dir=default_cache_dir()))
    # the workers import this very library, installed or not (a script's sys.path)
    here = str(Path(__file__).resolve().parents[2])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [here, *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
    }
    procs: list[tuple[Path, subprocess.Popen]] = []
    try:
        for k, chunk in enumerate(chunks):
            job = jobs / f"worker-{k}.pkl"
            job.write_bytes(pickle.dumps(chunk))
            cmd = [sys.executable, "-m", "medlora_lib.fl.inprocess_worker", str(job)]
            procs.append((job, subprocess.Popen(cmd, env=env)))
        for job, proc in procs:
            if proc.wait() != 0:
                err = job.with_suffix(".err")
                if err.exists():
                    raise pickle.loads(err.read_bytes())
                raise RuntimeError(
                    f"simulate: an in-process worker exited with {proc.returncode} "
                    "(its output is above); run again with max_parallel=1 to run in "
                    "this process"
                )
    except BaseException:  # an error in a run, or Ctrl-C: stop every worker now
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        raise
    finally:
        shutil.rmtree(jobs, ignore_errors=True)


def map_in_workers(
    function: str, args_list: list[tuple[Any, ...]], workers: int
) -> list[Any]:
    """``function(*args)`` (``"module:name"``) for each ``args`` of ``args_list``, in
    ``workers`` worker processes (:func:`run_in_workers`, round robin) or, with
    ``workers <= 1``, one after the other in this process; the return values in the
    order of ``args_list``. Chapters 01 (the pooled calibration runs) and 07 (the joins
    of a new site)."""
    from medlora_lib.config import default_cache_dir
    from medlora_lib.fl.inprocess_worker import WorkerCall, read_call, resolve

    if workers <= 1:
        fn = resolve(function)
        return [fn(*args) for args in args_list]
    default_cache_dir().mkdir(parents=True, exist_ok=True)
    outs = Path(tempfile.mkdtemp(prefix="medlora-calls-", dir=default_cache_dir()))
    try:
        calls = [
            WorkerCall(function, tuple(args), outs / f"call-{i}.pkl")
            for i, args in enumerate(args_list)
        ]
        run_in_workers([calls[k::workers] for k in range(workers)])
        return [read_call(c) for c in calls]
    finally:
        shutil.rmtree(outs, ignore_errors=True)


def _run_inprocess_all(
    todo: list[tuple[int, Planned]],
    save: bool,
    verbose: bool,
    max_parallel: int | None,
) -> dict[int, RunResult]:
    """Run the in-process experiments, in this process or in a pool of worker processes
    (:func:`inprocess_workers`, :func:`run_in_workers`); the same numbers either way
    (each run seeds itself and sets its own thread count). A worker saves its results to
    their run folders (the cache entry, or a scratch folder) and this process reads them
    back; a run's error is raised here again. Ctrl-C or an error stops every worker."""
    workers = inprocess_workers([p for _, p in todo], max_parallel)
    out: dict[int, RunResult] = {}
    if workers <= 1:
        for i, p in todo:
            res = run_inprocess(p, verbose)
            if save:
                res.save(p.run_dir)
            out[i] = res
        return out
    if verbose:
        print(f"[simulate] {len(todo)} in-process runs in {workers} worker processes")
    # round robin: experiments of one kind cost alike
    run_in_workers([[p for _, p in todo[k::workers]] for k in range(workers)])
    for i, p in todo:
        out[i] = RunResult.load(p.run_dir)
        if verbose:
            print(f"[{p.label}] done: {p.run_dir}")
    return out


def simulate(
    config: ExperimentConfig | list[ExperimentConfig],
    *,
    use_cache: bool = False,
    verbose: bool = True,
    record_messages: bool = False,
    runtime: str = "flower",
    app_dir: str | Path | None = None,
    max_parallel: int | None = None,
) -> RunResult | list[RunResult]:
    """Run one experiment, or several (methods × seeds) in one Flower run.

    Chapters ``notebooks/03_fedavg_lora`` and ``04_med_dual_lora``.

    Args:
        config: an :class:`ExperimentConfig` or a list of them.
        use_cache: keep every run folder under ``default_cache_dir()/runs`` by config:
            a finished result is read back, an interrupted one resumes.
        verbose: print progress (round, site, loss, val BA, elapsed) and Flower's log.
        record_messages: keep a summary of every message (``RunResult.messages``).
        runtime: ``"flower"`` (default) or ``"inprocess"`` (the plain loop, no Flower;
            benchmarks and cross-checks).
        app_dir: another Flower App folder (tests: a ClientApp that fails on purpose);
            default the project.
        max_parallel: at most this many sites train at once (default: one per CPU);
            for the in-process runs, at most this many worker processes
            (:func:`inprocess_workers`; 1 = in this process).

    Returns:
        A :class:`RunResult`, or a list of them (same order) when given a list.

    Raises:
        ConfigError: unknown method or profile, no adapted block, rank <= 0, ...
        DataError: the data folder does not match its manifest or the config.
        DeploymentError: the Flower run failed (the message quotes its log).
    """
    single = isinstance(config, ExperimentConfig)
    configs = [config] if single else list(config)
    if runtime not in ("flower", "inprocess"):
        raise ConfigError(f"simulate: runtime={runtime!r}; use 'flower' or 'inprocess'")
    if runtime == "inprocess":
        private = [c for c in configs if c.privacy.active]
        if private:
            raise ConfigError(
                "simulate: runtime='inprocess' has no server strategy, mods or "
                "messages, so privacy.site_dp / privacy.dp_sgd / privacy.secagg cannot "
                f"apply (experiment {private[0].method} s{private[0].seed}); use "
                "runtime='flower'"
            )
    from medlora_lib.config import default_cache_dir

    default_cache_dir().mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="medlora-run-", dir=default_cache_dir()))
    try:
        planned = plan(configs, use_cache and not record_messages, scratch)
        results: dict[int, RunResult] = {}
        flower: list[tuple[int, Planned]] = []
        inproc: list[tuple[int, Planned]] = []
        for i, p in enumerate(planned):
            if (
                use_cache
                and not record_messages
                and (p.run_dir / "results.json").exists()
            ):
                if verbose:
                    print(f"[{p.label}] cached: {p.run_dir}")
                results[i] = RunResult.load(p.run_dir)
            elif p.cfg.method in FEDERATED_METHODS and runtime == "flower":
                flower.append((i, p))
            else:
                inproc.append((i, p))
        results.update(
            _run_inprocess_all(
                inproc, use_cache and not record_messages, verbose, max_parallel
            )
        )
        for k in sorted({len(p.sites) for _, p in flower}):
            group = [p for _, p in flower if len(p.sites) == k]
            _run_flower(
                group,
                scratch,
                record_messages,
                verbose,
                Path(app_dir) if app_dir else None,
                max_parallel,
            )
        for i, p in flower:
            results[i] = RunResult.load(p.run_dir)
        ordered = [results[i] for i in range(len(planned))]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return ordered[0] if single else ordered
