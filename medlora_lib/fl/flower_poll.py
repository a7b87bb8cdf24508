"""Hand a message to the Simulation Runtime when it arrives, not at Flower's next 100 ms sweep.

Chapter ``notebooks/06_communication_analysis`` and ``benchmarks/bench_federation.py``
(issue 10: Flower's share of a run). Flower 1.42's Simulation Runtime moves the
ServerApp's messages from its LinkState to the Ray actors in one thread,
``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue``, which sweeps the
LinkState and then sleeps a hard-coded ``f_stop.wait(0.1)``. Every train and evaluate
exchange therefore waits 50 ms on average (up to 100 ms) before any site starts
(``bench_federation.py --sweep-ab``: 52–70 ms, 4.2 % of a ``cpu`` round, 2026-12-03).

:func:`install` replaces that one function with :func:`add_messages_to_queue` below,
which does the same sweep (same LinkState calls, same ``limit=1`` per node, same
queue) but waits on an event that the LinkState's ``store_message_ins`` sets, so a
pushed message is handed over at once; with nothing pushed it still wakes every 100 ms
to see ``f_stop``. Nothing else of Flower changes (``tests/test_flower_poll.py``), and a
real simulation still equals the plain in-process loop row for row
(``tests/test_fl_simulation.py``).

It is installed when the ServerApp module is imported, which in the Simulation
Runtime happens in the ``flwr-simulation`` process while Ray starts (seconds before
the sweep thread does). It is only installed for the Flower versions it was written
against (``SUPPORTED``); ``MEDLORA_FLOWER_POLL=flower`` keeps Flower's own sweep.
:func:`active` says whether the sweep thread of this process runs it.
"""

from __future__ import annotations

import os
import threading
from queue import Queue
from typing import Any

__all__ = ["SUPPORTED", "install", "active", "add_messages_to_queue"]

#: Flower releases whose ``vce_api.add_messages_to_queue`` this replaces, checked
#: line by line against their source (the sweep is the same in every 1.42 patch release).
SUPPORTED = ("1.42.",)

#: how often the sweep wakes without a new message (Flower's own interval), seconds
IDLE_WAKE_S = 0.1

_installed: dict[str, Any] = {}
_running = threading.Event()


def add_messages_to_queue(
    state: Any,
    queue: Queue,
    nodes_mapping: dict,
    f_stop: threading.Event,
) -> None:
    """Flower's sweep (``vce_api.add_messages_to_queue``), woken by each stored message.

    Same loop as Flower's: for every node, take at most one undelivered message from the
    LinkState and put it on the workers' queue; repeat until ``f_stop``. Between sweeps
    it waits on an event set by ``state.store_message_ins`` (wrapped once on this
    LinkState instance, which keeps the event) instead of sleeping 100 ms. The event is
    cleared *before* a sweep, so a message stored during the sweep wakes the next one
    at once.
    """
    arrived = getattr(state, "_medlora_arrived", None)
    if arrived is None:
        arrived = threading.Event()
        store = state.store_message_ins

        def store_message_ins(*args: Any, **kwargs: Any) -> Any:
            out = store(*args, **kwargs)
            arrived.set()
            return out

        state.store_message_ins = store_message_ins
        state._medlora_arrived = arrived
    _running.set()
    while not f_stop.is_set():
        arrived.clear()
        got = 0
        for node_id in nodes_mapping.keys():
            for msg in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(msg)
                got += 1
        if not got:
            arrived.wait(IDLE_WAKE_S)
        # with a message taken, sweep again at once: a node may hold another
        # (``limit=1``), exactly as Flower's next sweep would take it


def install() -> bool:
    """Replace Flower's sweep with :func:`add_messages_to_queue`; ``True`` if it is in place.

    Does nothing (returns ``False``) for a Flower release not in :data:`SUPPORTED` or
    with ``MEDLORA_FLOWER_POLL=flower``. Idempotent.
    """
    if os.environ.get("MEDLORA_FLOWER_POLL", "").strip().lower() == "flower":
        return False
    import flwr
    from flwr.server.superlink.fleet.vce import vce_api

    if not str(flwr.__version__).startswith(SUPPORTED):
        return False
    if vce_api.add_messages_to_queue is not add_messages_to_queue:
        _installed.setdefault("original", vce_api.add_messages_to_queue)
        vce_api.add_messages_to_queue = add_messages_to_queue
    return True


def uninstall() -> None:
    """Put Flower's own sweep back (tests)."""
    from flwr.server.superlink.fleet.vce import vce_api

    if "original" in _installed:
        vce_api.add_messages_to_queue = _installed.pop("original")


def active() -> bool:
    """Whether a Simulation-Runtime sweep thread in this process runs the fast sweep."""
    return _running.is_set()
