"""The tables and sentences of chapter ``notebooks/08_privacy``: accuracy against the ε
spent, what Med-DualLoRA's local adapter does under DP, and when privacy costs too much.

Everything here reads the frame of :func:`medlora_lib.experiments.run_privacy_grid`
(one row per method, seed, client and privacy setting). The replicate is a seed (its
own split, initialisation and noise); the vendors of a seed are averaged first, so
each interval is a Student-t interval over seeds of the mean over vendors.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "privacy_table",
    "local_adapter_under_dp",
    "privacy_verdict",
    "epsilon_curves",
    "local_adapter_sentence",
]

_KEYS = ["method", "setting", "kind"]


def _seed_means(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    rows = frame[frame["client"] == "mean"]
    return rows.groupby([*_KEYS, "seed"], sort=False, as_index=False)[metric].mean()


def _t(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Mean and Student-t half-width over seeds (NaN dropped), as in the chapters'
    tables (:func:`medlora_lib.stats.seed_summary`)."""
    from medlora_lib.stats import _t_interval

    mean, _, half, _, _ = _t_interval(values[~np.isnan(values)], confidence)
    return mean, half


def privacy_table(frame: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Per method and privacy setting: balanced accuracy and specificity (mean over
    vendors; mean ± t half-width over seeds), the ε spent (median over seeds; ``inf``
    without DP), seconds per round and MB moved, and the drop in balanced accuracy
    from the same method without DP (paired by seed).
    """
    out = []
    base = _seed_means(frame[frame["kind"] == "none"], "balanced_accuracy")
    for (method, setting, kind), g in frame.groupby(_KEYS, sort=False):
        ba = _seed_means(g, "balanced_accuracy")
        sp = _seed_means(g, "specificity")
        m_ba, h_ba = _t(ba["balanced_accuracy"].to_numpy(float), confidence)
        m_sp, h_sp = _t(sp["specificity"].to_numpy(float), confidence)
        ref = base[base["method"] == method].set_index("seed")["balanced_accuracy"]
        paired = (
            ba.set_index("seed")["balanced_accuracy"]
            - ref.reindex(ba["seed"]).to_numpy()
        )
        d, hd = _t(paired.to_numpy(float), confidence)
        per_run = g.drop_duplicates("seed")
        out.append(
            {
                "method": method,
                "setting": setting,
                "kind": kind,
                "n_seeds": int(ba["seed"].nunique()),
                "epsilon": float(per_run["epsilon"].median()),
                "balanced_accuracy": m_ba,
                "ba_half_width": h_ba,
                "specificity": m_sp,
                "spec_half_width": h_sp,
                "ba_change": d,
                "ba_change_half_width": hd,
                "seconds_per_round": float(per_run["seconds_per_round"].median()),
                "MB": float(per_run["MB"].median()),
            }
        )
    return pd.DataFrame(out)


def local_adapter_under_dp(
    runs: Iterable[tuple[str, str, Any]], confidence: float = 0.95
) -> pd.DataFrame:
    """Med-DualLoRA's deployed model (global + local adapter) against its global
    adapter alone, per privacy setting: does the local adapter — never shared, so never
    noised by site-level DP — recover what the noise on the global one costs?

    Args:
        runs: ``(setting label, kind, RunResult)`` of :func:`run_privacy_grid`.

    Returns:
        One row per setting: deployed and global-only balanced accuracy (mean over
        vendors and seeds) and their paired difference over seeds with its interval.
    """
    from medlora_lib.stats import collect

    rows = []
    for label, _, r in runs:
        if r.method != "med_dual_lora":
            continue
        dep = collect([r])
        glo = collect([r], variant="global_only")
        for variant, f in (("deployed", dep), ("global_only", glo)):
            m = f[f["client"] == "mean"]["balanced_accuracy"].mean()
            rows.append(
                {"setting": label, "seed": r.config.seed, "variant": variant, "ba": m}
            )
    df = pd.DataFrame(rows)
    out = []
    for setting, g in df.groupby("setting", sort=False):
        w = g.pivot(index="seed", columns="variant", values="ba")
        d, h = _t((w["deployed"] - w["global_only"]).to_numpy(float), confidence)
        out.append(
            {
                "setting": setting,
                "n_seeds": len(w),
                "deployed": float(w["deployed"].mean()),
                "global_only": float(w["global_only"].mean()),
                "local_adapter_adds": d,
                "half_width": h,
            }
        )
    return pd.DataFrame(out)


def privacy_verdict(table: pd.DataFrame, tolerance: float = 0.05) -> str:
    """One sentence per method and DP kind, computed from :func:`privacy_table`.

    A setting "costs too much" when its balanced accuracy falls more than
    ``tolerance`` below the same method without DP or its interval reaches chance
    (0.5); otherwise it is "affordable". The tolerance is the chapter's stated choice,
    not tuned on the results.
    """
    names = {"dp_sgd": "DP-SGD (each patient)", "site_dp": "site-level DP (each site)"}
    parts = []
    for method, g in table.groupby("method", sort=False):
        for kind, k in g[g["kind"] != "none"].groupby("kind", sort=False):
            bits = []
            for _, r in k.sort_values("epsilon").iterrows():
                low = r["balanced_accuracy"] - (r["ba_half_width"] or 0.0)
                costly = r["ba_change"] < -tolerance or not (low > 0.5)
                bits.append(
                    f"ε={r['epsilon']:.3g}: BA {r['balanced_accuracy']:.3f} "
                    f"({r['ba_change']:+.3f}; {'too costly' if costly else 'affordable'})"
                )
            parts.append(f"{method}, {names.get(kind, kind)}: " + "; ".join(bits))
    return ". ".join(parts) + "."


def epsilon_curves(runs: Iterable[tuple[str, str, Any]]) -> pd.DataFrame:
    """ε spent after each round, per private run (chapter ``08_privacy``): the
    site-level ε (one value per round) or the largest DP-SGD ε of any site.

    Returns:
        Columns ``setting``, ``kind``, ``method``, ``seed``, ``round``, ``epsilon``.
    """
    col = {"site_dp": "site_dp_epsilon", "dp_sgd": "dp_sgd_epsilon"}
    rows = []
    for label, kind, r in runs:
        c = col.get(kind)
        if c is None or c not in r.rounds:
            continue
        per = r.rounds.groupby("round")[c].max().dropna()
        for rnd, eps in per.items():
            rows.append(
                {
                    "setting": label,
                    "kind": kind,
                    "method": r.method,
                    "seed": r.config.seed,
                    "round": int(rnd),
                    "epsilon": float(eps),
                }
            )
    return pd.DataFrame(
        rows, columns=["setting", "kind", "method", "seed", "round", "epsilon"]
    )


def local_adapter_sentence(local: pd.DataFrame) -> str:
    """What Med-DualLoRA's local adapter adds under each DP setting, as a sentence
    computed from :func:`local_adapter_under_dp` (an interval that holds 0 is said
    to be indistinguishable from nothing)."""
    parts = []
    for _, r in local[local["setting"] != "no DP"].iterrows():
        h = r["half_width"]
        sure = np.isfinite(h) and abs(r["local_adapter_adds"]) > h
        parts.append(
            f"{r['setting']}: {r['local_adapter_adds']:+.3f}"
            + (f" (± {h:.3f})" if np.isfinite(h) else "")
            + ("" if sure else ", not distinguishable from 0")
            + f" — deployed {r['deployed']:.3f} vs global only {r['global_only']:.3f}"
        )
    return "The local adapter adds, in balanced accuracy: " + "; ".join(parts) + "."
