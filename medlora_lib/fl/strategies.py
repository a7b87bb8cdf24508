"""The server strategy: Flower's FedAvg with sample-weighted aggregation of the shared part.

Chapter ``notebooks/03_fedavg_lora`` (the federated loop) and
``notebooks/06_communication_analysis`` (bytes measured from the messages).

:class:`MedloraFedAvg` subclasses :class:`flwr.serverapp.strategy.FedAvg` and keeps only
strategy work:

* :meth:`~MedloraFedAvg.configure_train` / :meth:`~MedloraFedAvg.configure_evaluate`
  build one message per site (the sites of the round are chosen by the round loop,
  :mod:`medlora_lib.fl.federation`, which knows who answered the last time) carrying
  the shared tensors and the round's config — server round, learning rate, proximal μ
  (FedProx-LoRA; like Flower's ``FedProx`` the client adds the term), the
  evaluate-first flag, the run key and the experiment index — and nothing else;
* :meth:`~MedloraFedAvg.aggregate_train` averages the replies' shared ``ArrayRecord``
  with :func:`medlora_lib.adapters.aggregate_shared` (float64, weights =
  ``num-examples``, replies in site order so the sum is the same whatever the arrival
  order).

The round loop itself (time-outs, the minimum number of sites, checkpoints, resume) is
not Flower's ``Strategy.start``: that loop has no resume, no per-round checkpoint and
waits without limit for nodes, which a hospital deployment cannot accept.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

__all__ = ["MedloraFedAvg", "ROUND_CONFIG_KEYS", "PREV_EVAL_PREFIX", "TEST_ABOVE_KEYS"]

#: Prefix of the metrics of the previous round's model that a train reply carries
#: (evaluation rides on the next round's train message).
PREV_EVAL_PREFIX = "prev-eval/"

#: The only keys of a train message's config (a test checks every message).
ROUND_CONFIG_KEYS = (
    "server-round",
    "lr",
    "proximal-mu",
    "evaluate-first",
    "run-key",
    "experiment",
)

#: Added to one site's train / evaluate config by the ServerApp (``GridSites._step``):
#: per variant prefix, the best validation value of the site's earlier rounds; the
#: site tests the received model only when it beats it (``train.test_every_round``).
TEST_ABOVE_KEYS = {"": "test-above", "global_only_": "global-only-test-above"}


class MedloraFedAvg(FedAvg):
    """FedAvg over the shared tensors of the chosen sites.

    Args:
        lr: the learning rate every site uses this run (sent each round).
        proximal_mu: FedProx coefficient sent as ``proximal-mu`` (0 = FedAvg).
        run_key: the run's id (the sites key their saved state by it).
        experiment: index of the experiment inside a batched run (0 otherwise).
        message_ttl: seconds a message stays valid (the round time-out), so a site
            that comes back late does not work on a stale round.
        uniform: average the sites with equal weights instead of by ``num-examples``
            (site-level DP: the noise is calibrated to one site's share ``1/m``).
    """

    def __init__(
        self,
        lr: float,
        proximal_mu: float = 0.0,
        run_key: str = "",
        experiment: int = 0,
        message_ttl: float | None = None,
        uniform: bool = False,
    ) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0)
        self.uniform = bool(uniform)
        self.lr = float(lr)
        self.proximal_mu = float(proximal_mu)
        self.run_key = run_key
        self.experiment = int(experiment)
        self.message_ttl = message_ttl
        self.nodes: list[int] = []  # set by the round loop before each configure_*

    def round_config(self, server_round: int, evaluate_first: bool) -> ConfigRecord:
        """The config every train message of ``server_round`` carries."""
        return ConfigRecord(
            {
                "server-round": int(server_round),
                "lr": self.lr,
                "proximal-mu": self.proximal_mu,
                "evaluate-first": bool(evaluate_first),
                "run-key": self.run_key,
                "experiment": self.experiment,
            }
        )

    def _messages(
        self, kind: str, arrays: ArrayRecord, config: ConfigRecord, grid: Any
    ) -> list[Message]:
        return [
            Message(
                RecordDict({"arrays": arrays, "config": config}),
                dst_node_id=node,
                message_type=kind,
                group_id=str(config["server-round"]),
                ttl=self.message_ttl,
            )
            for node in self.nodes
        ]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any
    ) -> Iterable[Message]:
        """One train message per site of the round (``self.nodes``)."""
        return self._messages("train", arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any
    ) -> Iterable[Message]:
        """One evaluate message per site (``self.nodes``)."""
        return self._messages("evaluate", arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Sample-weighted (or, with ``uniform``, plain) mean of the replies' shared
        tensors, in the given order."""
        from medlora_lib.adapters import aggregate_shared

        states, weights, losses = [], [], []
        for m in replies:
            arrays = m.content["arrays"]
            metrics = m.content["metrics"]
            states.append(arrays.to_torch_state_dict())
            weights.append(
                1.0 if self.uniform else float(metrics[self.weighted_by_key])
            )
            losses.append(float(metrics["train-loss"]))
        if not states:
            return None, None
        agg = aggregate_shared(states, weights)
        return ArrayRecord(agg), MetricRecord({"train-loss": sum(losses) / len(losses)})
