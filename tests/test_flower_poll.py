"""``fl/flower_poll``: Flower's LinkState sweep, woken by each stored message (issue 10).

The end-to-end check (a real ``flwr run`` used it, same results as the plain loop) is in
``tests/test_fl_simulation.py``; the time it saves is printed by
``benchmarks/bench_federation.py``.
"""

from __future__ import annotations

import hashlib
import inspect
import threading
import time
from queue import Empty, Queue

import flwr
import pytest
from flwr.server.superlink.fleet.vce import vce_api

from medlora_lib.fl import flower_poll

#: sha256 of Flower 1.42's ``vce_api.add_messages_to_queue`` source: a Flower release
#: that changes the sweep must be read again before ``SUPPORTED`` takes it
FLOWER_142_SWEEP = "953f4bd41a931a7779a4a670ab17b633f6e20b08a0128535328674466419777a"


class FakeLinkState:
    """The two LinkState calls the sweep makes, with Flower's semantics (undelivered, limit)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.store: list[list] = []
        self.sweeps = 0

    def store_message_ins(self, node_id: int, msg: str) -> str:
        with self.lock:
            self.store.append([node_id, msg, False])
        return msg

    def get_message_ins(self, node_id: int, limit: int | None) -> list[str]:
        out = []
        with self.lock:
            self.sweeps += 1
            for m in self.store:
                if m[0] == node_id and not m[2]:
                    m[2] = True
                    out.append(m[1])
                if limit and len(out) == limit:
                    break
        return out


def _sweeping(state, monkeypatch, idle: float):
    monkeypatch.setattr(flower_poll, "IDLE_WAKE_S", idle)
    q: Queue = Queue()
    stop = threading.Event()
    th = threading.Thread(
        target=flower_poll.add_messages_to_queue, args=(state, q, {1: 0, 2: 1}, stop)
    )
    th.start()
    return q, stop, th


def test_a_stored_message_is_handed_over_without_waiting_for_a_sweep(monkeypatch):
    # with the idle wake at 60 s, only the store's event can hand the message over
    state = FakeLinkState()
    q, stop, th = _sweeping(state, monkeypatch, idle=60.0)
    try:
        time.sleep(0.2)  # the sweep is now waiting
        state.store_message_ins(2, "train-2a")
        state.store_message_ins(2, "train-2b")  # limit=1 per node: a second sweep
        state.store_message_ins(1, "train-1")
        got = sorted(q.get(timeout=10) for _ in range(3))
        assert got == ["train-1", "train-2a", "train-2b"]
        with pytest.raises(Empty):
            q.get(timeout=0.3)  # each message once
    finally:
        stop.set()
        state.store_message_ins(1, "wake")  # wakes the wait so the thread sees f_stop
        th.join(timeout=10)
    assert not th.is_alive() and flower_poll.active()


def test_the_sweep_stops_on_f_stop_within_its_idle_wake(monkeypatch):
    state = FakeLinkState()
    q, stop, th = _sweeping(state, monkeypatch, idle=0.05)
    stop.set()
    th.join(timeout=5)
    assert not th.is_alive()


def test_install_replaces_only_the_sweep_and_can_be_undone(monkeypatch):
    monkeypatch.delenv("MEDLORA_FLOWER_POLL", raising=False)
    flower_poll.uninstall()
    original = vce_api.add_messages_to_queue
    assert original is not flower_poll.add_messages_to_queue
    try:
        assert flower_poll.install() and flower_poll.install()  # idempotent
        assert vce_api.add_messages_to_queue is flower_poll.add_messages_to_queue
    finally:
        flower_poll.uninstall()
    assert vce_api.add_messages_to_queue is original
    flower_poll.install()  # as the ServerApp module left it


def test_install_keeps_flowers_sweep_when_asked_or_for_another_release(monkeypatch):
    flower_poll.uninstall()
    original = vce_api.add_messages_to_queue
    try:
        monkeypatch.setenv("MEDLORA_FLOWER_POLL", "flower")
        assert not flower_poll.install()
        monkeypatch.delenv("MEDLORA_FLOWER_POLL")
        monkeypatch.setattr(flwr, "__version__", "1.43.0")
        assert not flower_poll.install()
        assert vce_api.add_messages_to_queue is original
    finally:
        monkeypatch.undo()
        flower_poll.install()


def test_the_replaced_sweep_is_flowers_142_one():
    flower_poll.uninstall()
    try:
        src = inspect.getsource(vce_api.add_messages_to_queue)
    finally:
        flower_poll.install()
    assert str(flwr.__version__).startswith(flower_poll.SUPPORTED)
    digest = hashlib.sha256(src.encode()).hexdigest()
    assert "f_stop.wait(0.1)" in src and "limit=1" in src
    assert digest == FLOWER_142_SWEEP, src


def test_a_second_sweep_on_the_same_linkstate_is_woken_too(monkeypatch):
    # one wrapper per LinkState, one event: a later sweep (another run) is woken as well
    state = FakeLinkState()
    for msg in ("first", "second"):
        q, stop, th = _sweeping(state, monkeypatch, idle=60.0)
        try:
            time.sleep(0.2)
            while not q.empty():  # the previous sweep's wake-up message
                assert q.get() == "wake"
            state.store_message_ins(1, msg)
            assert q.get(timeout=10) == msg
        finally:
            stop.set()
            state.store_message_ins(2, "wake")
            th.join(timeout=10)
        assert not th.is_alive()
