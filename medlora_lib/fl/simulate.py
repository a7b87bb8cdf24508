"""Run experiments: ``simulate(config) -> RunResult`` (the one entry for every method).

Chapters ``notebooks/02_single_site_baseline``, ``03_fedavg_lora`` and ``04_med_dual_lora``.

* Federated methods (``fedavg_lora``, ``ffa_lora``, ``fedsa_lora``, ``fedprox_lora``,
  ``med_dual_lora``) run in Flower's Simulation Runtime (``flwr.simulation.run_simulation``,
  Ray backend): the ``ClientApp`` of :mod:`medlora_lib.fl.client_app` on one virtual
  SuperNode per vendor and the ``ServerApp`` of :mod:`medlora_lib.fl.server_app`. Several
  configs passed together run inside **one** simulation (Ray starts once).
* ``local`` (each vendor alone) and ``centralized`` (pooled data; a reference) run
  in-process — no server, nothing to send — through the same :class:`ClientRuntime`, the
  same rounds × local epochs, the same evaluation and selection.

Every method is evaluated the same way: after every round each client evaluates *its own
deployed model* (what it would use: received global + its private part) on its val and test
splits. The selected round of a client is the best ``train.selection_metric`` on its **val**
split (ties: the earlier round; NaN never wins); only then are its test metrics at that round
read. Test metrics per round are kept for learning curves only.

Results are cached under ``default_cache_dir()/runs/`` by config (``use_cache=True``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medlora_lib.config import ExperimentConfig, config_hash, default_cache_dir
from medlora_lib.errors import ConfigError
from medlora_lib.fl.task import (
    FEDERATED_METHODS,
    ClientRuntime,
    ExperimentSpec,
    build_adapted_model,
    client_names,
    validate_config,
)
from medlora_lib.metrics import METRIC_NAMES

__all__ = [
    "RunResult",
    "simulate",
    "run_inprocess",
    "prepare_specs",
    "build_result",
    "cache_path",
    "DEFAULT_BACKEND_CONFIG",
    "default_backend_config",
    "select_rounds",
    "steady_seconds_per_round",
]

CACHE_VERSION = 2  # 2: final_shared.safetensors; fused evaluation
DEFAULT_BACKEND_CONFIG: dict[str, Any] = {
    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    "init_args": {"num_cpus": 2},
}


# ------------------------------------------------------------------------------ result
@dataclass
class RunResult:
    """One experiment's results.

    Attributes:
        config: the experiment's config.
        provenance: commit, versions, device, time (``results.provenance``).
        rounds: one row per round × client (train loss, bytes, val / test metrics, and
            ``global_only_*`` columns for methods with a local adapter).
        final: per client (+ ``mean`` and ``pooled``) test metrics at the selected round
            (``at="selected"``) and at the last round (``at="final"``), for the deployed
            model (``variant="deployed"``) and, for Med-DualLoRA, the global-only model.
        comm: bytes per round measured from the messages next to the closed form.
        seconds: wall time of the experiment.
        failures: clients that raised (round, phase, partition, reason).
        messages: summaries of every message (only with ``record_messages=True``).
    """

    config: ExperimentConfig
    provenance: dict[str, Any]
    rounds: pd.DataFrame
    final: pd.DataFrame
    comm: dict[str, Any]
    seconds: float
    failures: list[dict[str, Any]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    exp_id: str = ""
    final_shared: dict[str, torch.Tensor] | None = None

    @property
    def method(self) -> str:
        return self.config.method

    def seconds_per_round(self) -> float:
        """Steady-state seconds per round (:func:`steady_seconds_per_round`)."""
        return steady_seconds_per_round(self.rounds)

    def selected(self, variant: str = "deployed") -> pd.DataFrame:
        """Test metrics per client at the validation-selected round."""
        f = self.final
        return f[(f["variant"] == variant) & (f["at"] == "selected")].reset_index(
            drop=True
        )

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "exp_id": self.exp_id,
            "method": self.method,
            "config": self.config.to_dict(),
            "provenance": self.provenance,
            "final": json.loads(self.final.to_json(orient="records")),
            "comm": self.comm,
            "seconds": self.seconds,
            "failures": self.failures,
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write ``results.json`` and ``rounds.csv`` into ``out_dir``; return it."""
        from medlora_lib.results import write_json, write_table

        out = Path(out_dir)
        write_json(out / "results.json", self.to_json_dict())
        write_table(out / "rounds.csv", self.rounds)
        if self.final_shared:
            from safetensors.torch import save_file

            tmp = out / "final_shared.safetensors.tmp"
            save_file(
                {
                    k: v.detach().cpu().contiguous()
                    for k, v in self.final_shared.items()
                },
                str(tmp),
            )
            tmp.replace(out / "final_shared.safetensors")
        return out

    @classmethod
    def load(cls, out_dir: str | Path) -> RunResult:
        """Read a result written by :meth:`save`."""
        from medlora_lib.results import read_json

        out = Path(out_dir)
        d = read_json(out / "results.json")
        state = None
        if (out / "final_shared.safetensors").exists():
            from safetensors.torch import load_file

            state = load_file(str(out / "final_shared.safetensors"))
        return cls(
            config=ExperimentConfig.from_dict(d["config"]),
            provenance=d["provenance"],
            rounds=pd.read_csv(out / "rounds.csv"),
            final=pd.DataFrame(d["final"]),
            comm=d["comm"],
            seconds=float(d["seconds"]),
            failures=d.get("failures", []),
            exp_id=d.get("exp_id", ""),
            final_shared=state,
        )


def steady_seconds_per_round(rounds: pd.DataFrame) -> float:
    """Median wall-clock seconds between consecutive rounds of per-round rows.

    Round 1 also pays one-off costs (a simulation's actors importing torch, the prefix
    cache), so it is left out; with a single round its time is returned.
    """
    if "elapsed_s" not in rounds or rounds["elapsed_s"].isna().all():
        return float("nan")
    el = rounds.groupby("round")["elapsed_s"].max().sort_index()
    d = el.diff().dropna()
    return float(d.median()) if len(d) else float(el.iloc[0])


# ------------------------------------------------------------------------------ assembly
def _pooled(rows: pd.DataFrame, prefix: str) -> dict[str, float]:
    tp, tn, fp, fn = (
        float(rows[f"{prefix}test_{k}"].sum()) for k in ("tp", "tn", "fp", "fn")
    )
    pos, neg = tp + fn, tn + fp
    nan = float("nan")
    sens = tp / pos if pos else nan
    spec = tn / neg if neg else nan
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return {
        "balanced_accuracy": (sens + spec) / 2 if pos and neg else nan,
        "sensitivity": sens,
        "specificity": spec,
        "auc": nan,  # needs per-subject scores, which do not leave the sites
        "f1": 2 * tp / (2 * tp + fp + fn) if pos else nan,
        "mcc": (tp * tn - fp * fn) / denom if denom else (0.0 if pos and neg else nan),
        "accuracy": (tp + tn) / (pos + neg) if pos + neg else nan,
        "n": pos + neg,
        "n_pos": pos,
        "n_neg": neg,
    }


def _notes(n_pos: float, n_neg: float) -> str:
    if n_pos and not n_neg:
        return "no healthy subjects: balanced accuracy, AUC and MCC need both classes"
    if n_neg and not n_pos:
        return "no diseased subjects: balanced accuracy, AUC and MCC need both classes"
    return ""


def select_rounds(
    rounds: pd.DataFrame, metric: str, prefix: str = ""
) -> dict[str, int]:
    """Per client, the round with the best validation ``metric`` (val only; ties: earlier)."""
    out = {}
    col = f"{prefix}val_{metric}"
    for client, g in rounds.groupby("client", sort=False):
        g = g.sort_values("round")
        if col in g and g[col].notna().any():
            out[client] = int(g.loc[g[col].idxmax(), "round"])
        else:
            out[client] = int(g["round"].max())
    return out


def build_result(
    cfg: ExperimentConfig,
    rows: list[dict[str, Any]],
    seconds: float,
    failures: list[dict[str, Any]] | None = None,
    messages: list[dict[str, Any]] | None = None,
    exp_id: str = "",
    runtime: str = "simulation",
    final_shared: dict[str, torch.Tensor] | None = None,
) -> RunResult:
    """Assemble a :class:`RunResult` from per-round × per-client rows (any runtime)."""
    from medlora_lib.comm import closed_form_bytes
    from medlora_lib.results import provenance

    rounds = pd.DataFrame(rows)
    rounds.insert(0, "method", cfg.method)
    rounds.insert(1, "seed", cfg.seed)
    final_rows = []
    variants = [("deployed", "")]
    if "global_only_test_balanced_accuracy" in rounds:
        variants.append(("global_only", "global_only_"))
    last = int(rounds["round"].max()) if len(rounds) else 0
    for variant, prefix in variants:
        chosen = select_rounds(rounds, cfg.train.selection_metric, prefix)
        for at in ("selected", "final"):
            picked = []
            for client, g in rounds.groupby("client", sort=False):
                rnd = chosen[client] if at == "selected" else last
                r = g[g["round"] == rnd]
                if (
                    r.empty
                    or f"{prefix}test_n" not in r
                    or r[f"{prefix}test_n"].isna().all()
                ):
                    continue
                r = r.iloc[0]
                picked.append(r)
                row = {
                    "method": cfg.method,
                    "seed": cfg.seed,
                    "client": client,
                    "variant": variant,
                    "at": at,
                    "round": rnd,
                    f"val_{cfg.train.selection_metric}": r.get(
                        f"{prefix}val_{cfg.train.selection_metric}", float("nan")
                    ),
                }
                for k in (*METRIC_NAMES, "n", "n_pos", "n_neg"):
                    row[k] = float(r[f"{prefix}test_{k}"])
                row["notes"] = _notes(row["n_pos"], row["n_neg"])
                final_rows.append(row)
            if picked:
                df = pd.DataFrame(picked)
                mean = {
                    k: float(np.nanmean(df[f"{prefix}test_{k}"].astype(float)))
                    if df[f"{prefix}test_{k}"].notna().any()
                    else float("nan")
                    for k in METRIC_NAMES
                }
                base = {
                    "method": cfg.method,
                    "seed": cfg.seed,
                    "variant": variant,
                    "at": at,
                }
                final_rows.append(
                    {
                        **base,
                        "client": "mean",
                        "round": -1,
                        **mean,
                        "notes": "mean over clients",
                    }
                )
                pooled = _pooled(df, prefix)
                final_rows.append(
                    {
                        **base,
                        "client": "pooled",
                        "round": -1,
                        **pooled,
                        "notes": "from pooled confusion counts; AUC needs per-subject scores",
                    }
                )
    final = pd.DataFrame(final_rows)
    cf = closed_form_bytes(cfg)
    comm: dict[str, Any] = {"closed_form": cf}
    if "bytes_up" in rounds:
        up = rounds["bytes_up"].dropna().astype(int)
        down = rounds["bytes_down"].dropna().astype(int)
        comm.update(
            {
                "bytes_up_per_client_round": sorted(set(up.tolist())),
                "bytes_down_per_client_round": sorted(set(down.tolist())),
                "total_bytes_up": int(up.sum()),
                "total_bytes_down": int(down.sum())
                + int(
                    rounds.get("bytes_down_eval", pd.Series(dtype=float))
                    .fillna(0)
                    .sum()
                ),
                "wire_bytes_up_per_client_round": sorted(
                    set(rounds["wire_bytes_up"].dropna().astype(int).tolist())
                )
                if "wire_bytes_up" in rounds
                else [],
                "matches_closed_form": bool(
                    set(up.tolist()) <= {cf["shared_bytes"]}
                    and set(down.tolist()) <= {cf["shared_bytes"]}
                ),
            }
        )
    else:
        comm.update(
            {
                "bytes_up_per_client_round": [0],
                "bytes_down_per_client_round": [0],
                "total_bytes_up": 0,
                "total_bytes_down": 0,
                "matches_closed_form": cf["shared_bytes"] == 0
                or cfg.method == "centralized",
            }
        )
    prov = provenance({"seed": cfg.seed, "runtime": runtime, "exp_id": exp_id})
    return RunResult(
        config=cfg,
        provenance=prov,
        rounds=rounds,
        final=final,
        comm=comm,
        seconds=float(seconds),
        failures=list(failures or []),
        messages=list(messages or []),
        exp_id=exp_id,
        final_shared=final_shared,
    )


# ------------------------------------------------------------------------------ specs
def _weights_fingerprint(cfg: ExperimentConfig) -> str:
    p = cfg.model.pretrained
    if p == "none":
        return "none"
    path = None
    if p == "small":
        from medlora_lib.models.checkpoint import SMALL_FM_PATH

        path = SMALL_FM_PATH
    elif p != "hub":
        path = Path(p).expanduser()
    if path is not None and path.exists():
        st = path.stat()
        return f"{p}:{_file_digest(str(path.resolve()), st.st_size, st.st_mtime_ns)}"
    return p


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a weights file (content, not time stamps: a fresh clone or a copy of
    the same weights hits the same cached runs); memoised per file version."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


#: Library sources whose code decides a run's numbers: a change to any of them makes
#: earlier cached runs stale (they are then recomputed, never silently reused).
_RESULT_CODE = (
    "adapters.py",
    "metrics.py",
    "pipeline.py",
    "train.py",
    "data/dataset.py",
    "fl/client_app.py",
    "fl/strategies.py",
    "fl/task.py",
    "models/convvit.py",
    "models/prefix_cache.py",
)


@functools.lru_cache(maxsize=1)
def _code_fingerprint() -> str:
    """Hash of :data:`_RESULT_CODE`, read once per process: the code this process runs
    was imported from those files, so one read per cache key would only repeat it."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for rel in _RESULT_CODE:
        h.update(rel.encode())
        h.update((root / rel).read_bytes())
    return h.hexdigest()[:12]


def cache_path(cfg: ExperimentConfig, data_dir: str | Path) -> Path:
    """Where ``simulate(..., use_cache=True)`` keeps the result of ``cfg``.

    The key holds the config, the data folder, the weights file and a fingerprint of
    the library code that computes a run (:data:`_RESULT_CODE`), so a code change never
    serves a stale cached result.
    """
    key = {
        "config": cfg.to_dict(),
        "data_dir": str(data_dir),
        "weights": _weights_fingerprint(cfg),
        "code": _code_fingerprint(),
        "version": CACHE_VERSION,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return default_cache_dir() / "runs" / f"{cfg.method}-{config_hash(cfg, 6)}-{digest}"


def prepare_specs(
    configs: list[ExperimentConfig],
    inject_failure: dict[str, Any] | None = None,
) -> list[ExperimentSpec]:
    """Validate every config (ConfigError / DataError before anything starts) → specs."""
    from medlora_lib.pipeline import resolve_data_dir

    specs = []
    for i, cfg in enumerate(configs):
        if not isinstance(cfg, ExperimentConfig):
            raise ConfigError(
                f"simulate: expected an ExperimentConfig (get_config(...)), got {type(cfg).__name__}"
            )
        validate_config(cfg)
        data_dir = resolve_data_dir(cfg, verbose=False)
        names = client_names(data_dir, cfg.fed.clients)
        unknown = [c for c in cfg.fed.exclude if c not in names]
        if unknown:
            raise ConfigError(
                f"config field `fed.exclude`: {unknown} are not clients of {data_dir} "
                f"(clients: {names})"
            )
        names = [n for n in names if n not in cfg.fed.exclude]
        if len(names) < 1:
            raise ConfigError(
                f"{data_dir}: no client left to train (the manifest lists none, or "
                "`fed.exclude` removes them all)"
            )
        exp_id = f"{i}-{cfg.method}-s{cfg.seed}-{config_hash(cfg, 6)}"
        fail = None
        if inject_failure and inject_failure.get("experiment", i) == i:
            fail = {k: v for k, v in inject_failure.items() if k != "experiment"}
        specs.append(
            ExperimentSpec(
                exp_id=exp_id,
                config=cfg.to_dict(),
                data_dir=str(Path(data_dir).resolve()),
                clients=names,
                fail=fail,
            )
        )
    return specs


# ------------------------------------------------------------------------------ in-process
def run_inprocess(
    spec: ExperimentSpec, verbose: bool = True, return_state: bool = False
) -> Any:
    """The plain in-process loop (no Flower) for any method; returns rows and seconds.

    With ``return_state=True`` also the final shared state (the last aggregate; for
    ``centralized`` the pooled model's trainable shared tensors).

    ``local`` and ``centralized`` always run here. For a federated method it runs the same
    training and sample-weighted aggregation as the Flower apps — the benchmark's reference
    for Flower's share of a run, and a cross-check (same seed, same numbers).
    """
    from medlora_lib.adapters import aggregate_shared, get_shared_state

    t0 = time.perf_counter()
    cfg = spec.cfg
    if spec.method == "centralized":
        runtimes = [ClientRuntime.build(spec, 0, train_names=list(spec.clients))]
    else:
        runtimes = [ClientRuntime.build(spec, p) for p in range(len(spec.clients))]
    shared = get_shared_state(build_adapted_model(cfg))
    private: list[dict[str, torch.Tensor] | None] = [None] * len(runtimes)
    federated = spec.method in FEDERATED_METHODS
    mu = cfg.fed.proximal_mu if spec.method == "fedprox_lora" else 0.0
    nbytes = sum(t.numel() * t.element_size() for t in shared.values())
    rows = []
    for rnd in range(1, cfg.fed.num_rounds + 1):
        outs = []
        for i, rt in enumerate(runtimes):
            out = rt.train_round(shared, private[i], rnd, proximal_mu=mu)
            private[i] = out.private
            outs.append(out)
        if federated:
            shared = aggregate_shared(
                [o.shared for o in outs], [o.num_examples for o in outs]
            )
        elif spec.method == "centralized":
            shared = outs[0].shared
        elapsed = time.perf_counter() - t0
        for i, rt in enumerate(runtimes):
            for name, m in rt.evaluate_round(shared, private[i]).items():
                part = spec.clients.index(name)
                row = {
                    "round": rnd,
                    "partition": part,
                    "client": name,
                    "train_loss": outs[i].train_loss,
                    "num_examples": outs[i].num_examples,
                    "train_seconds": outs[i].seconds,
                }
                if federated:
                    # as the Flower apps: evaluation rides on the next train message,
                    # only the last round downloads the global model for evaluation
                    row.update({"bytes_down": nbytes, "bytes_up": nbytes})
                    if rnd == cfg.fed.num_rounds:
                        row["bytes_down_eval"] = nbytes
                row.update(m)
                row["elapsed_s"] = elapsed
                rows.append(row)
                if verbose:
                    print(
                        f"[{spec.exp_id}] round {rnd}/{cfg.fed.num_rounds} {name:>8s}  "
                        f"loss {row['train_loss']:.4f}  val BA "
                        f"{row.get('val_balanced_accuracy', float('nan')):.3f}  ({elapsed:.1f} s)",
                        flush=True,
                    )
    rows.sort(key=lambda r: (r["round"], r["partition"]))
    if return_state:
        return rows, time.perf_counter() - t0, shared
    return rows, time.perf_counter() - t0


# ------------------------------------------------------------------------------ flower
def default_backend_config(specs: list[ExperimentSpec]) -> dict[str, Any]:
    """Ray resources: one CPU per client, as many clients at once as CPUs (≤ clients).

    With CUDA available (and ``train.device`` not ``cpu``) each client also gets a share
    of the GPU (two clients per GPU); without it the clients run on the CPU.
    """
    k = max(len(s.clients) for s in specs)
    cpus = max(1, min(os.cpu_count() or 1, k))
    gpus = 0.0
    if torch.cuda.is_available() and all(
        s.config["train"].get("device", "auto") != "cpu" for s in specs
    ):
        gpus = 0.5
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": gpus},
        "init_args": {"num_cpus": cpus, **({"num_gpus": 1} if gpus else {})},
    }


def _run_flower(
    specs: list[ExperimentSpec],
    record_messages: bool,
    verbose: bool,
    backend_config: dict[str, Any] | None,
) -> dict[str, dict[str, Any]]:
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from medlora_lib.fl.client_app import app as client_app
    from medlora_lib.fl.server_app import run_experiments

    outputs: dict[str, dict[str, Any]] = {}
    errors: list[BaseException] = []

    def sink(spec: ExperimentSpec, out: dict[str, Any]) -> None:
        outputs[spec.exp_id] = out

    server = ServerApp()

    @server.main()
    def _main(grid, context):  # noqa: ANN001
        try:
            run_experiments(grid, specs, record_messages, verbose, sink)
        except BaseException as exc:  # surfaced after the simulation returns
            errors.append(exc)
            raise

    num = max(len(s.clients) for s in specs)
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        run_simulation(
            server_app=server,
            client_app=client_app,
            num_supernodes=num,
            backend_config=backend_config or default_backend_config(specs),
        )
    finally:
        flwr_logger.setLevel(level)
    if errors:
        raise errors[0]
    missing = [s.exp_id for s in specs if s.exp_id not in outputs]
    if missing:
        raise RuntimeError(
            f"the Flower simulation ended without results for {missing}; see the log above"
        )
    return outputs


def simulate(
    config: ExperimentConfig | list[ExperimentConfig],
    *,
    use_cache: bool = False,
    verbose: bool = True,
    record_messages: bool = False,
    inject_failure: dict[str, Any] | None = None,
    backend_config: dict[str, Any] | None = None,
    runtime: str = "flower",
) -> RunResult | list[RunResult]:
    """Run one experiment, or several (methods × seeds) in one Flower simulation.

    Chapters ``notebooks/03_fedavg_lora`` and ``04_med_dual_lora``.

    Args:
        config: an :class:`ExperimentConfig` or a list of them.
        use_cache: reuse / store results under ``default_cache_dir()/runs`` by config.
        verbose: print progress (round, client, loss, val BA, elapsed).
        record_messages: keep a summary of every message (``RunResult.messages``).
        inject_failure: tests only: ``{"partition": p, "round": r, "phase": "train"}``
            makes that client raise (the run records it and goes on); with
            ``"experiment": i`` only the i-th config of the list is affected.
        backend_config: Flower's Ray backend config (default:
            :func:`default_backend_config`; :data:`DEFAULT_BACKEND_CONFIG` is the 2-CPU
            laptop setting).
        runtime: ``"flower"`` (default) or ``"inprocess"`` (the plain loop, no Flower;
            benchmarks and cross-checks).

    Returns:
        A :class:`RunResult`, or a list of them (same order) when given a list.

    Raises:
        ConfigError: unknown method or profile, no adapted block, rank <= 0, ...
        DataError: the data folder does not match its manifest or the config.
    """
    single = isinstance(config, ExperimentConfig)
    configs = [config] if single else list(config)
    if runtime not in ("flower", "inprocess"):
        raise ConfigError(f"simulate: runtime={runtime!r}; use 'flower' or 'inprocess'")
    specs = prepare_specs(configs, inject_failure)
    cacheable = use_cache and inject_failure is None and not record_messages
    results: dict[str, RunResult] = {}
    todo = []
    for cfg, spec in zip(configs, specs, strict=True):
        path = cache_path(cfg, spec.data_dir)
        if cacheable and (path / "results.json").exists():
            if verbose:
                print(f"[{spec.exp_id}] cached: {path}")
            results[spec.exp_id] = RunResult.load(path)
        else:
            todo.append((cfg, spec))
    flower = [
        (c, s) for c, s in todo if c.method in FEDERATED_METHODS and runtime == "flower"
    ]
    local = [(c, s) for c, s in todo if (c, s) not in flower]
    for cfg, spec in local:
        rows, secs, state = run_inprocess(spec, verbose, return_state=True)
        results[spec.exp_id] = build_result(
            cfg,
            rows,
            secs,
            exp_id=spec.exp_id,
            runtime="inprocess",
            final_shared=state if cfg.method != "local" else None,
        )
    if flower:
        # one simulation per number of clients (a SuperNode per client, none idle)
        outs: dict[str, dict[str, Any]] = {}
        for k in sorted({len(s.clients) for _, s in flower}):
            group = [s for _, s in flower if len(s.clients) == k]
            outs.update(_run_flower(group, record_messages, verbose, backend_config))
        for cfg, spec in flower:
            o = outs[spec.exp_id]
            results[spec.exp_id] = build_result(
                cfg,
                o["rows"],
                o["seconds"],
                o["failures"],
                o["messages"],
                exp_id=spec.exp_id,
                runtime="flower-simulation",
                final_shared=o.get("final_shared"),
            )
    for cfg, spec in todo:
        if cacheable:
            results[spec.exp_id].save(cache_path(cfg, spec.data_dir))
    ordered = [results[s.exp_id] for s in specs]
    return ordered[0] if single else ordered
