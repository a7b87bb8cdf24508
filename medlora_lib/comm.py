"""Bytes on the wire: measured from Flower's ArrayRecords, next to the closed form.

Chapter ``notebooks/06_communication_analysis`` (and the bytes-per-round table of
``notebooks/04_med_dual_lora``).

Two measured figures per message:

* ``payload`` — the tensors' raw bytes, ``sum(prod(shape) * itemsize)`` over the
  ``Array`` objects of the ``ArrayRecord`` (read from the message itself). This is what the
  closed form ``adapters.shared_bytes`` predicts, and the tests check they are equal.
* ``wire`` — ``ArrayRecord.count_bytes()``: Flower's own count, which adds each array's
  serialisation header and the key strings (a few hundred bytes per tensor).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "payload_bytes",
    "wire_bytes",
    "record_summary",
    "closed_form_bytes",
    "bytes_table",
]


def payload_bytes(record: Any) -> int:
    """Raw tensor bytes of an ``ArrayRecord`` (``prod(shape) * itemsize`` per array)."""
    total = 0
    for arr in record.values():
        total += int(np.prod(arr.shape, dtype=np.int64)) * np.dtype(arr.dtype).itemsize
    return int(total)


def wire_bytes(record: Any) -> int:
    """Flower's ``ArrayRecord.count_bytes()`` (payload + headers + key strings)."""
    return int(record.count_bytes())


def record_summary(content: Any) -> dict[str, dict[str, Any]]:
    """What a message's ``RecordDict`` carries: per record, its type, keys and bytes.

    Used by the strategy's message log (the privacy test reads it).
    """
    out: dict[str, dict[str, Any]] = {}
    for name, rec in content.items():
        kind = type(rec).__name__
        entry: dict[str, Any] = {"type": kind, "keys": list(rec.keys())}
        if kind == "ArrayRecord":
            entry["payload_bytes"] = payload_bytes(rec)
            entry["wire_bytes"] = wire_bytes(rec)
        else:
            entry["value_types"] = sorted({type(v).__name__ for v in rec.values()})
        out[name] = entry
    return out


def closed_form_bytes(config: Any, bytes_per_value: int = 4) -> dict[str, int]:
    """Closed-form per-round bytes of a config's method (no model weights loaded).

    Args:
        config: an :class:`~medlora_lib.config.ExperimentConfig`.
        bytes_per_value: 4 for float32.

    Returns:
        ``{"shared_params", "shared_bytes", "trainable_params", "private_params"}``; one
        client sends ``shared_bytes`` up and receives as many down per round.
    """
    from medlora_lib.adapters import closed_form_lora_params
    from medlora_lib.models.convvit import SIZES
    from medlora_lib.pipeline import adapter_config

    dims = {"mlp_ratio": 4.0, "num_classes": 2, **SIZES[config.model.size]}
    dims.update(config.model.overrides)
    cf = closed_form_lora_params(adapter_config(config), dims)
    return {
        "shared_params": int(cf["shared"]),
        "shared_bytes": int(cf["shared"]) * int(bytes_per_value),
        "trainable_params": int(cf["trainable"]),
        "private_params": int(cf["private"]),
    }


def bytes_table(results: Any) -> Any:
    """Measured bytes next to the closed form, one row per federated method.

    Chapters ``03_fedavg_lora``, ``04_med_dual_lora`` and ``06_communication_analysis``.
    ``results`` are ``RunResult`` objects; the first run of each federated method is read
    (every seed of a method sends the same tensors). Methods that send no adapter
    (``local``, ``centralized``) are left out.

    Returns:
        A ``pandas.DataFrame`` indexed by method: shared parameters, the closed-form
        bytes per client and direction, the measured payload up / down and the
        serialised size up per client and round, whether they agree, and the whole run's
        traffic (all clients, up + down, MB).
    """
    import pandas as pd

    from medlora_lib.adapters import METHODS

    def one(values: list[int]) -> Any:
        return values[0] if len(values) == 1 else values

    rows, seen = [], set()
    for r in results:
        if r.method in seen or not METHODS[r.method].federated:
            continue
        seen.add(r.method)
        cf = closed_form_bytes(r.config)
        rows.append(
            {
                "method": r.method,
                "shared params": cf["shared_params"],
                "closed form (B)": cf["shared_bytes"],
                "measured up (B)": one(r.comm["bytes_up_per_client_round"]),
                "measured down (B)": one(r.comm["bytes_down_per_client_round"]),
                "serialised up (B)": one(
                    r.comm.get("wire_bytes_up_per_client_round") or []
                ),
                "measured = closed form": bool(r.comm["matches_closed_form"]),
                "whole run, all clients (MB)": (
                    r.comm["total_bytes_up"] + r.comm["total_bytes_down"]
                )
                / 1e6,
            }
        )
    return pd.DataFrame(rows).set_index("method")
