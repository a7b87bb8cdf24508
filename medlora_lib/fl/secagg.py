"""Secure aggregation with Flower's SecAgg+ around the project's Message-API strategy
(chapter ``notebooks/08_privacy``, ``book/deployment.md``).

With ``privacy.secagg`` on, the server learns the sample-weighted mean of the sites'
updates of the shared tensors and nothing of one site's update: each site uploads its
update quantised and *masked*, and the masks cancel only in the sum over the sites
(SecAgg+, Bell et al. 2020). The protocol and its cryptography are Flower's own,
unchanged: :class:`~flwr.server.workflow.SecAggPlusWorkflow` on the server,
:func:`~flwr.client.mod.secaggplus_mod` at the sites.

Flower 1.42 ships SecAgg+ for its legacy API only: the workflow runs on a
``LegacyContext`` (a legacy ``Strategy`` and client manager) and sends ``fitins.*``
content; the mod reads the handler's reply as a legacy ``FitRes``. This module is the
bridge to the Message-API strategy and handlers of the project:

* **server** — :func:`secagg_train` (called by ``GridSites.train``) runs the workflow's
  four stages — *setup* (public keys), *share keys* (encrypted Shamir shares), *collect
  masked vectors* (the train step) and *unmask* — for exactly the sites of the round.
  A thin legacy strategy hands the workflow one ``FitIns`` per site carrying the round's
  config, and takes the unmasked mean back in ``aggregate_fit``. Every protocol message
  goes through ``GridSites`` (``fed.round_timeout`` per stage, the message log, failures
  by site name). Legacy ``Parameters`` drop names, dtypes and shapes, so the train step
  carries the shared tensors as the same named ``ArrayRecord`` a plain train message
  carries.
* **site** — :func:`secagg_client_mod` wraps ``secaggplus_mod`` and translates the train
  step for the project's handler, which is unchanged (``{"arrays", "config"}`` in,
  ``{"arrays", "metrics"}`` out). It hands the protocol the *update* (trained −
  received, float64); what leaves the site is that update times
  ``num-examples / max_weight``, quantised and masked (int64 values mod ``2**32``). The
  reply's tensors are removed before it is sent.

The server still sees, in clear, each site's metrics (``num-examples``, ``train-loss``,
the previous round's evaluation) — as without SecAgg+: Flower's mod sends the legacy
``FitRes`` metrics unmasked — and the mean. It must not see one site's update.

**Precision.** Site ``i`` sends ``r_i Δ_i`` (``r_i ≈ n_i / W``, ``W`` the workflow's
``max_weight``) clipped to ``[-c, c]`` and quantised with step ``2c / Q``
(``c = privacy.secagg_clipping_range``, ``Q = privacy.secagg_quantization_range``) by
stochastic rounding: less than one step per value and site. The mean is divided by
``Σ r_i``, so its error per value is below ``m · 2c / (Q · Σ r_i)`` for ``m`` sites
(:func:`secagg_error_bound`; ``RoundOutcome.round_metrics["secagg_error_bound"]``). The
bridge sets ``W`` to the largest ``num-examples`` of the round's sites (from their last
train reply; a site not heard of yet is asked once with a ``query`` message), so
``Σ r_i >= 1`` and the error is below ``m · 2c / Q`` (1.5e-5 for 4 sites at the
defaults; with site-level DP the mean is unweighted and ``r_i = 1``). A value with
``|r_i Δ_i| > c`` is clipped — the site says so in its log.

**Threshold.** A site's secrets are split into ``privacy.secagg_shares`` Shamir shares
of which ``privacy.secagg_threshold`` reconstruct it: a round tolerates sites that drop
out as long as that many of each site's neighbours answer every stage, and the server
needs that many colluding sites to unmask one site. A round that starts with fewer
sites is refused before anything is sent (:func:`check_round`); one that falls below
it midway stops with a :class:`~medlora_lib.fl.federation.FederationError` (the run
resumes from the last checkpoint).

**Cost** (:func:`secagg_cost` measures it): four exchanges per round instead of one
(8 messages per site; 10 in a round that first asks the sites' sizes), the masked
upload is int64 (twice the float32 tensors, plus 8 bytes), and each site and the server
compute ``O(n_sites)`` key agreements and masks. A deployed SuperNode starts one
ClientApp process per message, so there each stage also costs a process start.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from medlora_lib.errors import ConfigError
from medlora_lib.fl.federation import FederationError, RoundOutcome, SiteReply

__all__ = [
    "secagg_train",
    "secagg_client_mod",
    "secagg_plan",
    "check_round",
    "secagg_error_bound",
    "secagg_cost",
    "SecAggPlan",
    "DEFAULT_MAX_WEIGHT",
]

#: Flower's ``SecAggPlusWorkflow`` default ``max_weight``: used until the bridge knows
#: the sites' numbers of examples.
DEFAULT_MAX_WEIGHT = 1000.0
#: ``SecAggPlusWorkflow``'s ``modulus_range`` (masks and sums live mod 2**32).
MODULUS_RANGE = 2**32
#: The record each protocol message carries so that the site's ``privacy_mod`` finds the
#: experiment of the message (a batch runs several).
EXPERIMENT_RECORD = "medlora-experiment"
_PARAMS = "fitins.parameters"
_CONFIG = "fitins.config"
_PREV = "prev-eval/"


# ------------------------------------------------------------------ the parameters
def _as_arg(value: float) -> int | float:
    """``privacy.secagg_shares`` / ``_threshold`` as ``SecAggPlusWorkflow`` reads them:
    ``<= 1`` a fraction (float), ``> 1`` a count (int)."""
    v = float(value)
    return int(v) if v > 1 else v


@dataclass(frozen=True)
class SecAggPlan:
    """What ``SecAggPlusWorkflow.setup_stage`` will use for ``num_sites`` sites."""

    num_sites: int
    num_shares: int
    threshold: int
    neighbours: int  # nodes holding a share of one site's secrets (itself included)

    @property
    def feasible(self) -> bool:
        return self.num_sites >= 2 and self.neighbours >= self.threshold

    @property
    def tolerated_dropouts(self) -> int:
        """Sites that may drop out midway (each site keeps ``threshold`` neighbours)."""
        return max(0, self.neighbours - self.threshold)


def secagg_plan(privacy: Any, num_sites: int) -> SecAggPlan:
    """The shares and threshold of a round with ``num_sites`` sites, computed exactly as
    ``SecAggPlusWorkflow.setup_stage`` does (a test checks them against its messages)."""
    n = int(num_sites)
    shares, thr = _as_arg(privacy.secagg_shares), _as_arg(privacy.secagg_threshold)
    if isinstance(shares, float):
        num_shares = round(shares * n)
        if num_shares < n and num_shares & 1 == 0:
            num_shares += 1
        if num_shares <= 2:
            num_shares = n
    else:
        num_shares = shares
    threshold = max(round(thr * num_shares), 2) if isinstance(thr, float) else thr
    if n != num_shares and num_shares & 1 == 0:
        num_shares += 1
    half = num_shares >> 1
    neighbours = min(n, 2 * half + 1)
    return SecAggPlan(n, num_shares, threshold, neighbours)


def check_round(cfg: Any, rnd: int, sites: list[str]) -> SecAggPlan:
    """Refuse, before anything is sent, a round SecAgg+ cannot finish.

    Raises:
        FederationError: fewer sites than the reconstruction threshold, or more than
            ``2**32 / privacy.secagg_quantization_range`` (the sum would overflow).
    """
    p = cfg.privacy
    plan = secagg_plan(p, len(sites))
    if not plan.feasible:
        need = max(2, plan.threshold)
        raise FederationError(
            f"round {rnd}: SecAgg+ needs at least {need} sites (its reconstruction "
            f"threshold, privacy.secagg_threshold={p.secagg_threshold:g} of "
            f"{plan.num_shares} shares), but only {len(sites)} can take part "
            f"({', '.join(sites) or 'none'}). Start the missing SuperNodes and run "
            "again (the run resumes from its last checkpoint), or lower "
            "privacy.secagg_threshold — and keep fed.min_sites at least that high, so "
            "that the federation does not accept rounds SecAgg+ cannot finish"
        )
    if len(sites) * p.secagg_quantization_range >= MODULUS_RANGE:
        raise FederationError(
            f"round {rnd}: {len(sites)} sites x privacy.secagg_quantization_range="
            f"{p.secagg_quantization_range} reach 2**32, SecAgg+'s modulus: the sum "
            "would overflow; lower privacy.secagg_quantization_range below "
            f"{MODULUS_RANGE // len(sites)}"
        )
    return plan


def secagg_error_bound(
    privacy: Any, num_examples: list[int], max_weight: float
) -> float:
    """Largest error per value of the SecAgg+ mean against the exact weighted mean.

    Each site's ``r_i Δ_i`` is stochastically rounded to a step of ``2c/Q``; the mean
    divides the sum by ``Σ r_i`` (``r_i = round(n_i / W · Q) / Q``, as the mod computes
    it): ``m · 2c / (Q · Σ r_i)``. The quantised weights ``r_i`` differ from ``n_i / W``
    by at most ``1 / (2Q)`` each — a relative error below ``m / (2Q Σ r_i)`` of the
    update, included by the tests separately.
    """
    q = int(privacy.secagg_quantization_range)
    c = float(privacy.secagg_clipping_range)
    ratios = [round(n / max_weight * q) / q for n in num_examples]
    return len(num_examples) * 2 * c / (q * sum(ratios))


# ------------------------------------------------------------------ the server's bridge
class _NodeProxy(ClientProxy):
    """A legacy ``ClientProxy`` that only names a node: the workflow sends its messages
    itself, nothing calls these methods."""

    def __init__(self, node_id: int) -> None:
        super().__init__(str(node_id))
        self.node_id = int(node_id)

    def get_properties(self, ins, timeout, group_id):  # noqa: D102
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):  # noqa: D102
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):  # noqa: D102
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):  # noqa: D102
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):  # noqa: D102
        raise NotImplementedError


class _Bridge(Strategy):
    """The legacy ``Strategy`` the workflow drives: one ``FitIns`` per site of the round
    (the round's config); ``aggregate_fit`` keeps the unmasked mean — the workflow hands
    every result the same aggregate ``Parameters`` — and the sites' clear metrics."""

    def __init__(self, nodes: list[int], config: dict[str, Any]) -> None:
        self.proxies = [_NodeProxy(n) for n in nodes]
        self.config = dict(config)
        self.aggregate: list[np.ndarray] | None = None
        self.results: list[tuple[int, Any]] = []  # (node, FitRes)

    def initialize_parameters(self, client_manager):  # noqa: D102
        return None

    def configure_fit(self, server_round, parameters, client_manager):  # noqa: D102
        return [(p, FitIns(parameters, dict(self.config))) for p in self.proxies]

    def aggregate_fit(self, server_round, results, failures):  # noqa: D102
        self.results = [(int(p.node_id), r) for p, r in results]
        if not results:
            return None, {}
        self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
        return results[0][1].parameters, {}

    def configure_evaluate(self, server_round, parameters, client_manager):  # noqa: D102
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # noqa: D102
        return None, {}

    def evaluate(self, server_round, parameters):  # noqa: D102
        return None


def _content_bytes(content: RecordDict) -> int:
    """Serialised size of a message's content (its protobuf, as Flower sends it)."""
    from flwr.common.serde import recorddict_to_proto

    return int(recorddict_to_proto(content).ByteSize())


@dataclass
class _Round:
    """What one SecAgg+ round moved: per site and per stage."""

    messages: dict[str, int] = field(default_factory=dict)
    down: dict[str, int] = field(default_factory=dict)
    up: dict[str, int] = field(default_factory=dict)
    masked_up: dict[str, int] = field(default_factory=dict)
    stages: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    late: list[dict[str, Any]] = field(default_factory=list)  # failed after uploading


class _StageGrid:
    """The Grid the workflow sees: its ``send_and_receive`` goes through ``GridSites``
    (time-out, message log, failures by site name) and counts the round's traffic."""

    def __init__(
        self, transport: Any, rnd: int, node_site: dict[int, str], arrays: ArrayRecord
    ) -> None:
        self.transport = transport
        self.rnd = rnd
        self.node_site = node_site
        self.arrays = arrays
        self.stats = _Round()
        self.experiment = int(transport.strategy.experiment)

    def _count(self, site: str, key: str, content: RecordDict) -> None:
        book = self.stats.down if key == "down" else self.stats.up
        book[site] = book.get(site, 0) + _content_bytes(content)
        self.stats.messages[site] = self.stats.messages.get(site, 0) + 1

    def ask_sizes(self, sites: list[str]) -> dict[str, int]:
        """``num-examples`` of ``sites`` from a ``query`` exchange (those that answer)."""
        t = self.transport
        config = t.strategy.round_config(self.rnd, False)
        wait = float(t.cfg.fed.round_timeout)
        msgs = []
        for site in sites:
            node = next(n for n, s in self.node_site.items() if s == site)
            msgs.append(
                Message(
                    RecordDict({"config": config}),
                    dst_node_id=node,
                    message_type="query",
                    group_id=f"secagg-size-{self.rnd}",
                    ttl=wait,
                )
            )
            self._count(site, "down", msgs[-1].content)
        replies, _ = t._exchange(msgs, sites, "secagg-size", self.rnd, wait)
        sizes = {}
        for site, rep in replies.items():
            self._count(site, "up", rep.content)
            n = rep.content.metric_records.get("metrics", {}).get("num-examples", 0)
            if int(n) > 0:
                sizes[site] = int(n)
        return sizes

    def send_and_receive(
        self, messages: Any, *, timeout: float | None = None
    ) -> list[Message]:
        from flwr.common.secure_aggregation.secaggplus_constants import (
            RECORD_KEY_CONFIGS,
            Key,
            Stage,
        )

        messages = list(messages)
        if not messages:
            return []
        stage = str(messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
        wait = float(timeout or self.transport.cfg.fed.round_timeout)
        sites = []
        for m in messages:
            site = self.node_site[int(m.metadata.dst_node_id)]
            sites.append(site)
            m.metadata.ttl = wait  # a late site must not work on a stale stage
            m.content.config_records[EXPERIMENT_RECORD] = ConfigRecord(
                {"experiment": self.experiment}
            )
            if stage == Stage.COLLECT_MASKED_VECTORS:
                # the same named tensors a plain train message carries (the legacy
                # Parameters the workflow put there have no names, dtypes or shapes)
                m.content.array_records[_PARAMS] = self.arrays
            self._count(site, "down", m.content)
        t0 = time.perf_counter()
        replies, failures = self.transport._exchange(
            messages, sites, f"secagg-{stage}", self.rnd, wait
        )
        self.stats.stages.append(
            {
                "stage": stage,
                "sent": len(messages),
                "answered": len(replies),
                "seconds": time.perf_counter() - t0,
            }
        )
        for site, rep in replies.items():
            self._count(site, "up", rep.content)
            if stage == Stage.COLLECT_MASKED_VECTORS:
                from flwr.common import bytes_to_ndarray

                masked = rep.content.config_records[RECORD_KEY_CONFIGS]
                self.stats.masked_up[site] = int(
                    sum(
                        bytes_to_ndarray(b).nbytes
                        for b in masked[Key.MASKED_PARAMETERS]
                    )
                )
        for f in failures:
            f = {**f, "reason": f"SecAgg+ {stage} stage: {f['reason']}"}
            if stage == Stage.UNMASK:  # its masked update is already in the sum
                self.stats.late.append(f)
            else:
                self.stats.failures.append(f)
        return list(replies.values())


def _max_weight(transport: Any, grid: _StageGrid, sites: list[str]) -> float:
    """The workflow's ``max_weight``: the largest ``num-examples`` of the round's sites.

    Known from their last train reply; a site not heard of yet (the first round, a
    resumed run, a new site) is asked once with a ``query`` message — the question
    every SuperNode answers at connection, counted in the round's traffic. Without an
    answer, Flower's default 1000 (less precision, see :func:`secagg_error_bound`).
    """
    known = transport.__dict__.setdefault("secagg_examples", {})
    missing = [s for s in sites if s not in known]
    if missing:
        known.update(grid.ask_sizes(missing))
    seen = [known[s] for s in sites if s in known]
    if len(seen) < len(sites):
        return float(max(seen + [DEFAULT_MAX_WEIGHT]))
    return float(max(seen))


def secagg_train(
    transport: Any,
    rnd: int,
    sites: list[str],
    shared: dict[str, torch.Tensor],
    evaluate_first: bool,
) -> RoundOutcome:
    """One train round under SecAgg+ over ``transport.grid`` (``GridSites``).

    Args:
        transport: the ServerApp's ``GridSites`` (its Grid, config, strategy, log).
        rnd: the server round.
        sites: the sites of the round (canonical order).
        shared: the shared tensors sent to every site.
        evaluate_first: the sites first evaluate ``shared`` (rounds after the first).

    Returns:
        A :class:`RoundOutcome` whose replies hold each site's metrics and no tensor
        (``SiteReply.shared == {}``: the server never has one) and whose ``aggregate``
        is the sample-weighted mean of the sites' shared tensors (same keys, shapes and
        dtypes as ``shared``); ``round_metrics["secagg_error_bound"]`` is its largest
        quantisation error per value.

    Raises:
        FederationError: too few sites for the threshold (before anything is sent), or
            too few answered a stage for the protocol to finish.
    """
    from flwr.app import Context as AppContext
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import (
        MAIN_CONFIGS_RECORD,
        MAIN_PARAMS_RECORD,
    )
    from flwr.server.workflow.constant import Key as WorkflowKey

    from medlora_lib.comm import payload_bytes

    cfg = transport.cfg
    p = cfg.privacy
    plan = check_round(cfg, rnd, sites)
    t0 = time.perf_counter()
    node_site = {int(transport._node(s)): s for s in sites}
    arrays = ArrayRecord({k: v.detach().cpu() for k, v in shared.items()})
    # the round's config as the strategy — or Flower's DP wrapper around it, which adds
    # its clipping norm (privacy.site_dp='client_*') — puts it in a train message
    aggregator = getattr(transport, "aggregator", transport.strategy)
    transport.strategy.nodes = list(node_site)
    config_record = transport.strategy.round_config(rnd, evaluate_first)
    planned = list(
        aggregator.configure_train(rnd, arrays, config_record, transport.grid)
    )
    config = dict(planned[0].content["config"]) if planned else dict(config_record)
    grid = _StageGrid(transport, rnd, node_site, arrays)
    uniform = bool(getattr(transport.strategy, "uniform", False))
    weight = 1.0 if uniform else _max_weight(transport, grid, sites)
    workflow = SecAggPlusWorkflow(
        _as_arg(p.secagg_shares),
        _as_arg(p.secagg_threshold),
        max_weight=weight,
        clipping_range=float(p.secagg_clipping_range),
        quantization_range=int(p.secagg_quantization_range),
        modulus_range=MODULUS_RANGE,
        timeout=float(cfg.fed.round_timeout),
    )
    bridge = _Bridge(list(node_site), config)
    state = RecordDict(
        {
            MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: int(rnd)}),
            MAIN_PARAMS_RECORD: arrays,
        }
    )
    context = LegacyContext(
        AppContext(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
        strategy=bridge,
    )
    workflow(grid, context)
    stats = grid.stats
    if bridge.aggregate is None:
        _halted(cfg, rnd, sites, plan, stats)

    out = RoundOutcome(replies={}, failures=list(stats.failures))
    weights: list[int] = []
    clear: dict[int, dict[str, Any]] = {}
    known = transport.__dict__.setdefault("secagg_examples", {})
    for node, res in sorted(
        bridge.results, key=lambda nr: sites.index(node_site[nr[0]])
    ):
        site = node_site[node]
        m = clear[node] = dict(res.metrics)
        prev = {k[len(_PREV) :]: float(v) for k, v in m.items() if k.startswith(_PREV)}
        n = int(m.get("num-examples", res.num_examples))
        weights.append(int(res.num_examples))  # what SecAgg+ weighted by (1: uniform)
        known[site] = n
        out.replies[site] = SiteReply(
            shared={},
            num_examples=n,
            train={
                "train_loss": float(m["train-loss"]),
                "num_examples": n,
                "train_seconds": float(m.get("train-seconds", 0.0)),
                "state_seconds": float(m.get("state-seconds", 0.0)),
                # DP-SGD (privacy.dp_sgd): the ε the site's records have spent so far
                **(
                    {"dp_sgd_epsilon": float(m["dp-epsilon"])}
                    if "dp-epsilon" in m
                    else {}
                ),
            },
            prev_eval={site: prev} if prev else {},
        )
        out.bytes[site] = {
            "bytes_down": payload_bytes(arrays),
            "bytes_up": stats.masked_up.get(site, 0),
            "wire_bytes_down": stats.down.get(site, 0),
            "wire_bytes_up": stats.up.get(site, 0),
            "secagg_messages": stats.messages.get(site, 0),
        }
    mean: dict[str, torch.Tensor] = {}
    for (k, ref), delta in zip(shared.items(), bridge.aggregate, strict=True):
        value = ref.detach().cpu().to(torch.float64) + torch.from_numpy(
            np.asarray(delta, dtype=np.float64)
        ).reshape(ref.shape)
        mean[k] = value.to(ref.dtype)
    if aggregator is transport.strategy or not hasattr(transport, "_aggregate"):
        out.aggregate = mean
    else:
        # Flower's DP wrapper adds its noise to the secure mean (and composes ε): it
        # gets one reply per site, each holding that mean and the site's clear
        # metrics — what SecAggPlusWorkflow itself hands a legacy strategy
        from flwr.app import MetricRecord

        same = [
            Message(
                RecordDict(
                    {
                        "arrays": ArrayRecord(mean),
                        "metrics": MetricRecord(
                            {
                                k: v
                                for k, v in clear[node].items()
                                if isinstance(v, int | float)
                            }
                        ),
                    }
                ),
                dst_node_id=node,
                message_type="train",
            )
            for node in clear  # site order
        ]
        transport._aggregate(rnd, same, out)
    bound = secagg_error_bound(p, weights, weight)
    out.round_metrics["secagg_error_bound"] = bound
    for f in stats.late:
        print(
            f"[{transport.label}] round {rnd}: {f['site']} dropped out after "
            f"uploading its masked update ({f['reason'][:200]}); SecAgg+ unmasked the "
            "sum without it",
            flush=True,
        )
    transport.__dict__.setdefault("secagg_rounds", []).append(
        {
            "round": rnd,
            "sites": len(sites),
            "answered": len(out.replies),
            "seconds": time.perf_counter() - t0,
            "messages": int(sum(stats.messages.values())),
            "wire_bytes_down": int(sum(stats.down.values())),
            "wire_bytes_up": int(sum(stats.up.values())),
            "max_weight": weight,
            "error_bound": bound,
            "stages": stats.stages,
        }
    )
    return out


def _halted(cfg: Any, rnd: int, sites: list[str], plan: SecAggPlan, stats: _Round):
    """The round could not finish: which stage, who did not answer, who failed."""
    last = stats.stages[-1] if stats.stages else {"stage": "setup", "answered": 0}
    away = {f["site"] for f in stats.failures if not f.get("answered")}
    failed = {f["site"] for f in stats.failures if f.get("answered")}
    first = (
        f" The first failure: {stats.failures[0]['site']}: {stats.failures[0]['reason']}"
        if stats.failures
        else ""
    )
    raise FederationError(
        f"round {rnd}: SecAgg+ stopped at its {last['stage']} stage: "
        f"{last['answered']} of the round's {len(sites)} sites answered, fewer than its "
        f"reconstruction threshold of {plan.threshold} (privacy.secagg_threshold="
        f"{cfg.privacy.secagg_threshold:g} of {plan.num_shares} shares); missing: "
        f"{', '.join(s for s in sites if s in away) or 'none'}; failed: "
        f"{', '.join(s for s in sites if s in failed) or 'none'}. Restart the missing "
        "SuperNodes (and fix the error the failed sites report) and run again: the "
        f"run resumes from round {rnd - 1} (its last checkpoint). A lower "
        "privacy.secagg_threshold tolerates more dropouts, but then fewer colluding "
        "sites suffice to unmask one site's update." + first
    )


# ------------------------------------------------------------------ the site's mod
def _warn(text: str) -> None:
    print(f"medlora secagg: {text}", file=sys.stderr, flush=True)


def secagg_client_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's ``secaggplus_mod`` around the project's train handler.

    The setup, share-keys and unmask stages are answered by ``secaggplus_mod`` alone.
    In the collect-masked-vectors stage the handler (``call_next``) gets exactly the
    content of a plain train message (``{"arrays", "config"}``); its reply's update of
    the shared tensors (trained − received) goes to ``secaggplus_mod`` as a legacy
    ``FitRes``, which quantises and masks it and removes the tensors from the reply.

    Raises:
        ConfigError: a train message without a SecAgg+ stage while the experiment has
            ``privacy.secagg`` on (the site then refuses to send its update in clear).
    """
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        raise ConfigError(
            "privacy.secagg is on for this experiment, but the server sent a plain "
            "train message (no SecAgg+ stage): this site does not send its update in "
            "clear. Run the project's ServerApp with the same run config, or set "
            "privacy.secagg=false on both sides"
        )

    def train_step(legacy: Message, ctx: Context) -> Message:
        return _train_step(legacy, ctx, call_next)

    return secaggplus_mod(msg, context, train_step)


def _train_step(legacy: Message, ctx: Context, call_next: Any) -> Message:
    """The collect-masked-vectors stage: legacy ``fitins.*`` -> the handler -> ``fitres.*``."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    content = legacy.content
    if _PARAMS not in content.array_records or _CONFIG not in content.config_records:
        raise ConfigError(
            "privacy.secagg: the SecAgg+ train stage carries no fitins.parameters / "
            "fitins.config; run the project's ServerApp (medlora_lib.fl.server_app)"
        )
    received = content.array_records[_PARAMS].to_torch_state_dict()
    config = content.config_records[_CONFIG]
    plain = RecordDict(
        {"arrays": ArrayRecord(received), "config": ConfigRecord(dict(config))}
    )
    legacy.content = plain
    reply = call_next(legacy, ctx)
    if reply.has_error():  # e.g. Flower's clipping mod refused: the site reports it
        raise RuntimeError(str(reply.error.reason))
    trained = reply.content["arrays"].to_torch_state_dict()
    metrics = dict(reply.content["metrics"])
    if list(trained) != list(received):
        raise RuntimeError(
            "reply keys differ from the received shared tensors; refusing to send"
        )
    deltas = [
        (
            trained[k].detach().cpu().to(torch.float64) - received[k].to(torch.float64)
        ).numpy()
        for k in received
    ]
    n = int(metrics["num-examples"])
    from medlora_lib.fl.mods import experiment_privacy

    p = experiment_privacy(legacy, ctx)
    if p is not None and p.site_dp != "off":
        n = 1  # site-level DP averages the sites unweighted (the noise fits 1/m)
    st = ctx.state.config_records.get(RECORD_KEY_STATE, {})
    weight = float(st.get("max_weight", DEFAULT_MAX_WEIGHT) or DEFAULT_MAX_WEIGHT)
    c = float(st.get("clipping_range", 0.0) or 0.0)
    top = max((float(np.abs(d).max()) for d in deltas if d.size), default=0.0)
    if c and top * n / weight > c:
        _warn(
            f"the largest value of this site's update ({top:.3g}) times its weight "
            f"{n}/{weight:g} exceeds privacy.secagg_clipping_range={c:g}: SecAgg+ "
            "clips it and the mean is biased; raise privacy.secagg_clipping_range"
        )
    fitres = FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters(deltas),
        num_examples=n,
        metrics=metrics,
    )
    return Message(fitres_to_recorddict(fitres, keep_input=True), reply_to=legacy)


# ------------------------------------------------------------------ the cost
def secagg_cost(
    profile: str = "smoke",
    num_rounds: int = 3,
    method: str = "fedavg_lora",
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
) -> Any:
    """Seconds and messages per round with and without SecAgg+ (Simulation Runtime).

    Both runs go into one Flower run (one start-up), plain first. Seconds per round are
    the median time between consecutive rounds (round 1 pays one-off costs); messages
    are counted from the message log (both directions, every phase, per round).

    Returns:
        A ``pandas.DataFrame`` indexed by ``secagg`` (False, True): ``seconds_per_round``,
        ``messages_per_round``, ``messages_per_site_round`` (the train step's
        messages: plain 1 down + 1 up per site), ``wire_MB_per_round`` (the train
        step's serialised traffic, both directions, all sites: the ``ArrayRecord``
        without SecAgg+, every record of every stage with it), ``sites``,
        ``final_max_abs_diff`` (largest difference of the final shared tensors of the
        two runs).
    """
    import pandas as pd

    from medlora_lib.config import get_config
    from medlora_lib.fl.result import steady_seconds_per_round
    from medlora_lib.fl.simulate import simulate

    base = {"fed.num_rounds": num_rounds, **(overrides or {})}
    configs = [
        get_config(profile, method=method, seed=seed, overrides=dict(base)),
        get_config(
            profile,
            method=method,
            seed=seed,
            overrides={**base, "privacy.secagg": True},
        ),
    ]
    results = simulate(configs, record_messages=True, verbose=False)
    rows = []
    for on, r in zip((False, True), results, strict=True):
        msgs = [m for m in r.messages if 1 <= int(m.get("round", 0)) <= num_rounds]
        sites = int(r.rounds["client"].nunique())
        # the train step's messages (plain: 1 down + 1 up per site; SecAgg+: 4 + 4)
        train = [m for m in msgs if m.get("phase") not in ("query", "evaluate")]
        per_round = len(train) / num_rounds
        g = r.rounds.reindex(columns=["wire_bytes_up", "wire_bytes_down"]).fillna(0)
        wire = g["wire_bytes_up"] + g["wire_bytes_down"]
        rows.append(
            {
                "secagg": on,
                "sites": sites,
                "seconds_per_round": steady_seconds_per_round(r.rounds),
                "messages_per_round": per_round,
                "messages_per_site_round": per_round / sites,
                "wire_MB_per_round": float(wire.sum()) / num_rounds / 1e6,
            }
        )
    a, b = (r.final_shared for r in results)
    diff = (
        max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
        if a and b
        else math.nan
    )
    out = pd.DataFrame(rows).set_index("secagg")
    out["final_max_abs_diff"] = diff
    return out
