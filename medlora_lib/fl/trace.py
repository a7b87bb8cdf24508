"""Where a federated round's time goes, message by message (issue 10; chapter
``notebooks/06_communication_analysis``, ``benchmarks/bench_federation.py``).

Off unless ``$MEDLORA_TRACE_DIR`` names a folder. Then the ServerApp records, for every
message it pushes, the wall time of the push and of the reply's arrival, and the
ClientApp records, for every message it handles, the wall time it entered and left the
handler and how much of that was the model's own work (training and evaluation) and the
site's state writes. Each process appends JSON lines to its own file
(``<pid>.jsonl``), so the Ray actors, the ``flwr-simulation`` process and SuperNodes on
one machine never share a file; :func:`breakdown` joins them on the message id.

The clocks are ``time.time()`` of processes on one machine (the Simulation Runtime, a
loopback deployment): comparable to well under a millisecond.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "ENV",
    "trace_dir",
    "tracing",
    "record",
    "read_trace",
    "breakdown",
    "per_round",
]

#: the environment variable that turns tracing on (a folder)
ENV = "MEDLORA_TRACE_DIR"


def trace_dir() -> Path | None:
    """The folder traces go to, or None (tracing off)."""
    d = os.environ.get(ENV, "").strip()
    return Path(d) if d else None


@contextlib.contextmanager
def tracing(folder: str | Path) -> Iterator[Path]:
    """Trace every run started inside the block to ``folder`` (``$MEDLORA_TRACE_DIR``
    set in this process, so that the Flower processes it starts inherit it; restored
    on exit)."""
    before = os.environ.get(ENV)
    os.environ[ENV] = str(folder)
    try:
        yield Path(folder)
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


def record(kind: str, **fields: Any) -> None:
    """Append one record (``kind`` plus ``fields``) to this process's trace file.

    Does nothing when tracing is off. A record is one ``write`` of one line to a file
    opened for appending, so a process killed mid-run leaves whole lines only.
    """
    d = trace_dir()
    if d is None:
        return
    d.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"kind": kind, "pid": os.getpid(), **fields}, default=float)
    with open(d / f"{os.getpid()}.jsonl", "a", encoding="utf-8") as fh:
        fh.write(line + "\n")


def read_trace(d: str | Path) -> list[dict[str, Any]]:
    """Every record under ``d`` (all processes' files)."""
    out: list[dict[str, Any]] = []
    for p in sorted(Path(d).glob("*.jsonl")):
        for line in p.read_text(encoding="utf-8").splitlines():
            if line.strip():
                out.append(json.loads(line))
    return out


def breakdown(records: list[dict[str, Any]]) -> Any:
    """One row per message that went down and came back, with where its time went.

    Columns: ``run`` (the experiment's run key), ``phase``, ``round``, ``site``, ``total`` (push to reply received, at the
    server), ``down`` (push to handler entry: the Simulation Runtime's sweep, Ray's
    hand-off and Flower's message handling in the actor, or the SuperNode's pull),
    ``compute`` (training + evaluation inside the handler), ``state`` (the site's state
    writes), ``handler_other`` (the rest of the handler: loading state, building
    records), ``up`` (handler exit to the reply's arrival at the server) — all seconds —
    and ``pid``, the process that handled it (a Ray actor, a SuperNode's ClientApp).
    Messages without a handler record (a site that failed or was away) are left out.

    Raises:
        ValueError: no message has both a server and a handler record.
    """
    import pandas as pd

    server = {r["message_id"]: r for r in records if r["kind"] == "server"}
    rows = []
    for r in records:
        if r["kind"] != "handler" or r["message_id"] not in server:
            continue
        s = server[r["message_id"]]
        if s.get("t_reply") is None:
            continue
        handler = r["t_exit"] - r["t_enter"]
        rows.append(
            {
                "run": s.get("run"),
                "phase": s["phase"],
                "round": s["round"],
                "site": s["site"],
                "total": s["t_reply"] - s["t_push"],
                "down": r["t_enter"] - s["t_push"],
                "compute": r["compute_s"],
                "state": r["state_s"],
                "handler_other": handler - r["compute_s"] - r["state_s"],
                "up": s["t_reply"] - r["t_exit"],
                "t_push": s["t_push"],
                "t_enter": r["t_enter"],
                "t_exit": r["t_exit"],
                "t_reply": s["t_reply"],
                "pid": r.get("pid"),
            }
        )
    if not rows:
        raise ValueError(
            "breakdown: no message has both a server record and a handler record; "
            f"was ${ENV} set for the ServerApp and the ClientApp processes?"
        )
    return pd.DataFrame(rows)


def per_round(msgs: Any) -> Any:
    """Per (phase, round) of :func:`breakdown`'s rows: ``wall`` (first push to last
    reply), the handlers' ``compute`` / ``state`` / ``handler_other`` summed, and
    ``idle`` — the part of ``wall`` during which no handler ran (the union of the
    handlers' intervals subtracted): Flower's hand-offs, Ray, the server's pull. With
    one client at a time ``idle`` is exactly the orchestration's cost of the round."""
    import pandas as pd

    rows = []
    for (phase, rnd), g in msgs.groupby(["phase", "round"], sort=True):
        spans = sorted(zip(g["t_enter"], g["t_exit"], strict=True))
        busy, end = 0.0, float("-inf")
        for a, b in spans:  # the union of the handler intervals
            if b <= end:
                continue
            busy += b - max(a, end)
            end = b
        wall = float(g["t_reply"].max() - g["t_push"].min())
        rows.append(
            {
                "phase": phase,
                "round": rnd,
                "messages": len(g),
                "wall": wall,
                "compute": float(g["compute"].sum()),
                "state": float(g["state"].sum()),
                "handler_other": float(g["handler_other"].sum()),
                "idle": wall - busy,
            }
        )
    return pd.DataFrame(rows)
