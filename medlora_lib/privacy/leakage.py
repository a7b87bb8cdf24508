"""What the shared adapter still leaks: a membership-inference signal measured on the
model the server holds (chapter ``notebooks/08_privacy``).

Sharing only the global adapter (and the shared head) is not privacy on its own: the
released tensors are a function of each site's patients, and a model tends to fit the
subjects it was trained on better than unseen ones. :func:`membership_inference`
measures that for the server — an honest-but-curious aggregator that holds the final
shared state and a candidate patient record — with the simplest attack there is, the
loss threshold of Yeom et al. (2018): "member if the model's loss on the record is low".

Per site, the members are its training subjects and the non-members its test subjects
(same vendor, same distribution, never trained on). The attack's score is minus the
cross-entropy of the server's model (the shared tensors with the initial private
part: the server never has a site's local adapter or private head); its ROC AUC,
comparing members and non-members of the same class (:func:`within_class_auc`: the
splits' prevalence may differ, and the loss depends on the class), is 0.5 when the
released model tells members and non-members apart no better than chance. The interval is scipy's bootstrap over the site's subjects. Stronger attacks
(shadow models, LiRA) can only find more: an AUC near 0.5 here is not a proof of
privacy, an AUC above it is a leak. DP (site-level or DP-SGD) bounds any attack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

__all__ = ["membership_inference", "MIA_COLUMNS", "auc_interval", "within_class_auc"]

#: Columns of :func:`membership_inference`'s table.
MIA_COLUMNS = (
    "method",
    "seed",
    "client",
    "auc",
    "ci_low",
    "ci_high",
    "n_members",
    "n_nonmembers",
)


def _class_codes(member: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    """Integer class codes (0 when there are no labels; strings allowed)."""
    if labels is None:
        return np.zeros(len(member), int)
    return np.unique(np.asarray(labels), return_inverse=True)[1].reshape(-1)


def _within_class_auc_batch(
    scores: np.ndarray, member: np.ndarray, codes: np.ndarray, empty: float
) -> np.ndarray:
    """:func:`within_class_auc` along the last axis of ``(..., n)`` arrays at once.

    Per class, the Mann-Whitney statistic from average ranks (ties: 1/2, exactly
    sklearn's ``roc_auc_score``): the other classes' scores are set to ``+inf``, so they
    rank above every score of the class and leave its ranks as they are. ``empty``
    where no class holds both groups.
    """
    from scipy.stats import rankdata

    scores = np.asarray(scores, dtype=float)
    member = np.asarray(member).astype(bool)
    codes = np.asarray(codes)
    total = np.zeros(scores.shape[:-1])
    weight = np.zeros(scores.shape[:-1])
    for c in np.unique(codes):
        in_c = codes == c
        ranks = rankdata(np.where(in_c, scores, np.inf), axis=-1)
        pos = in_c & member
        n1 = pos.sum(-1).astype(float)
        n0 = (in_c & ~member).sum(-1).astype(float)
        pairs = n1 * n0
        u = (ranks * pos).sum(-1) - n1 * (n1 + 1) / 2
        total += np.where(pairs > 0, u, 0.0)
        weight += pairs
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weight > 0, total / np.where(weight > 0, weight, 1), empty)


def within_class_auc(
    scores: np.ndarray, member: np.ndarray, labels: np.ndarray | None = None
) -> float:
    """P(a member scores higher than a non-member *of the same class*) (ties: 1/2).

    The per-class ROC AUCs weighted by their member × non-member pairs (each the
    Mann-Whitney statistic, equal to sklearn's ``roc_auc_score``). Without ``labels``:
    the plain AUC. Comparing within a class matters because a site's training and test
    splits need not hold the same share of diseased subjects, and the loss depends on
    the class: across classes the attack would partly measure prevalence, not
    memorisation. NaN when no class has both groups.
    """
    member = np.asarray(member, dtype=int)
    codes = _class_codes(member, labels)
    return float(_within_class_auc_batch(scores, member, codes, float("nan")))


def auc_interval(
    scores: np.ndarray,
    member: np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    labels: np.ndarray | None = None,
) -> tuple[float, float, float]:
    """:func:`within_class_auc` of ``scores`` for ``member`` (1) vs non-member (0) and
    its percentile bootstrap interval (``scipy.stats.bootstrap``, resampling subjects;
    the statistic is vectorised over the resamples).

    Returns ``(auc, low, high)``; NaN when no class holds both groups.
    """
    from scipy.stats import bootstrap

    scores = np.asarray(scores, dtype=float)
    member = np.asarray(member, dtype=int)
    codes = _class_codes(member, labels)
    nan = float("nan")
    auc = within_class_auc(scores, member, codes)
    if not np.isfinite(auc) or len(member) < 3:
        return nan, nan, nan

    def stat(s: np.ndarray, m: np.ndarray, y: np.ndarray, axis: int = -1):
        # a resample with one group counts as chance
        return _within_class_auc_batch(
            np.moveaxis(s, axis, -1),
            np.moveaxis(m, axis, -1),
            np.moveaxis(y, axis, -1),
            0.5,
        )

    res = bootstrap(
        (scores, member, codes),
        stat,
        paired=True,
        vectorized=True,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    ci = res.confidence_interval
    return auc, float(ci.low), float(ci.high)


@torch.no_grad()
def _losses(rt: Any, inputs: dict[str, torch.Tensor], y: torch.Tensor) -> np.ndarray:
    from medlora_lib.train import iterate_batches

    out = []
    for batch, yb in iterate_batches(inputs, y, 64):
        batch = {k: v.to(rt.device) for k, v in batch.items()}
        logits = rt.forward(batch).float()
        out.append(
            torch.nn.functional.cross_entropy(
                logits, yb.to(rt.device), reduction="none"
            ).cpu()
        )
    return torch.cat(out).numpy() if out else np.zeros(0)


def membership_inference(
    result: Any, *, n_resamples: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Loss-threshold membership inference by the server, per site and pooled.

    Args:
        result: a federated :class:`~medlora_lib.fl.result.RunResult` with its
            ``final_shared`` state (what the server released after the last round).
        n_resamples: bootstrap resamples of each interval.
        seed: the bootstrap's seed.

    Returns:
        One row per site and one ``pooled`` row (:data:`MIA_COLUMNS`).

    Raises:
        ValueError: the result holds no final shared state (a ``local`` or
            ``centralized`` run shares nothing: there is no server to attack).
    """
    from medlora_lib.fl.simulate import plan
    from medlora_lib.fl.sites import load_options, load_sites
    from medlora_lib.fl.task import ClientRuntime

    if not result.final_shared:
        raise ValueError(
            f"{result.method}: the result holds no shared state (final_shared); "
            "membership inference by the server needs a federated run"
        )
    cfg = result.config
    (p,) = plan([cfg], use_cache=True, scratch=Path("."))
    data = load_sites(p.data_dir, list(p.sites), **load_options(cfg))
    rows, pooled_s, pooled_m, pooled_y = [], [], [], []
    for name in p.sites:
        rt = ClientRuntime.build(cfg, data, name, data_key=str(p.data_dir))
        rt.load(result.final_shared, None)  # the server's model: no private part
        rt.model.eval()
        test_inputs, test_y = rt.eval_sets[name]["test"]
        s_in = -_losses(rt, rt.train_inputs, rt.train_labels)
        s_out = -_losses(rt, test_inputs, test_y)
        scores = np.concatenate([s_in, s_out])
        member = np.concatenate([np.ones(len(s_in)), np.zeros(len(s_out))])
        labels = np.concatenate([rt.train_labels.numpy(), test_y.numpy()])
        auc, lo, hi = auc_interval(scores, member, n_resamples, seed, labels=labels)
        rows.append(
            {
                "method": cfg.method,
                "seed": cfg.seed,
                "client": name,
                "auc": auc,
                "ci_low": lo,
                "ci_high": hi,
                "n_members": len(s_in),
                "n_nonmembers": len(s_out),
            }
        )
        pooled_s.append(scores)
        pooled_m.append(member)
        # pooled: members and non-members compared within a site and class
        pooled_y.append(np.array([f"{name}/{int(y)}" for y in labels]))
    s, m = np.concatenate(pooled_s), np.concatenate(pooled_m)
    auc, lo, hi = auc_interval(s, m, n_resamples, seed, labels=np.concatenate(pooled_y))
    rows.append(
        {
            "method": cfg.method,
            "seed": cfg.seed,
            "client": "pooled",
            "auc": auc,
            "ci_low": lo,
            "ci_high": hi,
            "n_members": int(m.sum()),
            "n_nonmembers": int(len(m) - m.sum()),
        }
    )
    return pd.DataFrame(rows, columns=list(MIA_COLUMNS))
