"""The Flower ``ServerApp`` (chapter ``notebooks/03_fedavg_lora``).

:func:`run_experiments` runs one or several experiments one after the other on the same
grid (several methods or seeds inside one simulation: the Ray start-up is paid once). For
each it builds the method's model to get the initial shared tensors, starts a
:class:`~medlora_lib.fl.strategies.MedloraFedAvg` for ``fed.num_rounds`` rounds and collects
the per-client rows, failures and message log.

Two ways in:

* :func:`make_server_app` — used by :func:`medlora_lib.fl.simulate`: the experiments and a
  result sink are passed in Python.
* the module-level ``app`` — used by the Deployment Runtime (``flwr run``): reads the
  absolute paths ``spec-path`` (JSON list of experiments) and ``out-path`` (where the
  results JSON is written) from the run config.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from medlora_lib.fl.strategies import MedloraFedAvg
from medlora_lib.fl.task import ExperimentSpec, build_adapted_model

__all__ = ["app", "make_server_app", "run_experiments"]


def run_experiments(
    grid: Grid,
    specs: list[ExperimentSpec],
    record_messages: bool = False,
    verbose: bool = True,
    sink: Callable[[ExperimentSpec, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every experiment in ``specs`` on ``grid``, one after the other.

    Returns:
        One dict per experiment: ``exp_id``, ``rows``, ``failures``, ``messages``,
        ``seconds``.
    """
    from medlora_lib.adapters import get_shared_state

    if hasattr(grid, "pull_interval"):
        # The in-memory grid of the Simulation Runtime sleeps ``pull_interval`` (0.1 s)
        # between polls for replies; at ~1 s per round that idles the server for up to
        # 10 % of every round. Polling the in-memory state every 5 ms costs nothing.
        grid.pull_interval = min(float(grid.pull_interval), 0.005)
    outputs = []
    for spec in specs:
        t0 = time.perf_counter()
        cfg = spec.cfg
        model = build_adapted_model(cfg)
        initial = ArrayRecord(get_shared_state(model))
        del model
        strategy = MedloraFedAvg(
            num_clients=len(spec.clients),
            exp_id=spec.exp_id,
            num_rounds=cfg.fed.num_rounds,
            proximal_mu=cfg.fed.proximal_mu if spec.method == "fedprox_lora" else 0.0,
            record_messages=record_messages,
            verbose=verbose,
            client_names=spec.clients,
        )
        conf = {"exp-spec": spec.to_json()}
        result = strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=cfg.fed.num_rounds,
            train_config=ConfigRecord(dict(conf)),
            evaluate_config=ConfigRecord(dict(conf)),
        )
        out = {"exp_id": spec.exp_id, **strategy.collect()}
        # the last aggregate: the global shared state a new site would start from
        out["final_shared"] = (
            result.arrays.to_torch_state_dict() if result.arrays is not None else None
        )
        out["seconds"] = time.perf_counter() - t0
        outputs.append(out)
        if sink is not None:
            sink(spec, out)
    return outputs


def make_server_app(
    specs: list[ExperimentSpec],
    sink: Callable[[ExperimentSpec, dict[str, Any]], None],
    record_messages: bool = False,
    verbose: bool = True,
) -> ServerApp:
    """A ``ServerApp`` that runs ``specs`` and hands each result to ``sink``."""
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        run_experiments(grid, specs, record_messages, verbose, sink)

    return server


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry: experiments from ``spec-path``, results to ``out-path``."""
    spec_path = Path(str(context.run_config["spec-path"]))
    out_path = Path(str(context.run_config["out-path"]))
    blob = json.loads(spec_path.read_text())
    specs = [ExperimentSpec(**s) for s in blob["specs"]]
    outputs = run_experiments(
        grid, specs, bool(blob.get("record_messages", False)), True
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for o in outputs:  # tensors do not go into the JSON of the deployment's result
        o.pop("final_shared", None)
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(outputs, default=str))
    tmp.replace(out_path)
