"""Federated fine-tuning with Flower (Message API): apps, strategy, simulation, deployment.

Chapters ``notebooks/03_fedavg_lora`` and ``notebooks/04_med_dual_lora``.

- :func:`simulate` — the one entry to run experiments (Flower's Simulation Runtime for the
  federated methods; ``local`` / ``centralized`` in-process through the same loop).
- :class:`RunResult` — per-round × per-client table, final per-client metrics,
  communication, provenance; ``save`` / ``load``.
- :mod:`medlora_lib.fl.client_app`, :mod:`medlora_lib.fl.server_app` — the Flower apps
  (imported lazily: ``import medlora_lib.fl`` does not import Flower).
- :func:`medlora_lib.fl.deploy.deploy` — the same apps on the Deployment Runtime.
- :mod:`medlora_lib.fl.federation` — the one round loop; :mod:`~medlora_lib.fl.sites`
  (a client is a site), :mod:`~medlora_lib.fl.site_state` (its state on disk),
  :mod:`~medlora_lib.fl.checkpoint` (the server's checkpoints and resume).

Note: ``medlora_lib.fl.simulate`` is the *function*; the module of the same name is
``sys.modules["medlora_lib.fl.simulate"]`` (``from medlora_lib.fl.simulate import ...`` works).
"""

from __future__ import annotations

from medlora_lib.fl.result import RunResult
from medlora_lib.fl.simulate import run_inprocess, simulate
from medlora_lib.fl.task import FEDERATED_METHODS, INPROCESS_METHODS

__all__ = [
    "RunResult",
    "simulate",
    "run_inprocess",
    "FEDERATED_METHODS",
    "INPROCESS_METHODS",
]
