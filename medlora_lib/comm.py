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
    "cumulative_traffic",
    "bytes_to_reach",
    "BASE_VARIANTS",
    "model_payload_table",
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


def cumulative_traffic(results: Any) -> Any:
    """Bytes of the whole federation per round and cumulated, one block per run.

    Chapter ``06_communication_analysis``. Per round: the shared tensors up and down of
    every site plus, in the last round, the final evaluation download.

    Returns:
        A ``pandas.DataFrame`` with ``round, bytes_up, bytes_down, bytes_down_eval,
        total, cumulative_MB, method, seed``.
    """
    import pandas as pd

    blocks = []
    for r in results:
        g = r.rounds.fillna({"bytes_down_eval": 0})
        cols = ["bytes_up", "bytes_down", "bytes_down_eval"]
        by_round = g.groupby("round")[cols].sum()
        by_round["total"] = by_round.sum(axis=1)
        by_round["cumulative_MB"] = by_round["total"].cumsum() / 1e6
        blocks.append(
            by_round.reset_index().assign(method=r.method, seed=r.config.seed)
        )
    return pd.concat(blocks, ignore_index=True)


def bytes_to_reach(
    results: Any,
    target: float,
    metric: str = "val_balanced_accuracy",
) -> tuple[Any, Any]:
    """How many bytes each method moves before its learning curve reaches ``target``.

    Chapter ``06_communication_analysis``. The curve of a run is ``metric`` per round,
    averaged over sites; the method's curve is its mean over seeds, against the mean
    cumulative traffic (:func:`cumulative_traffic`). It is read on the **validation**
    split by default — reading the test curve to pick "the round it got there" would
    select on the test set.

    Returns:
        ``(curves, reach)``: the mean curve per method and round (``method, round,
        value, MB``) and one row per method (best mean value on the curve, the first
        round at or above ``target`` and the MB moved by then; empty when never).
    """
    import pandas as pd

    traffic = cumulative_traffic(results).set_index(["method", "seed", "round"])
    rows = []
    for r in results:
        value = r.rounds.groupby("round")[metric].mean()
        mb = traffic.loc[(r.method, r.config.seed)]["cumulative_MB"]
        rows.append(
            pd.DataFrame(
                {
                    "method": r.method,
                    "seed": r.config.seed,
                    "round": value.index,
                    "value": value.values,
                    "MB": mb.reindex(value.index).values,
                }
            )
        )
    per_run = pd.concat(rows, ignore_index=True)
    curves = (
        per_run.groupby(["method", "round"], sort=False)[["value", "MB"]]
        .mean()
        .reset_index()
    )
    reach = []
    for method, g in curves.groupby("method", sort=False):
        g = g.sort_values("round")
        hit = g[g["value"] >= target]
        reach.append(
            {
                "method": method,
                f"best mean {metric}": g["value"].max(),
                f"first round >= {target}": (
                    int(hit["round"].iloc[0]) if len(hit) else None
                ),
                "MB to get there": float(hit["MB"].iloc[0]) if len(hit) else np.nan,
            }
        )
    reach = pd.DataFrame(reach).set_index("method")
    first = f"first round >= {target}"
    reach[first] = reach[first].astype("Int64")  # empty (<NA>) when never reached
    return curves, reach


#: Chapter 06's CineMA-base adapter variants: ``(label, AdapterConfig changes)``.
BASE_VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("last2, rank 8, q/kv/proj (this book's default)", {"adapted_blocks": "last2"}),
    (
        "last2, rank 8, q/kv/proj/fc1/fc2",
        {
            "adapted_blocks": "last2",
            "target_modules": ("attn.q", "attn.kv", "attn.proj", "mlp.fc1", "mlp.fc2"),
        },
    ),
    ("last4, rank 8, q/kv/proj", {"adapted_blocks": "last4"}),
    ("all 12 blocks, rank 8, q/kv/proj", {"adapted_blocks": "all"}),
)


def model_payload_table(
    adapter: Any,
    size: str = "base",
    image_size: tuple[int, int, int] = (192, 192, 16),
    variants: Any = BASE_VARIANTS,
    methods: Any = ("fedavg_lora", "ffa_lora", "fedsa_lora", "med_dual_lora"),
    bytes_per_value: int = 4,
) -> Any:
    """What one client sends per round on a model of ``size``, computed, not measured
    (chapter ``notebooks/06_communication_analysis``).

    One row per adapter variant × method (closed form,
    :func:`~medlora_lib.adapters.closed_form_lora_params`; ``adapter`` is the
    :class:`~medlora_lib.adapters.AdapterConfig` each variant changes, e.g. the book's
    run's) and a last row for **full-model FedAvg** (every parameter of the model,
    counted on the meta device: nothing is allocated).

    Returns:
        Columns ``adapters``, ``method``, ``shared params``, ``MB / transfer (fp32)``
        (``bytes_per_value`` bytes per value, 4 = float32).
    """
    import dataclasses

    import pandas as pd
    import torch

    from medlora_lib.adapters import closed_form_lora_params
    from medlora_lib.models import build_convvit
    from medlora_lib.models.convvit import SIZES

    with torch.device("meta"):
        full = build_convvit(size, image_size=tuple(image_size))
    full_params = sum(p.numel() for p in full.parameters())
    dims = {"mlp_ratio": 4.0, "num_classes": 2, **SIZES[size]}
    rows = []
    for label, change in variants:
        a = dataclasses.replace(adapter, **change)
        for m in methods:
            cf = closed_form_lora_params(dataclasses.replace(a, method=m), dims)
            rows.append({"adapters": label, "method": m, "shared params": cf["shared"]})
    rows.append(
        {
            "adapters": "no adapters",
            "method": "full-model FedAvg",
            "shared params": full_params,
        }
    )
    table = pd.DataFrame(rows)
    table["MB / transfer (fp32)"] = table["shared params"] * bytes_per_value / 1e6
    return table
