"""Classification metrics for disease detection (healthy vs any pathology).

Balanced accuracy and specificity lead, because positives dominate every client.
Metrics that need both classes return NaN and say why in ``notes`` instead of crashing.
Explained in the book: notebooks 02 (single-site baseline) and 04 (Med-DualLoRA).

Computed from the confusion counts and, for the AUC, the Mann-Whitney rank statistic
(``scipy.stats.rankdata``, ties averaged): the same values as scikit-learn's
``balanced_accuracy_score``, ``roc_auc_score``, ``matthews_corrcoef`` and ``f1_score``
(tested to 1e-12) at a fraction of their per-call overhead — every round evaluates every
site, so these run thousands of times per chapter (``benchmarks/bench_metrics.py``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import rankdata

__all__ = ["METRIC_NAMES", "binary_metrics"]

METRIC_NAMES = (
    "balanced_accuracy",
    "sensitivity",
    "specificity",
    "auc",
    "f1",
    "mcc",
    "accuracy",
)


def binary_metrics(
    y_true: np.ndarray | list[int],
    prob_positive: np.ndarray | list[float],
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Balanced accuracy, sensitivity, specificity, ROC-AUC, F1, MCC and accuracy.

    Args:
        y_true: 0 = healthy, 1 = disease.
        prob_positive: predicted probability of disease.
        threshold: decision threshold on ``prob_positive``.

    Returns:
        A dict with every name of :data:`METRIC_NAMES`, plus ``n``, ``n_pos``,
        ``n_neg`` and ``notes`` (why a metric is NaN, empty when none is).
    """
    y = np.asarray(y_true).astype(int).ravel()
    p = np.asarray(prob_positive, dtype=float).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values but prob_positive {p.size}")
    pred = (p >= threshold).astype(int)
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    notes: list[str] = []
    out: dict[str, Any] = {"n": int(y.size), "n_pos": n_pos, "n_neg": n_neg}
    nan = float("nan")
    tp = int(((pred == 1) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    fp, fn = n_neg - tn, n_pos - tp
    out["sensitivity"] = tp / n_pos if n_pos else nan
    out["specificity"] = tn / n_neg if n_neg else nan
    out["accuracy"] = (tp + tn) / y.size if y.size else nan
    if n_pos and n_neg:
        out["balanced_accuracy"] = (out["sensitivity"] + out["specificity"]) / 2
        ranks = rankdata(p)
        u = float(ranks[y == 1].sum()) - n_pos * (n_pos + 1) / 2
        out["auc"] = u / (n_pos * n_neg)
        denom = math.sqrt(float(tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        out["mcc"] = (tp * tn - fp * fn) / denom if denom else 0.0
    else:
        missing = "healthy" if not n_neg else "diseased"
        notes.append(
            f"no {missing} subjects: balanced accuracy, AUC and MCC need both classes"
        )
        out["balanced_accuracy"] = out["auc"] = out["mcc"] = nan
    out["f1"] = 2 * tp / (2 * tp + fp + fn) if n_pos else nan
    out["notes"] = "; ".join(notes)
    for k in METRIC_NAMES:
        v = out[k]
        out[k] = nan if v is None or (isinstance(v, float) and math.isnan(v)) else v
    return out
