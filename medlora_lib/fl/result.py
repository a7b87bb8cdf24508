"""One experiment's result: ``RunResult``, built the same way from any runtime.

Chapters ``notebooks/02_single_site_baseline``, ``03_fedavg_lora`` and ``04_med_dual_lora``.

Every method is evaluated the same way: after every round each site evaluates *its own
deployed model* (what it would use: received global + its private part) on its val and
test splits. The selected round of a site is the best ``train.selection_metric`` on its
**val** split (ties: the earlier round; NaN never wins); only then are its test metrics
at that round read. Test metrics per round are kept for learning curves only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medlora_lib.config import ExperimentConfig
from medlora_lib.metrics import METRIC_NAMES

__all__ = [
    "RunResult",
    "build_result",
    "select_rounds",
    "steady_seconds_per_round",
]


@dataclass
class RunResult:
    """One experiment's results.

    Attributes:
        config: the experiment's config.
        provenance: commit, versions, device, time (``results.provenance``).
        rounds: one row per round × client (train loss, bytes, val / test metrics, and
            ``global_only_*`` columns for methods with a local adapter).
        final: per client (+ ``mean`` and ``pooled``) test metrics at the selected round
            (``at="selected"``) and at the last round (``at="final"``), for the deployed
            model (``variant="deployed"``) and, for Med-DualLoRA, the global-only model.
        comm: bytes per round measured from the messages next to the closed form.
        seconds: wall time of the experiment.
        failures: sites that failed or did not answer (round, phase, site, reason).
        messages: summaries of every message (only with ``record_messages=True``).
        privacy: with DP on, the ε spent (:func:`privacy_summary`); empty otherwise.
    """

    config: ExperimentConfig
    provenance: dict[str, Any]
    rounds: pd.DataFrame
    final: pd.DataFrame
    comm: dict[str, Any]
    seconds: float
    failures: list[dict[str, Any]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    exp_id: str = ""
    final_shared: dict[str, torch.Tensor] | None = None
    privacy: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def rounds_run(self) -> int:
        """The last round trained: ``fed.num_rounds``, or fewer when early stopping
        (``train.patience``) ended the run."""
        return int(self.rounds["round"].max()) if len(self.rounds) else 0

    @property
    def stopped_early(self) -> bool:
        """Whether early stopping ended the run before ``fed.num_rounds``."""
        return 0 < self.rounds_run < self.config.fed.num_rounds

    def seconds_per_round(self) -> float:
        """Steady-state seconds per round (:func:`steady_seconds_per_round`)."""
        return steady_seconds_per_round(self.rounds)

    def selected(self, variant: str = "deployed") -> pd.DataFrame:
        """Test metrics per client at the validation-selected round."""
        f = self.final
        return f[(f["variant"] == variant) & (f["at"] == "selected")].reset_index(
            drop=True
        )

    def to_json_dict(self) -> dict[str, Any]:
        d = {
            "exp_id": self.exp_id,
            "method": self.method,
            "config": self.config.to_dict(),
            "provenance": self.provenance,
            "final": json.loads(self.final.to_json(orient="records")),
            "comm": self.comm,
            "seconds": self.seconds,
            "failures": self.failures,
        }
        if self.privacy:
            d["privacy"] = self.privacy
        return d

    def save(self, out_dir: str | Path) -> Path:
        """Write ``rounds.csv`` (+ ``final_shared.safetensors``, ``messages.json``) and,
        last, ``results.json`` into ``out_dir`` (each atomically); return it."""
        from medlora_lib.results import write_json, write_table

        out = Path(out_dir)
        write_table(out / "rounds.csv", self.rounds)
        if self.final_shared:
            from medlora_lib.fl.site_state import atomic_write_tensors

            atomic_write_tensors(out / "final_shared.safetensors", self.final_shared)
        if self.messages:
            write_json(out / "messages.json", self.messages)
        # last: its presence marks a complete result
        write_json(out / "results.json", self.to_json_dict())
        return out

    @classmethod
    def load(cls, out_dir: str | Path) -> RunResult:
        """Read a result written by :meth:`save`."""
        from medlora_lib.results import read_json

        out = Path(out_dir)
        d = read_json(out / "results.json")
        state = None
        if (out / "final_shared.safetensors").exists():
            from safetensors.torch import load_file

            state = load_file(str(out / "final_shared.safetensors"))
        return cls(
            config=ExperimentConfig.from_dict(d["config"]),
            provenance=d["provenance"],
            rounds=pd.read_csv(out / "rounds.csv"),
            final=pd.DataFrame(d["final"]),
            comm=d["comm"],
            seconds=float(d["seconds"]),
            failures=d.get("failures", []),
            messages=read_json(out / "messages.json")
            if (out / "messages.json").exists()
            else [],
            exp_id=d.get("exp_id", ""),
            final_shared=state,
            privacy=d.get("privacy", {}),
        )


def steady_seconds_per_round(rounds: pd.DataFrame) -> float:
    """Median wall-clock seconds between consecutive rounds of per-round rows.

    Round 1 also pays one-off costs (a simulation's actors importing torch, the prefix
    cache), so it is left out; with a single round its time is returned.
    """
    if "elapsed_s" not in rounds or rounds["elapsed_s"].isna().all():
        return float("nan")
    el = rounds.groupby("round")["elapsed_s"].max().sort_index()
    d = el.diff().dropna()
    return float(d.median()) if len(d) else float(el.iloc[0])


# ------------------------------------------------------------------------------ assembly
#: Per-round ε columns of ``rounds.csv``: site-level DP (server, the same for every
#: site) and DP-SGD (each site's own accountant).
EPSILON_COLUMNS = ("site_dp_epsilon", "dp_sgd_epsilon")


def privacy_summary(cfg: ExperimentConfig, rounds: pd.DataFrame) -> dict[str, Any]:
    """The ε a run spent, from its per-round rows (empty when no DP was on).

    ``site_dp``: ε of the site-level guarantee after the last round (a whole site);
    ``dp_sgd``: per site, the ε its patients' records spent (max over rounds = last).
    """
    p = cfg.privacy
    if not (p.site_dp != "off" or p.dp_sgd or p.secagg):
        return {}
    out: dict[str, Any] = {
        "delta": p.delta,
        "site_dp": p.site_dp,
        "dp_sgd": p.dp_sgd,
        "secagg": p.secagg,
    }
    if "site_dp_epsilon" in rounds and rounds["site_dp_epsilon"].notna().any():
        out["site_dp_epsilon"] = float(rounds["site_dp_epsilon"].max())
        out["site_dp_noise_multiplier"] = p.noise_multiplier
    if "dp_sgd_epsilon" in rounds and rounds["dp_sgd_epsilon"].notna().any():
        per = rounds.groupby("client")["dp_sgd_epsilon"].max().dropna()
        out["dp_sgd_epsilon"] = {str(k): float(v) for k, v in per.items()}
        out["dp_sgd_epsilon_max"] = float(per.max())
    return out


def _pooled(rows: pd.DataFrame, prefix: str) -> dict[str, float]:
    tp, tn, fp, fn = (
        float(rows[f"{prefix}test_{k}"].sum()) for k in ("tp", "tn", "fp", "fn")
    )
    pos, neg = tp + fn, tn + fp
    nan = float("nan")
    sens = tp / pos if pos else nan
    spec = tn / neg if neg else nan
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return {
        "balanced_accuracy": (sens + spec) / 2 if pos and neg else nan,
        "sensitivity": sens,
        "specificity": spec,
        "auc": nan,  # needs per-subject scores, which do not leave the sites
        "f1": 2 * tp / (2 * tp + fp + fn) if pos else nan,
        "mcc": (tp * tn - fp * fn) / denom if denom else (0.0 if pos and neg else nan),
        "accuracy": (tp + tn) / (pos + neg) if pos + neg else nan,
        "n": pos + neg,
        "n_pos": pos,
        "n_neg": neg,
    }


def _notes(n_pos: float, n_neg: float) -> str:
    if n_pos and not n_neg:
        return "no healthy subjects: balanced accuracy, AUC and MCC need both classes"
    if n_neg and not n_pos:
        return "no diseased subjects: balanced accuracy, AUC and MCC need both classes"
    return ""


def select_rounds(
    rounds: pd.DataFrame, metric: str, prefix: str = ""
) -> dict[str, int]:
    """Per client, the round with the best validation ``metric`` (val only; ties: earlier)."""
    out = {}
    col = f"{prefix}val_{metric}"
    for client, g in rounds.groupby("client", sort=False):
        g = g.sort_values("round")
        if col in g and g[col].notna().any():
            out[client] = int(g.loc[g[col].idxmax(), "round"])
        else:
            out[client] = int(g["round"].max())
    return out


def build_result(
    cfg: ExperimentConfig,
    rows: list[dict[str, Any]],
    seconds: float,
    failures: list[dict[str, Any]] | None = None,
    messages: list[dict[str, Any]] | None = None,
    exp_id: str = "",
    runtime: str = "simulation",
    final_shared: dict[str, torch.Tensor] | None = None,
) -> RunResult:
    """Assemble a :class:`RunResult` from per-round × per-client rows (any runtime)."""
    from medlora_lib.adapters import METHODS
    from medlora_lib.comm import closed_form_bytes
    from medlora_lib.results import provenance

    rounds = pd.DataFrame(rows)
    rounds.insert(0, "method", cfg.method)
    rounds.insert(1, "seed", cfg.seed)
    final_rows = []
    variants = [("deployed", "")]
    if "global_only_test_balanced_accuracy" in rounds:
        variants.append(("global_only", "global_only_"))
    last = int(rounds["round"].max()) if len(rounds) else 0
    for variant, prefix in variants:
        chosen = select_rounds(rounds, cfg.train.selection_metric, prefix)
        for at in ("selected", "final"):
            picked = []
            for client, g in rounds.groupby("client", sort=False):
                rnd = chosen[client] if at == "selected" else last
                r = g[g["round"] == rnd]
                if (
                    r.empty
                    or f"{prefix}test_n" not in r
                    or r[f"{prefix}test_n"].isna().all()
                ):
                    continue
                r = r.iloc[0]
                picked.append(r)
                row = {
                    "method": cfg.method,
                    "seed": cfg.seed,
                    "client": client,
                    "variant": variant,
                    "at": at,
                    "round": rnd,
                    f"val_{cfg.train.selection_metric}": r.get(
                        f"{prefix}val_{cfg.train.selection_metric}", float("nan")
                    ),
                }
                for k in (*METRIC_NAMES, "n", "n_pos", "n_neg"):
                    row[k] = float(r[f"{prefix}test_{k}"])
                row["notes"] = _notes(row["n_pos"], row["n_neg"])
                final_rows.append(row)
            if picked:
                df = pd.DataFrame(picked)
                mean = {
                    k: float(np.nanmean(df[f"{prefix}test_{k}"].astype(float)))
                    if df[f"{prefix}test_{k}"].notna().any()
                    else float("nan")
                    for k in METRIC_NAMES
                }
                base = {
                    "method": cfg.method,
                    "seed": cfg.seed,
                    "variant": variant,
                    "at": at,
                }
                final_rows.append(
                    {
                        **base,
                        "client": "mean",
                        "round": -1,
                        **mean,
                        "notes": "mean over clients",
                    }
                )
                pooled = _pooled(df, prefix)
                final_rows.append(
                    {
                        **base,
                        "client": "pooled",
                        "round": -1,
                        **pooled,
                        "notes": "from pooled confusion counts; AUC needs per-subject scores",
                    }
                )
    final = pd.DataFrame(final_rows)
    cf = closed_form_bytes(cfg)
    comm: dict[str, Any] = {"closed_form": cf}
    if "bytes_up" in rounds:
        up = rounds["bytes_up"].dropna().astype(int)
        down = rounds["bytes_down"].dropna().astype(int)
        comm.update(
            {
                "bytes_up_per_client_round": sorted(set(up.tolist())),
                "bytes_down_per_client_round": sorted(set(down.tolist())),
                "total_bytes_up": int(up.sum()),
                "total_bytes_down": int(down.sum())
                + int(
                    rounds.get("bytes_down_eval", pd.Series(dtype=float))
                    .fillna(0)
                    .sum()
                ),
                "wire_bytes_up_per_client_round": sorted(
                    set(rounds["wire_bytes_up"].dropna().astype(int).tolist())
                )
                if "wire_bytes_up" in rounds
                else [],
                "matches_closed_form": bool(
                    set(up.tolist()) <= {cf["shared_bytes"]}
                    and set(down.tolist()) <= {cf["shared_bytes"]}
                ),
            }
        )
    else:
        comm.update(
            {
                "bytes_up_per_client_round": [0],
                "bytes_down_per_client_round": [0],
                "total_bytes_up": 0,
                "total_bytes_down": 0,
                "matches_closed_form": cf["shared_bytes"] == 0
                or METHODS[cfg.method].pooled,
            }
        )
    prov = provenance({"seed": cfg.seed, "runtime": runtime, "exp_id": exp_id})
    return RunResult(
        config=cfg,
        provenance=prov,
        rounds=rounds,
        final=final,
        comm=comm,
        seconds=float(seconds),
        failures=list(failures or []),
        messages=list(messages or []),
        exp_id=exp_id,
        final_shared=final_shared,
        privacy=privacy_summary(cfg, rounds),
    )
