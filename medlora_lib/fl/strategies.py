"""The server strategy: Flower's FedAvg with sample-weighted aggregation of the shared part.

Chapter ``notebooks/03_fedavg_lora`` (the federated loop) and
``notebooks/06_communication_analysis`` (bytes measured from the messages).

:class:`MedloraFedAvg` subclasses :class:`flwr.serverapp.strategy.FedAvg` and changes three
things:

* ``aggregate_train`` averages the clients' shared ``ArrayRecord`` with
  :func:`medlora_lib.adapters.aggregate_shared` (float64, weights = ``num-examples``, replies
  sorted by partition so the sum is the same whatever the arrival order) and keeps one row
  per client (train loss, bytes up) instead of FedAvg's weighted mean of every metric;
* ``aggregate_evaluate`` keeps every client's validation / test metrics as its own row;
* every message sent and received is summarised in a log (record types, keys, bytes) —
  the privacy test reads it — and clients that fail are recorded, the round going on with
  the others;
* with ``fused_evaluation`` (the default) the per-round evaluation rides on the next
  round's train message: the model a client receives at the start of round r+1 *is* the
  round-r aggregate, so it evaluates that (with its private part) before training and
  returns the metrics with its training reply. Only the last round sends evaluate
  messages. Same numbers as a separate evaluate step (tested against the plain loop),
  half the message round trips, and one download of the global model per round instead
  of two.

FedProx-LoRA uses the same class with ``proximal_mu > 0``: like Flower's ``FedProx`` it only
adds ``proximal-mu`` to the train config; the client adds the proximal term.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from medlora_lib.comm import payload_bytes, record_summary, wire_bytes
from medlora_lib.fl.client_app import PREV_EVAL_PREFIX

__all__ = ["MedloraFedAvg"]


def _short_reason(reason: str) -> str:
    """The last line that names the exception (Ray wraps it in long tracebacks)."""
    lines = [
        ln.strip() for ln in reason.replace("\\n", "\n").splitlines() if ln.strip()
    ]
    named = [
        ln for ln in lines if "Error" in ln or "Exception" in ln or "Failure" in ln
    ]
    return (named[-1] if named else (lines[-1] if lines else reason))[-500:]


class MedloraFedAvg(FedAvg):
    """FedAvg over the shared tensors with per-client rows, a message log and failures.

    Args:
        num_clients: clients that must be connected; every round samples all of them.
        exp_id: experiment id (printed with the progress lines).
        num_rounds: for the progress lines.
        proximal_mu: FedProx coefficient sent as ``proximal-mu`` (0 = FedAvg).
        record_messages: keep a summary of every message (types, keys, bytes).
        verbose: print one progress line per client and round.
        client_names: client names in partition order (for rows and progress lines).
        fused_evaluation: evaluate round r inside round r+1's train message (only the
            last round sends evaluate messages).
    """

    def __init__(
        self,
        num_clients: int,
        exp_id: str = "",
        num_rounds: int = 0,
        proximal_mu: float = 0.0,
        record_messages: bool = False,
        verbose: bool = True,
        client_names: list[str] | None = None,
        fused_evaluation: bool = True,
    ) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=num_clients,
            min_evaluate_nodes=num_clients,
            min_available_nodes=num_clients,
        )
        self.exp_id = exp_id
        self.num_rounds = num_rounds
        self.proximal_mu = float(proximal_mu)
        self.record_messages = record_messages
        self.verbose = verbose
        self.client_names = client_names or []
        self.fused_evaluation = fused_evaluation
        self.rows: dict[tuple[int, int], dict[str, Any]] = {}
        self.failures: list[dict[str, Any]] = []
        self.messages: list[dict[str, Any]] = []
        self.node_partition: dict[int, int] = {}
        self._down: dict[tuple[str, int, int], dict[str, int]] = {}
        self.t0 = time.perf_counter()

    # ------------------------------------------------------------------ logging
    def _log(self, direction: str, phase: str, rnd: int, msg: Message) -> None:
        node = (
            msg.metadata.dst_node_id
            if direction == "down"
            else msg.metadata.src_node_id
        )
        if direction == "down":
            arrays = msg.content.array_records
            rec = next(iter(arrays.values())) if arrays else None
            self._down[(phase, rnd, node)] = {
                "payload": payload_bytes(rec) if rec is not None else 0,
                "wire": wire_bytes(rec) if rec is not None else 0,
            }
        if not self.record_messages:
            return
        entry: dict[str, Any] = {
            "exp_id": self.exp_id,
            "direction": direction,
            "phase": phase,
            "round": rnd,
            "node_id": int(node),
        }
        if msg.has_error():
            entry["error"] = str(msg.error.reason)
            entry["records"] = {}
        else:
            entry["records"] = record_summary(msg.content)
        self.messages.append(entry)

    def _row(self, rnd: int, partition: int) -> dict[str, Any]:
        key = (rnd, partition)
        if key not in self.rows:
            name = (
                self.client_names[partition]
                if partition < len(self.client_names)
                else str(partition)
            )
            self.rows[key] = {"round": rnd, "partition": partition, "client": name}
        return self.rows[key]

    def _split(self, phase: str, rnd: int, replies: Iterable[Message]) -> list[Message]:
        valid = []
        for msg in replies:
            self._log("up", phase, rnd, msg)
            if msg.has_error():
                node = int(msg.metadata.src_node_id)
                self.failures.append(
                    {
                        "exp_id": self.exp_id,
                        "round": rnd,
                        "phase": phase,
                        "node_id": node,
                        "partition": self.node_partition.get(node),
                        "reason": _short_reason(str(msg.error.reason)),
                    }
                )
                if self.verbose:
                    print(
                        f"[{self.exp_id}] round {rnd}: a client failed in {phase} "
                        f"(node {node}); continuing with the others",
                        flush=True,
                    )
            else:
                valid.append(msg)
        valid.sort(
            key=lambda m: int(
                next(iter(m.content.metric_records.values()))["partition-id"]
            )
        )
        for m in valid:
            part = int(next(iter(m.content.metric_records.values()))["partition-id"])
            self.node_partition[int(m.metadata.src_node_id)] = part
        return valid

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any
    ) -> Iterable[Message]:
        if self.proximal_mu > 0:
            config["proximal-mu"] = self.proximal_mu
        config["evaluate-first"] = self.fused_evaluation and server_round > 1
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        for m in msgs:
            self._log("down", "train", server_round, m)
        return msgs

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        from flwr.serverapp.strategy.strategy_utils import (
            validate_message_reply_consistency,
        )

        from medlora_lib.adapters import aggregate_shared

        valid = self._split("train", server_round, replies)
        if not valid:
            return None, None
        validate_message_reply_consistency(
            [m.content for m in valid], self.weighted_by_key, check_arrayrecord=True
        )
        states, weights, losses = [], [], []
        for m in valid:
            arrays = next(iter(m.content.array_records.values()))
            metrics = next(iter(m.content.metric_records.values()))
            part = int(metrics["partition-id"])
            node = int(m.metadata.src_node_id)
            down = self._down.get(("train", server_round, node), {})
            row = self._row(server_round, part)
            row.update(
                {
                    "train_loss": float(metrics["train-loss"]),
                    "num_examples": int(metrics["num-examples"]),
                    "train_seconds": float(metrics.get("train-seconds", 0.0)),
                    "bytes_down": down.get("payload", 0),
                    "bytes_up": payload_bytes(arrays),
                    "wire_bytes_down": down.get("wire", 0),
                    "wire_bytes_up": wire_bytes(arrays),
                }
            )
            states.append(arrays.to_torch_state_dict())
            weights.append(float(metrics[self.weighted_by_key]))
            losses.append(float(metrics["train-loss"]))
            prev = {
                k[len(PREV_EVAL_PREFIX) :]: v
                for k, v in metrics.items()
                if k.startswith(PREV_EVAL_PREFIX)
            }
            if prev:
                self._record_eval(server_round - 1, part, prev, None)
        elapsed = time.perf_counter() - self.t0
        for m in valid:
            metrics = next(iter(m.content.metric_records.values()))
            self._row(server_round, int(metrics["partition-id"]))["elapsed_s"] = elapsed
        agg = aggregate_shared(states, weights)
        mean = MetricRecord({"train-loss": sum(losses) / len(losses)})
        return ArrayRecord(agg), mean

    # ------------------------------------------------------------------ evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any
    ) -> Iterable[Message]:
        if self.fused_evaluation and server_round < self.num_rounds:
            return []  # evaluated inside the next round's train message
        msgs = list(super().configure_evaluate(server_round, arrays, config, grid))
        for m in msgs:
            self._log("down", "evaluate", server_round, m)
        return msgs

    def _record_eval(
        self, rnd: int, part: int, metrics: Any, bytes_down: int | None
    ) -> None:
        row = self._row(rnd, part)
        if bytes_down is not None:
            row["bytes_down_eval"] = bytes_down
        for k, v in metrics.items():
            if k in ("partition-id", "num-examples"):
                continue
            row[k] = float(v)
        if self.verbose:
            print(
                f"[{self.exp_id}] round {rnd}/{self.num_rounds} "
                f"{row['client']:>8s}  loss {row.get('train_loss', float('nan')):.4f}"
                f"  val BA {row.get('val_balanced_accuracy', float('nan')):.3f}"
                f"  ({row.get('elapsed_s', time.perf_counter() - self.t0):.1f} s)",
                flush=True,
            )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        valid = self._split("evaluate", server_round, replies)
        if not valid:
            return None
        vals = []
        for m in valid:
            metrics = next(iter(m.content.metric_records.values()))
            part = int(metrics["partition-id"])
            node = int(m.metadata.src_node_id)
            down = self._down.get(("evaluate", server_round, node), {})
            self._record_eval(server_round, part, metrics, down.get("payload", 0))
            vals.append(float(metrics.get("val_balanced_accuracy", float("nan"))))
        finite = [v for v in vals if v == v]
        return MetricRecord(
            {"val_balanced_accuracy": sum(finite) / len(finite) if finite else 0.0}
        )

    # ------------------------------------------------------------------ output
    def collect(self) -> dict[str, Any]:
        """Everything the run produced, as plain JSON-able data."""
        for f in self.failures:
            if f["partition"] is None:
                f["partition"] = self.node_partition.get(f["node_id"])
        return {
            "rows": [self.rows[k] for k in sorted(self.rows)],
            "failures": self.failures,
            "messages": self.messages,
            "node_partition": {str(k): v for k, v in self.node_partition.items()},
        }
