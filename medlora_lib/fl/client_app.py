"""The Flower ``ClientApp``: one site (chapter ``notebooks/03_fedavg_lora``, ``book/deployment.md``).

What a site runs comes from two places and nowhere else:

* the **run config** (``context.run_config``, the flattened experiment of
  ``[tool.flwr.app.config]`` plus ``--run-config`` overrides): method, model, adapters,
  training — never a path the site opens in a deployment;
* the SuperNode's **node config**: ``data-path`` (the site's own prepared folder, one
  site only), ``state-dir`` (where its private state lives) and optionally
  ``model-path`` (a local weights file) and ``site-name``. In the Simulation Runtime a
  virtual SuperNode has only ``partition-id`` / ``num-partitions``: it is the
  ``partition-id``-th site of the run's data folder partitioned by
  ``fed.partition_by`` and loads only that site's arrays.

Messages carry the shared tensors (``arrays``), the round's config (``config``:
:data:`~medlora_lib.fl.strategies.ROUND_CONFIG_KEYS`, plus this site's own best
validation values so far, :data:`~medlora_lib.fl.strategies.TEST_ABOVE_KEYS`) and scalar
metrics — nothing else.
What must not leave the site (Med-DualLoRA's local adapter, FedSA-LoRA's B, a private
head) is written after every round under ``state-dir``
(:class:`~medlora_lib.fl.site_state.SiteStateStore`) and read back by the next message,
so a SuperNode that restarts continues where it stopped. A reply holds exactly the keys
of :func:`medlora_lib.adapters.get_shared_state` (checked before sending).

Handlers: ``query`` (the server asks which site this node is), ``train`` and
``evaluate``. In a deployment an error that reaches the server names the site and the
error type only; paths are replaced by ``<data-path>`` / ``<state-dir>`` so the server
cannot learn about a site's files from error texts (the full error is in the
SuperNode's log).
"""

from __future__ import annotations

import functools
import json
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from medlora_lib.config import experiment_of
from medlora_lib.errors import ConfigError, DataError
from medlora_lib.fl import trace
from medlora_lib.fl.mods import privacy_mod
from medlora_lib.fl.strategies import PREV_EVAL_PREFIX, TEST_ABOVE_KEYS

__all__ = ["app", "SiteContext", "site_context", "PREV_EVAL_PREFIX", "SiteError"]

NODE_KEYS = ("data-path", "state-dir", "model-path", "site-name")

app = ClientApp(mods=[privacy_mod])


class SiteError(RuntimeError):
    """What a site reports to the server when a step fails (paths removed)."""


@dataclass
class SiteContext:
    """Who this node is for one experiment: its site, data folder and state folder."""

    cfg: Any
    options: Any
    site: str  # "" when a simulated node has no site in this experiment
    data_path: Path | None
    state_dir: Path | None
    deployed: bool  # a real SuperNode (paths from its node config)
    num_sites: int = 0
    data_site: str = (
        ""  # the site's name in its folder's manifest (site-name may rename)
    )


_CONTEXTS: dict[str, SiteContext] = {}
#: site contexts a process keeps (least recently used dropped first)
_MAX_CONTEXTS = 64


def site_context(
    run_config: dict[str, Any], node_config: dict[str, Any], index: int
) -> SiteContext:
    """Resolve this node's site for experiment ``index`` (cached per process).

    Raises:
        ConfigError: a SuperNode without ``data-path`` / ``state-dir``, or a simulation
            with fewer virtual SuperNodes than sites.
        DataError: a ``data-path`` holding several sites or another image size.
    """
    key = json.dumps(
        [index, sorted(node_config.items()), sorted(run_config.items())], default=str
    )
    if key in _CONTEXTS:
        _CONTEXTS[key] = _CONTEXTS.pop(key)  # most recently used last
        return _CONTEXTS[key]
    from medlora_lib.fl.sites import folder_site, site_names

    cfg, options = experiment_of(run_config, index)
    if "data-path" in node_config or "state-dir" in node_config:
        missing = [
            k for k in ("data-path", "state-dir") if not str(node_config.get(k, ""))
        ]
        if missing:
            raise ConfigError(
                f"this SuperNode's node config has no {' / '.join(missing)}; start it "
                "with --node-config 'data-path=/path/to/site/prepared state-dir="
                "/path/to/site/state'"
            )
        data_path = Path(str(node_config["data-path"])).expanduser()
        if not (data_path / "manifest.csv").exists():
            raise DataError(
                f"data-path {data_path} holds no manifest.csv; prepare the site's data "
                "with `medlora prepare ...` (one site per folder)"
            )
        data_site = folder_site(data_path, cfg.fed.partition_by)
        site = str(node_config.get("site-name", "")) or data_site
        ctx = SiteContext(
            cfg=cfg,
            options=options,
            site=site if site not in cfg.fed.exclude else "",
            data_path=data_path,
            state_dir=Path(str(node_config["state-dir"])).expanduser(),
            deployed=True,
            data_site=data_site,
        )
    elif "partition-id" in node_config:
        from medlora_lib.pipeline import resolve_data_dir

        data_dir = resolve_data_dir(cfg, verbose=False)
        names = [
            s
            for s in site_names(data_dir, cfg.fed.partition_by)
            if s not in cfg.fed.exclude
        ]
        pid = int(node_config["partition-id"])
        nparts = int(node_config.get("num-partitions", 0) or 0)
        if nparts and nparts < len(names):
            raise ConfigError(
                f"the simulation has {nparts} virtual SuperNodes but {data_dir} holds "
                f"{len(names)} sites ({', '.join(names)}) under fed.partition_by="
                f"{cfg.fed.partition_by!r}; run it with --federation-config "
                f"'num-supernodes={len(names)}'"
            )
        site = names[pid] if pid < len(names) else ""
        root = Path(options.state_dir) if options.state_dir else None
        if root is None:
            from medlora_lib.fl.runcache import default_run_dir

            root = Path(options.dir or default_run_dir(cfg)) / "sites"
        ctx = SiteContext(
            cfg=cfg,
            options=options,
            site=site,
            data_path=data_dir,
            state_dir=root / site if site else None,
            deployed=False,
            num_sites=len(names),
            data_site=site,
        )
    else:
        raise ConfigError(
            "this SuperNode's node config names no data: start it with --node-config "
            "'data-path=/path/to/site/prepared state-dir=/path/to/site/state'"
        )
    if ctx.deployed and ctx.site:
        _refuse_server_paths(ctx, node_config)
    # a simulation process serves several sites in turn (virtual SuperNodes share the
    # Ray actors): keep each one's context, not only the last (resolving one reads the
    # data folder's manifest, ~40 ms a message at the cpu profile)
    while len(_CONTEXTS) >= _MAX_CONTEXTS:
        del _CONTEXTS[next(iter(_CONTEXTS))]
    _CONTEXTS[key] = ctx
    return ctx


def _refuse_server_paths(ctx: SiteContext, node_config: dict[str, Any]) -> None:
    """In a deployment, a site opens only files its own node config names."""
    import dataclasses

    p = ctx.cfg.model.pretrained
    if p not in ("small", "hub", "none"):
        local = str(node_config.get("model-path", ""))
        if not local:
            raise ConfigError(
                "the run asks for weights from a file (model.pretrained is a path); a "
                "site opens only files named in its node config: add model-path=/path/"
                "to/weights.safetensors to this SuperNode's --node-config"
            )
        ctx.cfg = dataclasses.replace(
            ctx.cfg, model=dataclasses.replace(ctx.cfg.model, pretrained=local)
        )
    elif p == "hub" and str(node_config.get("model-path", "")):
        # the site's own copy of the public checkpoint (no download at the site)
        ctx.cfg = dataclasses.replace(
            ctx.cfg,
            model=dataclasses.replace(
                ctx.cfg.model, pretrained=str(node_config["model-path"])
            ),
        )


def _runtime(ctx: SiteContext):
    from medlora_lib.config import config_hash
    from medlora_lib.fl.sites import load_options, load_site
    from medlora_lib.fl.task import ClientRuntime, get_runtime

    def build():
        # a SuperNode checks its own site (no server-side resolve_data_dir here)
        data = load_site(
            ctx.data_path,
            ctx.data_site or ctx.site,
            allow_single_class=ctx.cfg.fed.allow_single_class or not ctx.deployed,
            **load_options(ctx.cfg),
        )
        return ClientRuntime.build(
            ctx.cfg, {ctx.site: data}, ctx.site, data_key=str(ctx.data_path)
        )

    experiment = f"{config_hash(ctx.cfg)}|{ctx.cfg.model.pretrained}"
    return get_runtime(experiment, f"{ctx.site}|{ctx.data_path}", build)


def _store(ctx: SiteContext, run_key: str):
    from medlora_lib.config import config_hash
    from medlora_lib.fl.site_state import SiteStateStore

    store = SiteStateStore(ctx.state_dir, ctx.site)
    store.bind(run_key, ctx.cfg.to_dict(), config_hash(ctx.cfg))
    return store


def _scrub(text: str, ctx: SiteContext | None) -> str:
    if ctx is None or not ctx.deployed:
        return text
    model = ctx.cfg.model.pretrained
    model_path = Path(model) if model not in ("small", "hub", "none") else None
    for path, name in (
        (ctx.data_path, "<data-path>"),
        (ctx.state_dir, "<state-dir>"),
        (model_path, "<model-path>"),
    ):
        if path is not None:
            text = text.replace(str(path), name)
    return text.replace(str(Path.home()), "~")


def _guard(handler):
    """Run a handler; on failure log it here and send the server a scrubbed reason."""

    def wrapped(msg: Message, context: Context) -> Message:
        ctx = None
        t_enter = time.time()
        _SPENT.update(compute=0.0, state=0.0)
        try:
            cfg = msg.content["config"]
            ctx = site_context(
                dict(context.run_config),
                dict(context.node_config),
                int(cfg.get("experiment", 0)),
            )
            reply = handler(msg, context, ctx)
            if trace.trace_dir() is not None:
                trace.record(
                    "handler",
                    message_id=msg.metadata.message_id,
                    site=ctx.site,
                    t_enter=t_enter,
                    t_exit=time.time(),
                    compute_s=_SPENT["compute"],
                    state_s=_SPENT["state"],
                )
            return reply
        except Exception as exc:  # reported to the server as an error reply
            traceback.print_exc(file=sys.stderr)
            where = f"site {ctx.site}: " if ctx is not None and ctx.site else ""
            reason = _scrub(f"{where}{type(exc).__name__}: {exc}", ctx)
            if (
                ctx is not None
                and ctx.deployed
                and not isinstance(exc, ConfigError | DataError)
            ):
                reason = f"{where}{type(exc).__name__} (details in the SuperNode's log)"
            raise SiteError(reason) from None

    return functools.wraps(handler)(wrapped)


@app.query()
@_guard
def query(msg: Message, context: Context, ctx: SiteContext) -> Message:
    """Tell the server which site this node is in the experiment (``""``: none)."""
    n = 0
    if ctx.site:  # counted from the manifest: answering must not wait for the model
        from medlora_lib.data.manifest import read_manifest
        from medlora_lib.fl.sites import site_of

        m = read_manifest(ctx.data_path, check_files=False)
        n = int(
            (
                (site_of(m, ctx.cfg.fed.partition_by) == (ctx.data_site or ctx.site))
                & (m["split"] == "train")
            ).sum()
        )
    content = RecordDict(
        {
            "site": ConfigRecord({"site": ctx.site}),
            "metrics": MetricRecord({"num-examples": int(n)}),
        }
    )
    return Message(content=content, reply_to=msg)


def _selection(ctx: SiteContext, metrics: dict[str, float]) -> float | None:
    v = metrics.get(f"val_{ctx.cfg.train.selection_metric}")
    return None if v is None or v != v else float(v)


#: seconds of the message being handled spent on the model's own work (training,
#: evaluation) and on the site's state writes (reset by :func:`_guard`; the trace of
#: ``fl/trace.py`` and the train reply's ``state-seconds``)
_SPENT = {"compute": 0.0, "state": 0.0}


def reported_metrics(ctx: SiteContext, metrics: dict[str, float]) -> dict[str, float]:
    """What the site sends of its evaluation (``privacy.metrics``).

    ``full``: everything (val and test metrics, confusion counts); ``minimal``: the
    validation selection metric and the validation count only — the test metrics and
    confusion counts stay in the site's state folder (its ``last`` / ``best`` model
    records). ``auto``: ``minimal`` on a deployed SuperNode, ``full`` in simulation.
    """
    mode = ctx.cfg.privacy.metrics
    if mode == "auto":
        mode = "minimal" if ctx.deployed else "full"
    if mode == "full":
        return metrics
    keep = (f"val_{ctx.cfg.train.selection_metric}", "val_n")
    return {k: metrics[k] for k in keep if k in metrics}


def _test_above(ctx: SiteContext, cfg: Any) -> dict[str, dict[str, float]]:
    """The server's plan for this site's test split (:data:`TEST_ABOVE_KEYS` in the
    round's config): its best validation values of earlier rounds, per variant."""
    best = {p: float(cfg[k]) for p, k in TEST_ABOVE_KEYS.items() if k in cfg}
    return {ctx.site: best} if best else {}


def _evaluate_and_keep(
    ctx, rt, store, run_key, rnd, shared, private, cfg
) -> dict[str, float]:
    """Evaluate the deployed model; keep it as the site's last (and best) model.

    The test split is evaluated as the round's config plans (:func:`_test_above`):
    only when the validation value beats the site's best earlier round, or always
    when the config names none (the last round, ``train.test_every_round``).
    """
    t0 = time.perf_counter()
    metrics = rt.evaluate_round(shared, private, _test_above(ctx, cfg))[ctx.site]
    _SPENT["compute"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    current = private if private is not None else rt.initial_private
    meta = {
        "round": rnd,
        "metrics": metrics,
        "selection_metric": ctx.cfg.train.selection_metric,
    }
    value = _selection(ctx, metrics)
    meta["selection_value"] = value
    # the last model as tensors; the best one also with its local adapter in PEFT's
    # format (a PEFT save costs ~15 ms, the tensors ~2 ms: only when the best changes)
    store.save_deployed(run_key, "last", shared, current, meta)
    best = store.best_metric(run_key)
    if value is not None and (best is None or value > best):
        store.save_deployed(run_key, "best", shared, current, meta, rt.model)
    _SPENT["state"] += time.perf_counter() - t0
    return reported_metrics(ctx, metrics)


def _private_before(store, run_key: str, rnd: int, say: bool = False):
    got = store.load_before(run_key, rnd)
    if say:
        start = (
            "its initial state" if got is None else f"its saved state of round {got[0]}"
        )
        print(f"site {store.site}: round {rnd} starts from {start}", flush=True)
    return None if got is None else got[1]


def _step(msg: Message, ctx: SiteContext):
    """What a train or evaluate step starts from: the round's config, the site's model
    and data, its state store and the received shared tensors."""
    if not ctx.site:
        raise ConfigError("this node holds no site of the experiment")
    cfg = msg.content["config"]
    rnd, run_key = int(cfg["server-round"]), str(cfg["run-key"])
    rt = _runtime(ctx)
    store = _store(ctx, run_key)
    return cfg, rnd, run_key, rt, store, msg.content["arrays"].to_torch_state_dict()


@app.train()
@_guard
def train(msg: Message, context: Context, ctx: SiteContext) -> Message:
    """Load the global + private state, train locally, reply with the shared tensors only.

    With ``evaluate-first`` (rounds after the first) the site first evaluates the model
    it just received — the previous round's aggregate with its own private part — and
    adds those metrics under :data:`PREV_EVAL_PREFIX`. After training it writes its
    private state under ``state-dir`` before replying. With ``privacy.dp_sgd`` that
    state includes its DP-SGD accountant (restored from its newest saved round) and the
    reply one metric more, ``dp-epsilon`` (the ε its records have spent so far).
    """
    cfg, rnd, run_key, rt, store, shared = _step(msg, ctx)
    # a deployed site says in its log which state it continues from
    private = _private_before(store, run_key, rnd, say=ctx.deployed)
    prev: dict[str, float] = {}
    state_before = _SPENT["state"]
    if bool(cfg.get("evaluate-first", False)):
        ev = _evaluate_and_keep(ctx, rt, store, run_key, rnd - 1, shared, private, cfg)
        prev = {PREV_EVAL_PREFIX + k: float(v) for k, v in ev.items()}
    dp_state, meta = None, {}
    if ctx.cfg.privacy.dp_sgd:  # the site's DP-SGD accountant is private state too
        from medlora_lib.privacy.dp_sgd import META_KEY, saved_dp_state

        dp_state = saved_dp_state(store, run_key)
    kept = None
    if ctx.cfg.train.optimizer_state != "reset":  # AdamW moments stay at the site
        kept = store.optimizer_before(run_key, rnd)
    out = rt.train_round(
        shared,
        private,
        rnd,
        proximal_mu=float(cfg.get("proximal-mu", 0.0)),
        lr=float(cfg.get("lr", ctx.cfg.train.lr)),
        dp_state=dp_state,
        fresh_randomness=ctx.deployed,  # DP-SGD's batches and noise: unseeded
        optimizer_state=kept,
    )
    if list(out.shared) != rt.shared_keys:  # never send anything but the shared part
        raise RuntimeError(
            "reply keys differ from the shared tensors; refusing to send"
        )
    if out.dp_state is not None:
        meta = {META_KEY: out.dp_state}
    t0 = time.perf_counter()
    store.save_round(
        run_key,
        rnd,
        out.private,
        {"train_loss": out.train_loss, **meta},
        optimizer=out.optimizer,
    )
    _SPENT["state"] += time.perf_counter() - t0
    _SPENT["compute"] += out.seconds
    state_s = _SPENT["state"] - state_before
    metrics = MetricRecord(
        {
            "num-examples": out.num_examples,
            "train-loss": out.train_loss,
            "train-seconds": out.seconds,
            "state-seconds": state_s,  # writing the site's state to its disk
            **prev,
            **({"dp-epsilon": out.epsilon} if out.epsilon is not None else {}),
        }
    )
    content = RecordDict({"arrays": ArrayRecord(out.shared), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
@_guard
def evaluate(msg: Message, context: Context, ctx: SiteContext) -> Message:
    """Evaluate this site's deployed model (received global + its private part)."""
    cfg, rnd, run_key, rt, store, shared = _step(msg, ctx)
    private = _private_before(store, run_key, rnd + 1)
    metrics = _evaluate_and_keep(ctx, rt, store, run_key, rnd, shared, private, cfg)
    record = MetricRecord({"num-examples": int(metrics.get("val_n", 0)), **metrics})
    return Message(content=RecordDict({"metrics": record}), reply_to=msg)
