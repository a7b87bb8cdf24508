"""The one round loop: Flower's ServerApp, the in-process runner, the cross-vendor matrix and
the new-site join all run :func:`run_rounds` (chapter ``notebooks/03_fedavg_lora``).

A *transport* moves the shared state to the sites and the replies back:

* :class:`InProcessSites` — the sites' :class:`~medlora_lib.fl.task.ClientRuntime` in
  this process (``local``, ``centralized``, the cross-vendor matrix, the benchmark's
  reference, a new site joining);
* :class:`medlora_lib.fl.server_app.GridSites` — Flower's Grid (Simulation or
  Deployment Runtime).

Both answer ``train(round, sites, shared, evaluate_first)`` the same way: with
``evaluate_first`` (every round after the first) a site first evaluates the model it
received — the previous round's aggregate with its own private part, exactly the model
a separate evaluate step would see — then trains. Evaluation therefore rides on the next
round's train message; only the last round sends evaluate messages.

Every round :func:`run_rounds` records one row per site (train loss, examples, seconds,
bytes, then the evaluation of that round), the sites that failed or did not answer in
``fed.round_timeout`` (by *name*), goes on when at least ``fed.min_sites`` answered,
aggregates and — with a run folder — writes a checkpoint (:mod:`~medlora_lib.fl.checkpoint`)
from which an interrupted run resumes bit for bit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from medlora_lib.config import ExperimentConfig
from medlora_lib.errors import MedloraError

__all__ = [
    "FederationError",
    "SiteReply",
    "RoundOutcome",
    "Transport",
    "InProcessSites",
    "run_rounds",
    "plan_test_evaluations",
    "aggregator",
]


class FederationError(MedloraError, RuntimeError):
    """Too few sites connected or answered (the message names them and the fix)."""


@dataclass
class SiteReply:
    """What one site returned from a train step."""

    shared: dict[str, torch.Tensor]
    num_examples: int
    train: dict[str, float]
    prev_eval: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class RoundOutcome:
    """Replies of one step: ``{site: reply}``, the failures and the per-site bytes.

    A transport whose strategy aggregates (the ServerApp's: Flower's DP wrappers, or
    SecAgg+, where the server never holds one site's update) sets ``aggregate``; the
    round loop then uses it instead of averaging the replies. ``round_metrics`` (e.g.
    the site-level ε spent so far) go into every row of the round.
    """

    replies: dict[str, Any]
    failures: list[dict[str, Any]] = field(default_factory=list)
    bytes: dict[str, dict[str, int]] = field(default_factory=dict)
    aggregate: dict[str, torch.Tensor] | None = None
    round_metrics: dict[str, float] = field(default_factory=dict)


class Transport(Protocol):
    """How the round loop reaches the sites."""

    def sites(self, rnd: int) -> list[str]:
        """The sites that can take part in round ``rnd`` (canonical order)."""

    def train(
        self,
        rnd: int,
        sites: list[str],
        shared: dict[str, torch.Tensor],
        evaluate_first: bool,
        test_above: dict[str, dict[str, float]] | None = None,
    ) -> RoundOutcome:
        """Train ``sites`` on ``shared``; replies are :class:`SiteReply`.

        With ``evaluate_first`` each site first evaluates ``shared`` (the previous
        round's model), its test split as ``test_above`` plans (:func:`plan_test_evaluations`).
        """

    def evaluate(
        self,
        rnd: int,
        sites: list[str],
        shared: dict[str, torch.Tensor],
        test_above: dict[str, dict[str, float]] | None = None,
    ) -> RoundOutcome:
        """Evaluate ``sites``; replies are ``{client: metrics}`` dicts."""


def aggregator(
    method: str,
) -> Callable[[dict[str, SiteReply]], dict[str, torch.Tensor]]:
    """How a method combines the replies: sample-weighted mean (federated methods), the
    one model (``centralized``) or nothing (``local``)."""
    from medlora_lib.adapters import METHODS, aggregate_shared

    spec = METHODS[method]
    if spec.federated:

        def agg(replies: dict[str, SiteReply]) -> dict[str, torch.Tensor]:
            return aggregate_shared(
                [r.shared for r in replies.values()],
                [r.num_examples for r in replies.values()],
            )

        return agg
    if spec.pooled:
        return lambda replies: next(iter(replies.values())).shared
    return lambda replies: {}


def _nbytes(state: dict[str, torch.Tensor]) -> int:
    return int(sum(t.numel() * t.element_size() for t in state.values()))


class InProcessSites:
    """The sites' runtimes in this process, their private state in memory.

    Args:
        runtimes: ``{site: ClientRuntime}`` (one pooled runtime for ``centralized``).
        federated: whether shared state travels (counts bytes as a Flower run would).
        private: initial private state per site (e.g. a new site's), default none.
    """

    def __init__(
        self,
        runtimes: dict[str, Any],
        federated: bool,
        private: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> None:
        self.runtimes = runtimes
        self.federated = federated
        self.private: dict[str, dict[str, torch.Tensor] | None] = {
            s: (private or {}).get(s) for s in runtimes
        }
        self.mu = 0.0
        self.on_train: Callable[[str, Any], None] | None = None
        #: AdamW moments a site keeps across rounds (``train.optimizer_state``)
        self.optimizer: dict[str, dict[str, torch.Tensor] | None] = {
            s: None for s in runtimes
        }

    def sites(self, rnd: int) -> list[str]:
        return list(self.runtimes)

    def clients_of(self, site: str) -> list[str]:
        """The clients a runtime evaluates (every site for the pooled one)."""
        return list(self.runtimes[site].eval_sets)

    def _bytes(self, shared: dict[str, torch.Tensor]) -> dict[str, int]:
        if not self.federated:  # nothing travels
            return {}
        n = _nbytes(shared)
        return {"bytes_down": n, "bytes_up": n}

    def train(
        self,
        rnd: int,
        sites: list[str],
        shared: dict[str, torch.Tensor],
        evaluate_first: bool,
        test_above: dict[str, dict[str, float]] | None = None,
    ) -> RoundOutcome:
        out = RoundOutcome(replies={})
        for s in sites:
            rt = self.runtimes[s]
            prev = (
                rt.evaluate_round(shared, self.private[s], test_above)
                if evaluate_first
                else {}
            )
            res = rt.train_round(
                shared,
                self.private[s],
                rnd,
                proximal_mu=self.mu,
                optimizer_state=self.optimizer[s],
            )
            self.private[s] = res.private
            self.optimizer[s] = res.optimizer
            if self.on_train is not None:
                self.on_train(s, res)
            out.replies[s] = SiteReply(
                shared=res.shared,
                num_examples=res.num_examples,
                train={
                    "train_loss": res.train_loss,
                    "num_examples": res.num_examples,
                    "train_seconds": res.seconds,
                },
                prev_eval=prev,
            )
            out.bytes[s] = self._bytes(shared)
        return out

    def evaluate(
        self,
        rnd: int,
        sites: list[str],
        shared: dict[str, torch.Tensor],
        test_above: dict[str, dict[str, float]] | None = None,
    ) -> RoundOutcome:
        out = RoundOutcome(replies={})
        for s in sites:
            out.replies[s] = self.runtimes[s].evaluate_round(
                shared, self.private[s], test_above
            )
            if self.federated:
                out.bytes[s] = {"bytes_down_eval": _nbytes(shared)}
        return out


def _progress(label: str, rnd: int, total: int, row: dict[str, Any], t0: float) -> None:
    print(
        f"[{label}] round {rnd}/{total} {row['client']:>8s}  "
        f"loss {row.get('train_loss', float('nan')):.4f}  val BA "
        f"{row.get('val_balanced_accuracy', float('nan')):.3f}  "
        f"({row.get('elapsed_s', time.perf_counter() - t0):.1f} s)",
        flush=True,
    )


def run_rounds(
    transport: Any,
    cfg: ExperimentConfig,
    initial_shared: dict[str, torch.Tensor],
    *,
    start_round: int = 1,
    rows: list[dict[str, Any]] | None = None,
    failures: list[dict[str, Any]] | None = None,
    checkpoint: Callable[[int, dict[str, torch.Tensor], list, list], None]
    | None = None,
    label: str = "",
    verbose: bool = False,
    min_sites: int | None = None,
) -> dict[str, Any]:
    """Run rounds ``start_round .. fed.num_rounds`` over ``transport``.

    Args:
        transport: :class:`InProcessSites` or the ServerApp's ``GridSites``.
        cfg: the experiment.
        initial_shared: the shared state the first round starts from (a checkpoint's
            state when resuming).
        start_round: the first round to run (``checkpoint round + 1`` when resuming).
        rows, failures: what earlier rounds recorded (when resuming).
        checkpoint: called after every completed round with ``(round, shared, rows,
            failures)``.
        label: printed with the progress lines.
        verbose: one progress line per site and round.
        min_sites: fewest answering sites a round needs (default ``fed.min_sites`` for
            federated methods, 1 otherwise).

    Returns:
        ``{"rows", "failures", "final_shared", "seconds"}``; rows sorted by round, site.

    Raises:
        FederationError: fewer than ``min_sites`` answered a round.
    """
    from medlora_lib.adapters import METHODS

    t0 = time.perf_counter()
    spec = METHODS[cfg.method]
    need = (
        min_sites
        if min_sites is not None
        else (cfg.fed.min_sites if spec.federated else 1)
    )
    agg = aggregator(cfg.method)
    table: dict[tuple[int, str], dict[str, Any]] = {
        (int(r["round"]), str(r["client"])): dict(r) for r in (rows or [])
    }
    fails = list(failures or [])
    shared = {k: v.clone() for k, v in initial_shared.items()}
    total = cfg.fed.num_rounds
    order: list[str] = []

    def row(rnd: int, client: str) -> dict[str, Any]:
        if client not in order:
            order.append(client)
        return table.setdefault((rnd, client), {"round": rnd, "client": client})

    def record_eval(rnd: int, per_client: dict[str, dict[str, float]]) -> None:
        for client, m in per_client.items():
            r = row(rnd, client)
            r.update({k: float(v) for k, v in m.items()})
            if verbose:
                _progress(label, rnd, total, r, t0)

    def fail(rnd: int, phase: str, items: list[dict[str, Any]]) -> None:
        for f in items:
            fails.append({"round": rnd, "phase": phase, **f})
            if verbose:
                print(
                    f"[{label}] round {rnd}: site {f['site']} failed in {phase} "
                    f"({f['reason'][:200]}); the round goes on with the others",
                    flush=True,
                )

    from medlora_lib.recipe import early_stop_round

    def plan() -> dict[str, dict[str, float]] | None:
        # which test splits the next evaluation computes (train.test_every_round)
        if cfg.train.test_every_round:
            return None
        return plan_test_evaluations(table.values(), cfg.train.selection_metric)

    sites: list[str] = []
    last = start_round - 1
    for rnd in range(start_round, total + 1):
        # early stopping (train.patience) on the rounds evaluated so far; evaluation of
        # round r arrives with round r + 1's replies, so one round more is trained
        # than the criterion saw (a resumed run decides the same from its rows)
        stop = early_stop_round(
            table.values(),
            cfg.train.selection_metric,
            cfg.train.patience,
            cfg.train.min_delta,
        )
        if stop is not None:
            if verbose:
                print(
                    f"[{label}] early stop: mean validation "
                    f"{cfg.train.selection_metric} has not improved for "
                    f"{cfg.train.patience} round(s) (last gain before round "
                    f"{stop - cfg.train.patience + 1}); the run ends after round "
                    f"{rnd - 1}",
                    flush=True,
                )
            break
        sites = transport.sites(rnd)
        out = transport.train(rnd, sites, shared, rnd > 1, test_above=plan())
        fail(rnd, "train", out.failures)
        for rep in out.replies.values():
            record_eval(rnd - 1, rep.prev_eval)
        # a site that answered with an error still evaluates the model it received
        answered = [f["site"] for f in out.failures if f.get("answered") and rnd > 1]
        if answered:
            ev = transport.evaluate(rnd - 1, answered, shared, test_above=plan())
            fail(rnd - 1, "evaluate", ev.failures)
            record_eval(
                rnd - 1, {c: m for per in ev.replies.values() for c, m in _clients(per)}
            )
        if len(out.replies) < need:
            missing = [s for s in sites if s not in out.replies]
            raise FederationError(
                f"round {rnd}: {len(out.replies)} site(s) answered "
                f"({', '.join(out.replies) or 'none'}), fewer than fed.min_sites={need}; "
                f"missing: {', '.join(missing) or 'none'}. Restart the missing "
                "SuperNodes and run again: the run resumes from round "
                f"{rnd - 1} (its last checkpoint)."
                + (
                    f" The first failure: {out.failures[0]['site']}: "
                    f"{out.failures[0]['reason']}"
                    if out.failures
                    else ""
                )
            )
        elapsed = time.perf_counter() - t0
        for site, rep in out.replies.items():
            clients = (
                transport.clients_of(site)
                if hasattr(transport, "clients_of")
                else [site]
            )
            for client in clients:
                r = row(rnd, client)
                r.update(rep.train)
                r.update(out.bytes.get(site, {}))
                r.update(out.round_metrics)
                r["elapsed_s"] = elapsed
        shared = out.aggregate if out.aggregate is not None else agg(out.replies)
        if checkpoint is not None:
            t_ck = time.perf_counter()
            checkpoint(rnd, shared, _sorted(table), fails)
            for site in out.replies:
                row(rnd, site)["checkpoint_s"] = time.perf_counter() - t_ck
        last = rnd
    if start_round > total:  # a resumed run whose rounds are all done
        last = total
    # the last round's model: one evaluate step, test splits included
    sites = sites or transport.sites(last)
    ev = transport.evaluate(last, sites, shared)
    fail(last, "evaluate", ev.failures)
    for site, per in ev.replies.items():
        record_eval(last, dict(_clients(per)))
        for client, _ in _clients(per):
            row(last, client).update(ev.bytes.get(site, {}))
    return {
        "rows": _sorted(table),
        "failures": fails,
        "final_shared": shared,
        "seconds": time.perf_counter() - t0,
    }


def plan_test_evaluations(rows: Any, metric: str) -> dict[str, dict[str, float]]:
    """Per client and variant, the best validation ``metric`` of the rounds recorded.

    ``rows`` are the round loop's per-round × per-client rows. The result,
    ``{client: {"": best val, "global_only_": best global-only val}}`` (a variant only
    where it has a value), is what an evaluation needs to test only the rounds that
    :func:`~medlora_lib.fl.result.select_rounds` can pick: a round is selected for a
    client when its validation value is the highest so far (ties: the earlier), i.e.
    strictly above this plan (``ClientRuntime.evaluate_round(test_above=...)``). With
    ``train.test_every_round=false`` the round loop sends it with every evaluation but
    the last (chapter ``notebooks/03_fedavg_lora``, "what a run evaluates").
    """
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        for prefix in ("", "global_only_"):
            v = r.get(f"{prefix}val_{metric}")
            if v is None or v != v:
                continue
            best = out.setdefault(str(r["client"]), {})
            if prefix not in best or float(v) > best[prefix]:
                best[prefix] = float(v)
    return out


def _clients(per: Any) -> list[tuple[str, dict[str, float]]]:
    return list(per.items())


def _sorted(table: dict[tuple[int, str], dict[str, Any]]) -> list[dict[str, Any]]:
    from medlora_lib.fl.sites import _ordered

    order = {c: i for i, c in enumerate(_ordered({k[1] for k in table}))}
    return [table[k] for k in sorted(table, key=lambda k: (k[0], order[k[1]]))]


def run_in_process(
    cfg: ExperimentConfig,
    runtimes: dict[str, Any],
    initial_shared: dict[str, torch.Tensor],
    *,
    verbose: bool = False,
    label: str = "",
    run_dir: Path | None = None,
) -> dict[str, Any]:
    """:func:`run_rounds` over :class:`InProcessSites` (no Flower, no server)."""
    from medlora_lib.adapters import METHODS

    sites = InProcessSites(runtimes, federated=METHODS[cfg.method].federated)
    sites.mu = cfg.fed.proximal_mu if METHODS[cfg.method].proximal else 0.0
    return run_rounds(sites, cfg, initial_shared, verbose=verbose, label=label)
