"""The Flower ``ServerApp`` (chapter ``notebooks/03_fedavg_lora``, ``book/deployment.md``).

``app`` reads the experiment from the run config (``[tool.flwr.app.config]`` plus
``--run-config`` overrides; ``run.batch`` may list several experiments, which then run
one after the other inside the same Flower run), and for each:

1. opens its run folder (``run.dir``): a finished result is kept as it is; a checkpoint
   of the same configuration is resumed (``run.resume``); another configuration is
   refused, naming the first differing key;
2. waits up to ``fed.connect_timeout`` for the sites (:class:`GridSites` asks every
   SuperNode which site it is with a ``query`` message), then runs
   :func:`~medlora_lib.fl.federation.run_rounds` over Flower's Grid — each round waits at
   most ``fed.round_timeout`` and goes on with the sites that answered;
3. writes a checkpoint after every round and the result at the end
   (:class:`~medlora_lib.fl.result.RunResult`: ``results.json``, ``rounds.csv``,
   ``final_shared.safetensors``).

Nothing here opens patient data: the server only builds the initial shared tensors
from the foundation model.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from medlora_lib.errors import ConfigError
from medlora_lib.fl import flower_poll, trace
from medlora_lib.fl.federation import FederationError, RoundOutcome, SiteReply
from medlora_lib.fl.strategies import (
    PREV_EVAL_PREFIX,
    TEST_ABOVE_KEYS,
    MedloraFedAvg,
)

__all__ = ["app", "GridSites", "run_experiment"]

# In the Simulation Runtime this module is imported in the ``flwr-simulation`` process
# while Ray starts, before Flower's LinkState sweep thread: hand messages over on arrival
# instead of at Flower's next 100 ms sweep (``fl/flower_poll.py``).
flower_poll.install()

#: Flower error codes that mean the site's own ClientApp answered (it raised, or its
#: mod refused): such a site is alive, and still reports its previous evaluation.
_SITE_ERRORS = (
    1,
    2,
    6,
    7,
)  # LOAD_CLIENT_APP, CLIENT_APP_RAISED, MOD_FAILED, INVALID_FAB


def _short_reason(reason: str) -> str:
    """The last line that names the exception (Ray / Flower wrap it in tracebacks)."""
    lines = [
        ln.strip() for ln in reason.replace("\\n", "\n").splitlines() if ln.strip()
    ]
    named = [ln for ln in lines if "Error" in ln or "Exception" in ln]
    return (named[-1] if named else (lines[-1] if lines else reason))[-500:]


class GridSites:
    """The sites of a run, reached through Flower's Grid (public API only).

    Keeps the node of every site (``query`` → the site's name); a node that leaves is
    dropped, a node that (re)appears is asked again, so a restarted SuperNode rejoins
    under its site's name.
    """

    def __init__(
        self,
        grid: Grid,
        cfg: Any,
        strategy: MedloraFedAvg,
        record_messages: bool = False,
        label: str = "",
        aggregator: Any = None,
        dp_accountant: Any = None,
    ) -> None:
        self.grid = grid
        self.cfg = cfg
        self.strategy = strategy
        # what configures the train messages and aggregates the replies: the strategy,
        # or Flower's DP wrapper around it (privacy.site_dp)
        self.aggregator = aggregator if aggregator is not None else strategy
        self.dp_accountant = dp_accountant
        self.record_messages = record_messages
        self.label = label
        self.node_site: dict[int, str] = {}
        self.refused: dict[int, str] = {}
        # nodes whose site a newer node took over (a killed SuperNode still listed
        # until its heartbeat expires)
        self.superseded: dict[int, str] = {}
        # questions (query messages) still open: message id -> (node, TTL deadline)
        self.asking: dict[str, tuple[int, float]] = {}
        self.messages: list[dict[str, Any]] = []
        # pull interval while replies are due: from 5 ms, x1.5 per empty pull, at most
        # 5 ms in memory / 50 ms over gRPC (a pull is ~1 ms on loopback; a fixed 200 ms
        # cost ~0.1 s per exchange, ~7 % of a cpu-profile run — benchmarks/bench_federation)
        self.poll_min = 0.005
        self.poll_max = 0.005 if type(grid).__name__ == "InMemoryGrid" else 0.05

    # ------------------------------------------------------------------ membership
    def _log(
        self, direction: str, phase: str, rnd: int, site: str, msg: Message
    ) -> None:
        if not self.record_messages:
            return
        from medlora_lib.comm import record_summary

        entry: dict[str, Any] = {
            "exp_id": self.strategy.run_key,
            "direction": direction,
            "phase": phase,
            "round": rnd,
            "site": site,
        }
        if msg.has_error():
            entry["error"] = _short_reason(str(msg.error.reason))
            entry["records"] = {}
        else:
            entry["records"] = record_summary(msg.content)
        self.messages.append(entry)

    def _exchange(
        self,
        messages: list[Message],
        sites: list[str],
        phase: str,
        rnd: int,
        timeout: float,
        keep_pending: bool = False,
    ) -> Any:
        """Push ``messages`` (one per site), pull replies until all came or ``timeout``.

        Returns ``(replies, failures)``; with ``keep_pending`` the messages still
        unanswered are returned (``message id -> site``) instead of counted as failures.
        """
        for m, s in zip(messages, sites, strict=True):
            self._log("down", phase, rnd, s, m)
        t_push = time.time()
        ids = list(self.grid.push_messages(messages))
        pending = dict(zip(ids, sites, strict=True))
        tracing = trace.trace_dir() is not None
        replies: dict[str, Message] = {}
        failures: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        poll = self.poll_min
        while pending and time.monotonic() < deadline:
            got = list(self.grid.pull_messages(list(pending)))
            poll = self.poll_min if got else min(poll * 1.5, self.poll_max)
            for rep in got:
                site = pending.pop(rep.metadata.reply_to_message_id, None)
                if site is None:
                    continue
                if tracing:
                    trace.record(
                        "server",
                        message_id=rep.metadata.reply_to_message_id,
                        run=self.strategy.run_key,
                        phase=phase,
                        round=rnd,
                        site=site,
                        t_push=t_push,
                        t_reply=time.time(),
                    )
                self._log("up", phase, rnd, site, rep)
                if rep.has_error():
                    # the site itself answered (its ClientApp raised) or the SuperLink
                    # answered for it (message or node unavailable: the site is away)
                    failures.append(
                        {
                            "site": site,
                            "answered": int(rep.error.code) in _SITE_ERRORS,
                            "reason": _short_reason(str(rep.error.reason)),
                        }
                    )
                else:
                    replies[site] = rep
            if pending:
                time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
        if keep_pending:
            return replies, failures, pending
        for site in pending.values():
            failures.append(
                {
                    "site": site,
                    "answered": False,
                    "reason": f"no reply within fed.round_timeout={timeout:g} s",
                }
            )
        return replies, failures

    def _hello(self, nodes: list[int], timeout: float) -> None:
        """Ask ``nodes`` which site they are; wait up to ``timeout`` for the answers.

        A node that has not answered by then (a SuperNode still starting its ClientApp
        process) keeps its question open for one ``fed.round_timeout`` more (the
        message's TTL): its late answer is taken at the next refresh, and it is not
        asked — nor waited for — again meanwhile.
        """
        cfg = self.strategy.round_config(0, False)
        ttl = timeout + self.cfg.fed.round_timeout
        msgs = [
            Message(
                RecordDict({"config": cfg}),
                dst_node_id=n,
                message_type="query",
                group_id="hello",
                ttl=ttl,
            )
            for n in nodes
        ]
        replies, failures, pending = self._exchange(
            msgs, [f"node {n}" for n in nodes], "query", 0, timeout, keep_pending=True
        )
        until = time.monotonic() + self.cfg.fed.round_timeout
        for msg_id, label in pending.items():
            self.asking[msg_id] = (int(label.split()[1]), until)
        self._take_hellos(replies, failures)

    def _poll_hellos(self) -> None:
        """Take the answers to questions still open (non-blocking); drop expired ones."""
        now = time.monotonic()
        for msg_id in [k for k, (_, until) in self.asking.items() if until < now]:
            del self.asking[msg_id]
        if not self.asking:
            return
        replies: dict[str, Message] = {}
        failures: list[dict[str, Any]] = []
        for rep in self.grid.pull_messages(list(self.asking)):
            node, _ = self.asking.pop(rep.metadata.reply_to_message_id, (None, 0.0))
            if node is None:
                continue
            self._log("up", "query", 0, f"node {node}", rep)
            if rep.has_error():
                failures.append(
                    {
                        "site": f"node {node}",
                        "answered": int(rep.error.code) in _SITE_ERRORS,
                        "reason": _short_reason(str(rep.error.reason)),
                    }
                )
            else:
                replies[f"node {node}"] = rep
        self._take_hellos(replies, failures)

    def _take_hellos(
        self, replies: dict[str, Message], failures: list[dict[str, Any]]
    ) -> None:
        for _key, rep in replies.items():
            node = int(rep.metadata.src_node_id)
            site = str(rep.content["site"]["site"])
            for old in [
                k for k, v in self.node_site.items() if v == site and k != node
            ]:
                # a restarted SuperNode (new node id) — or two SuperNodes that claim
                # the same site: the newer one is used, and the clash is reported
                print(
                    f"[{self.label}] node {node} is site {site!r}, which node {old} "
                    "was: using the newer one (a restarted SuperNode; two hospitals "
                    "need different site-name values in their node config)",
                    flush=True,
                )
                del self.node_site[old]
                self.superseded[old] = site  # not asked again while it is listed
            self.node_site[node] = site
        for f in failures:
            node = int(f["site"].split()[1])
            if f[
                "answered"
            ]:  # it refused (e.g. no data-path); asked again if it comes back
                self.node_site[node] = ""
                self.refused[node] = f["reason"]
                print(
                    f"[{self.label}] a SuperNode refused the experiment: {f['reason']}",
                    flush=True,
                )

    def _refresh(self, timeout: float) -> None:
        self._poll_hellos()
        listed = set(int(n) for n in self.grid.get_node_ids())
        for gone in [n for n in self.node_site if n not in listed]:
            del self.node_site[gone]
        for seen in (self.refused, self.superseded):
            for gone in [n for n in seen if n not in listed]:
                del seen[gone]
        asked = {n for n, _ in self.asking.values()}
        known = set(self.node_site) | set(self.refused) | set(self.superseded)
        new = sorted(listed - known - asked)
        if new:
            self._hello(new, timeout)

    def connect(self) -> list[str]:
        """Wait for the sites of the run (``fed.num_sites``, at least ``fed.min_sites``).

        Raises:
            FederationError: fewer than ``fed.min_sites`` sites within
                ``fed.connect_timeout``.
        """
        fed = self.cfg.fed
        deadline = time.monotonic() + fed.connect_timeout
        want = fed.num_sites or fed.min_sites
        while True:
            self._refresh(max(5.0, deadline - time.monotonic()))
            sites = self.sites_now()
            listed = set(int(n) for n in self.grid.get_node_ids())
            everyone = listed and listed <= set(self.node_site)
            if len(sites) >= want and (fed.num_sites or everyone):
                return sites
            if listed and listed <= set(self.refused):
                raise ConfigError(
                    "every SuperNode refused the experiment; the first said: "
                    + next(iter(self.refused.values()))
                )
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if len(sites) >= fed.min_sites:
            print(
                f"[{self.label}] warning: {len(sites)} of fed.num_sites={fed.num_sites} "
                f"sites connected ({', '.join(sites)}); going on",
                flush=True,
            )
            return sites
        raise FederationError(
            f"only {len(sites)} site(s) connected within fed.connect_timeout="
            f"{fed.connect_timeout:g} s ({', '.join(sites) or 'none'}); the run needs "
            f"fed.min_sites={fed.min_sites}. Start the missing SuperNodes (each with "
            "--node-config 'data-path=... state-dir=...') or lower fed.min_sites"
            + (f"; refused: {'; '.join(self.refused.values())}" if self.refused else "")
        )

    def sites_now(self) -> list[str]:
        from medlora_lib.fl.sites import _ordered

        names = {
            s for s in self.node_site.values() if s and s not in self.cfg.fed.exclude
        }
        return _ordered(names)

    def sites(self, rnd: int) -> list[str]:
        # a new node gets as long to say which site it is as a site gets to train
        self._refresh(self.cfg.fed.round_timeout)
        return self.sites_now()

    def _node(self, site: str) -> int:
        return next(n for n, s in self.node_site.items() if s == site)

    # ------------------------------------------------------------------ steps
    def _step(
        self,
        phase: str,
        rnd: int,
        sites: list[str],
        shared: dict,
        evaluate_first: bool,
        test_above: dict[str, dict[str, float]] | None = None,
    ) -> tuple[ArrayRecord, dict[str, Message], list[dict[str, Any]]]:
        """The strategy's messages of ``phase`` to ``sites``, sent; their replies.

        ``test_above`` (the round loop's :func:`~medlora_lib.fl.federation.plan_test_evaluations`)
        adds to each site's own message the best validation values of its earlier
        rounds (:data:`TEST_ABOVE_KEYS`), so that it tests only a round that can be
        selected; a site never sees another site's values.
        """
        arrays = ArrayRecord(shared)
        self.strategy.nodes = [self._node(s) for s in sites]
        configure = getattr(self.aggregator, f"configure_{phase}")
        config = self.strategy.round_config(rnd, evaluate_first)
        msgs = list(configure(rnd, arrays, config, self.grid))
        for msg in msgs if test_above else []:
            best = test_above.get(self.node_site.get(msg.metadata.dst_node_id, ""), {})
            keys = {TEST_ABOVE_KEYS[p]: v for p, v in best.items()}
            if keys:  # a copy: the strategy's messages share one config record
                own = ConfigRecord({**dict(msg.content["config"]), **keys})
                msg.content["config"] = own
        replies, failures = self._exchange(
            msgs, sites, phase, rnd, self.cfg.fed.round_timeout
        )
        return arrays, replies, failures

    def train(
        self,
        rnd: int,
        sites: list[str],
        shared: dict,
        evaluate_first: bool,
        test_above: dict[str, dict[str, float]] | None = None,
    ) -> RoundOutcome:
        if self.cfg.privacy.secagg:  # Flower's SecAgg+: the server gets only the mean
            from medlora_lib.fl.secagg import secagg_train

            # SecAgg+'s workflow sends one config to all: every site tests every round
            return secagg_train(self, rnd, sites, shared, evaluate_first)
        from medlora_lib.comm import payload_bytes, wire_bytes

        arrays, replies, failures = self._step(
            "train", rnd, sites, shared, evaluate_first, test_above
        )
        down = {
            "bytes_down": payload_bytes(arrays),
            "wire_bytes_down": wire_bytes(arrays),
        }
        out = RoundOutcome(replies={}, failures=failures)
        for site in sites:
            if site not in replies:
                continue
            rep = replies[site]
            arrays_up = rep.content["arrays"]
            m = rep.content["metrics"]
            prev = {
                k[len(PREV_EVAL_PREFIX) :]: float(v)
                for k, v in m.items()
                if k.startswith(PREV_EVAL_PREFIX)
            }
            # DP-SGD (privacy.dp_sgd): the ε the site's records have spent so far
            eps = m.get("dp-epsilon")
            dp_sgd = {} if eps is None else {"dp_sgd_epsilon": float(eps)}
            out.replies[site] = SiteReply(
                shared=arrays_up.to_torch_state_dict(),
                num_examples=int(m["num-examples"]),
                train={
                    "train_loss": float(m["train-loss"]),
                    "num_examples": int(m["num-examples"]),
                    "train_seconds": float(m.get("train-seconds", 0.0)),
                    "state_seconds": float(m.get("state-seconds", 0.0)),
                    **dp_sgd,
                },
                prev_eval={site: prev} if prev else {},
            )
            out.bytes[site] = {
                **down,
                "bytes_up": payload_bytes(arrays_up),
                "wire_bytes_up": wire_bytes(arrays_up),
            }
        self._aggregate(rnd, [replies[s] for s in sites if s in replies], out)
        return out

    def _aggregate(self, rnd: int, ordered: list[Message], out: RoundOutcome) -> None:
        """The strategy's (or its DP wrapper's) aggregate of the replies, in site order;
        with site-level DP also the ε spent so far (``site_dp_epsilon``)."""
        if not ordered:
            return
        agg = self.aggregator
        dp = agg is not self.strategy
        seed = None
        if dp:
            agg.num_sampled_clients = len(ordered)  # the noise fits the m averaged
            out.round_metrics["site_dp_clipping_norm"] = float(agg.clipping_norm)
            if type(self.grid).__name__ == "InMemoryGrid":  # reproducible simulation
                from medlora_lib.fl.task import round_seed

                seed = round_seed(self.cfg.seed, "server-dp", rnd)
        from medlora_lib.fl.site_dp import seeded_noise

        with seeded_noise(seed):
            arrays, _ = agg.aggregate_train(rnd, ordered)
        if arrays is None:
            raise FederationError(
                f"round {rnd}: the strategy returned no aggregate of "
                f"{len(ordered)} replies"
            )
        out.aggregate = arrays.to_torch_state_dict()
        if self.dp_accountant is not None:
            out.round_metrics["site_dp_epsilon"] = self.dp_accountant.compose(
                rnd, len(ordered)
            )

    def evaluate(
        self,
        rnd: int,
        sites: list[str],
        shared: dict,
        test_above: dict[str, dict[str, float]] | None = None,
    ) -> RoundOutcome:
        from medlora_lib.comm import payload_bytes

        arrays, replies, failures = self._step(
            "evaluate", rnd, sites, shared, False, test_above
        )
        out = RoundOutcome(replies={}, failures=failures)
        for site, rep in replies.items():
            m = {
                k: float(v)
                for k, v in rep.content["metrics"].items()
                if k != "num-examples"
            }
            out.replies[site] = {site: m}
            out.bytes[site] = {"bytes_down_eval": payload_bytes(arrays)}
        return out


def run_experiment(grid: Grid, cfg: Any, options: Any, index: int = 0) -> Path:
    """Run (or resume, or keep) one experiment on ``grid``; return its run folder."""
    from medlora_lib.adapters import METHODS, get_shared_state
    from medlora_lib.config import config_hash
    from medlora_lib.fl.checkpoint import (
        Checkpoint,
        check_resumable,
        comparable_config,
        first_difference,
        load_checkpoint,
        save_checkpoint,
    )
    from medlora_lib.fl.federation import run_rounds
    from medlora_lib.fl.result import build_result
    from medlora_lib.fl.runcache import default_run_dir
    from medlora_lib.fl.task import build_adapted_model, validate_config
    from medlora_lib.results import read_json

    validate_config(cfg)
    from medlora_lib.fl.site_dp import check_site_dp_budget

    check_site_dp_budget(cfg)
    if not METHODS[cfg.method].federated:
        raise ConfigError(
            f"method {cfg.method!r} is not federated (no server); run it with "
            "`medlora run` or medlora_lib.fl.simulate"
        )
    run_dir = Path(options.dir).expanduser() if options.dir else default_run_dir(cfg)
    label = f"{cfg.method} s{cfg.seed}"
    done = run_dir / "results.json"
    if done.exists():
        saved = read_json(done)["config"]
        a, b = comparable_config(saved), comparable_config(cfg.to_dict())
        if a != b:
            raise ConfigError(
                f"{run_dir} holds the finished result of another configuration (first "
                f"differing key: {first_difference(a, b)}); choose another run.dir"
            )
        print(
            f"[{label}] {run_dir} already holds this run's result; nothing to do",
            flush=True,
        )
        return run_dir
    ckpt = load_checkpoint(run_dir)
    if ckpt is not None and options.resume == "never":
        raise ConfigError(
            f"{run_dir} holds a checkpoint of round {ckpt.round}; resume it "
            "(run.resume='auto') or choose another run.dir"
        )
    if ckpt is None and options.resume == "require":
        raise ConfigError(f"run.resume='require' but {run_dir} holds no checkpoint")
    if ckpt is not None:
        check_resumable(ckpt, cfg.to_dict(), run_dir)
        print(f"[{label}] resuming {run_dir} after round {ckpt.round}", flush=True)
    run_key = (
        ckpt.run_key
        if ckpt
        else f"{cfg.method}-{config_hash(cfg, 8)}-{uuid.uuid4().hex[:8]}"
    )
    initial = ckpt.shared if ckpt else get_shared_state(build_adapted_model(cfg))
    site_dp = cfg.privacy.site_dp != "off"
    strategy = MedloraFedAvg(
        lr=cfg.train.lr,
        proximal_mu=cfg.fed.proximal_mu if METHODS[cfg.method].proximal else 0.0,
        run_key=run_key,
        experiment=index,
        message_ttl=cfg.fed.round_timeout,
        uniform=site_dp,
    )
    transport = GridSites(grid, cfg, strategy, options.record_messages, label)
    if ckpt is not None:
        transport.messages = list(ckpt.messages)
    t0 = time.perf_counter()
    before = float(ckpt.extra.get("seconds", 0.0)) if ckpt else 0.0
    sites = transport.connect()
    print(f"[{label}] sites: {', '.join(sites)}", flush=True)
    if site_dp:
        from medlora_lib.fl.site_dp import SiteDPAccountant, wrap_strategy

        extra = ckpt.extra if ckpt else {}
        transport.aggregator = wrap_strategy(strategy, cfg.privacy, len(sites))
        if "site_dp_clipping_norm" in extra:  # adaptive clipping: where it had got to
            transport.aggregator.clipping_norm = float(extra["site_dp_clipping_norm"])
        transport.dp_accountant = SiteDPAccountant(
            cfg.privacy.noise_multiplier,
            cfg.privacy.delta,
            len(sites),
            extra.get("site_dp_releases"),
        )
        print(
            f"[{label}] site-level DP ({cfg.privacy.site_dp}): z="
            f"{cfg.privacy.noise_multiplier:g}, C={cfg.privacy.clipping_norm:g}, "
            f"unweighted mean of the sites",
            flush=True,
        )

    def dp_extra() -> dict[str, Any]:
        if transport.dp_accountant is None:
            return {}
        return {
            "site_dp_releases": transport.dp_accountant.releases,
            "site_dp_clipping_norm": float(transport.aggregator.clipping_norm),
        }

    def checkpoint(rnd: int, shared: dict, rows: list, fails: list) -> None:
        save_checkpoint(
            run_dir,
            Checkpoint(
                round=rnd,
                run_key=run_key,
                config=cfg.to_dict(),
                shared=shared,
                rows=rows,
                failures=fails,
                messages=transport.messages,
                extra={"seconds": before + time.perf_counter() - t0, **dp_extra()},
            ),
        )

    out = run_rounds(
        transport,
        cfg,
        initial,
        start_round=(ckpt.round + 1) if ckpt else 1,
        rows=ckpt.rows if ckpt else None,
        failures=ckpt.failures if ckpt else None,
        checkpoint=checkpoint,
        label=label,
        verbose=True,
    )
    runtime = (
        "flower-simulation"
        if type(grid).__name__ == "InMemoryGrid"
        else "flower-deployment"
    )
    result = build_result(
        cfg,
        out["rows"],
        before + out["seconds"],
        out["failures"],
        transport.messages,
        exp_id=run_key,
        runtime=runtime,
        final_shared=out["final_shared"],
    )
    if runtime == "flower-simulation":
        # which LinkState sweep handed this run's messages to the sites
        result.provenance["flower_sweep"] = (
            "on-arrival" if flower_poll.active() else "flower-100ms"
        )
    result.save(run_dir)
    print(f"[{label}] wrote {run_dir / 'results.json'}", flush=True)
    return run_dir


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run every experiment of the run config (one, or ``run.batch``)."""
    from medlora_lib.config import experiment_of

    rc = dict(context.run_config)
    batch = str(rc.get("run.batch", "") or "")
    n = len(json.loads(batch)) if batch else 1
    for i in range(n):
        cfg, options = experiment_of(rc, i)
        run_experiment(grid, cfg, options, i)
