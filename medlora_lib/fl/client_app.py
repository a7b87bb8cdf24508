"""The Flower ``ClientApp``: one client per vendor (chapter ``notebooks/03_fedavg_lora``).

``partition-id`` from the node config picks the client (canonical vendor order). Each
message carries the experiment (``exp-spec``, JSON) in its ``ConfigRecord`` and the shared
tensors in its ``ArrayRecord``. What must not leave the site — Med-DualLoRA's local adapter,
FedSA-LoRA's B, a private head — is stored in ``context.state`` under
``private/<exp_id>`` and is never put in a reply: a reply holds exactly one ``ArrayRecord``
with the keys of :func:`medlora_lib.adapters.get_shared_state` (checked before sending) and
one ``MetricRecord`` of scalars.

The same app runs in the Simulation Runtime (:func:`medlora_lib.fl.simulate`) and in the
Deployment Runtime (``medlora deploy``).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from medlora_lib.fl.task import ExperimentSpec, get_runtime

__all__ = ["app", "PRIVATE_PREFIX", "PREV_EVAL_PREFIX"]

PRIVATE_PREFIX = "private/"
#: Prefix of the metrics of the previous round's model that a train reply carries
#: (evaluation fused into the next round's train message; see ``MedloraFedAvg``).
PREV_EVAL_PREFIX = "prev-eval/"

app = ClientApp()


class InjectedFailure(RuntimeError):
    """Raised by the test hook ``ExperimentSpec.fail``."""


def _setup(msg: Message, context: Context, phase: str):
    cfg = msg.content["config"]
    spec = ExperimentSpec.from_json(str(cfg["exp-spec"]))
    partition = int(context.node_config["partition-id"])
    rnd = int(cfg["server-round"])
    fail = spec.fail or {}
    if (
        fail.get("partition") == partition
        and int(fail.get("round", -1)) == rnd
        and fail.get("phase", "train") == phase
    ):
        raise InjectedFailure(
            f"injected failure: partition {partition}, round {rnd}, {phase}"
        )
    rt = get_runtime(spec, partition)
    shared = msg.content["arrays"].to_torch_state_dict()
    key = PRIVATE_PREFIX + spec.exp_id
    private = context.state[key].to_torch_state_dict() if key in context.state else None
    return spec, partition, rnd, rt, shared, private, key


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load global + private state, train locally, reply with the shared tensors only.

    With ``evaluate-first`` in the config (rounds after the first), the client first
    evaluates the model it just received — the previous round's aggregate with its own
    private part, exactly the model a separate evaluate message would carry — and adds
    those metrics to the reply under :data:`PREV_EVAL_PREFIX`. That saves one message
    round trip per round; the result is the same.
    """
    spec, partition, rnd, rt, shared, private, key = _setup(msg, context, "train")
    cfg = msg.content["config"]
    mu = float(cfg.get("proximal-mu", 0.0))
    prev_eval: dict[str, float] = {}
    if bool(cfg.get("evaluate-first", False)):
        ev = rt.evaluate_round(shared, private)[spec.clients[partition]]
        prev_eval = {PREV_EVAL_PREFIX + k: float(v) for k, v in ev.items()}
    out = rt.train_round(shared, private, rnd, proximal_mu=mu)
    context.state[key] = ArrayRecord(out.private)
    if list(out.shared) != rt.shared_keys:  # never send anything but the shared part
        raise RuntimeError(
            "reply keys differ from the shared tensors; refusing to send"
        )
    metrics = MetricRecord(
        {
            "num-examples": out.num_examples,
            "partition-id": partition,
            "train-loss": out.train_loss,
            "train-seconds": out.seconds,
            **prev_eval,
        }
    )
    content = RecordDict({"arrays": ArrayRecord(out.shared), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate this client's deployed model (received global + private) on val and test."""
    spec, partition, rnd, rt, shared, private, key = _setup(msg, context, "evaluate")
    per_client = rt.evaluate_round(shared, private)
    metrics = per_client[spec.clients[partition]]
    n_val = int(metrics.get("val_n", 0))
    record = MetricRecord({"num-examples": n_val, "partition-id": partition, **metrics})
    return Message(content=RecordDict({"metrics": record}), reply_to=msg)
