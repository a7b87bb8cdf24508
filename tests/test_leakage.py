"""Membership inference by the server on the released shared state (chapter
``notebooks/08_privacy``)."""

from __future__ import annotations

import numpy as np
import pytest

from medlora_lib.config import get_config
from medlora_lib.privacy.leakage import MIA_COLUMNS, auc_interval, membership_inference


def test_auc_interval_separates_and_covers():
    rng = np.random.default_rng(0)
    member = np.r_[np.ones(40), np.zeros(40)]
    auc, lo, hi = auc_interval(
        np.r_[rng.normal(1, 1, 40), rng.normal(0, 1, 40)], member
    )
    assert 0.65 < auc < 0.95 and lo < auc < hi
    auc, lo, hi = auc_interval(member + 0.0, member)
    assert auc == 1.0 and hi == 1.0
    auc, lo, hi = auc_interval(rng.normal(size=80), member)
    assert lo < 0.5 < hi  # chance: the interval holds 0.5
    assert all(np.isnan(auc_interval(np.zeros(5), np.ones(5))))


def test_membership_inference_on_a_federated_run():
    from medlora_lib.fl import simulate

    cfg = get_config(
        "smoke",
        method="fedavg_lora",
        overrides={"model.pretrained": "none", "fed.num_rounds": 2},
    )
    res = simulate(cfg, runtime="inprocess", verbose=False)
    table = membership_inference(res, n_resamples=200)
    assert list(table.columns) == list(MIA_COLUMNS)
    assert list(table["client"]) == ["Siemens", "Philips", "GE", "Canon", "pooled"]
    per = table[table["client"] != "pooled"]
    last = res.rounds[res.rounds["round"] == 2].set_index("client")
    for _, r in per.iterrows():
        assert r["n_members"] == last.loc[r["client"], "num_examples"]
        assert r["n_nonmembers"] == last.loc[r["client"], "test_n"]
    pooled = table.iloc[-1]
    assert pooled["n_members"] == per["n_members"].sum()
    assert 0 <= pooled["auc"] <= 1 and pooled["ci_low"] <= pooled["auc"]


def test_a_run_without_shared_state_has_no_server_to_attack():
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="needs a federated run"):
        membership_inference(SimpleNamespace(final_shared=None, method="local"))


def test_within_class_auc_removes_a_prevalence_confound():
    from medlora_lib.privacy.leakage import within_class_auc

    rng = np.random.default_rng(1)
    # members are mostly diseased, non-members mostly healthy; the score depends only
    # on the class: the plain AUC "finds" membership, within a class there is none
    y = np.r_[np.ones(30), np.zeros(10), np.ones(10), np.zeros(30)].astype(int)
    member = np.r_[np.ones(40), np.zeros(40)].astype(int)
    scores = y + rng.normal(0, 0.1, 80)
    assert within_class_auc(scores, member) > 0.7
    assert abs(within_class_auc(scores, member, y) - 0.5) < 0.15
    # a real signal inside each class is kept
    scores2 = scores + 0.5 * member
    assert within_class_auc(scores2, member, y) > 0.95


def test_the_vectorised_statistic_equals_sklearn_and_a_loop_over_resamples():
    """The ranks-based AUC is sklearn's ``roc_auc_score`` class by class (ties
    included), and the vectorised bootstrap draws the very interval of scipy's
    one-resample-at-a-time loop over that sklearn statistic."""
    from scipy.stats import bootstrap
    from sklearn.metrics import roc_auc_score

    from medlora_lib.privacy.leakage import within_class_auc

    rng = np.random.default_rng(3)
    n = 60
    scores = np.round(rng.normal(size=n), 1)  # many ties
    member = rng.integers(0, 2, n)
    labels = np.array([f"site{i % 3}/{c}" for i, c in enumerate(rng.integers(0, 2, n))])

    def reference(s, m, y):
        total = weight = 0.0
        for c in np.unique(y):
            g = y == c
            pairs = float(m[g].sum() * (g.sum() - m[g].sum()))
            if pairs:
                total += pairs * roc_auc_score(m[g], s[g])
                weight += pairs
        return total / weight if weight else 0.5

    assert within_class_auc(scores, member, labels) == pytest.approx(
        reference(scores, member, labels), abs=1e-12
    )
    assert within_class_auc(scores, member) == pytest.approx(
        roc_auc_score(member, scores), abs=1e-12
    )
    codes = np.unique(labels, return_inverse=True)[1]  # scipy's loop needs numbers
    looped = bootstrap(
        (scores, member, codes),
        reference,
        paired=True,
        vectorized=False,
        n_resamples=200,
        method="percentile",
        rng=np.random.default_rng(0),
    ).confidence_interval
    auc, lo, hi = auc_interval(scores, member, 200, 0, labels=labels)
    assert auc == pytest.approx(reference(scores, member, labels), abs=1e-12)
    assert (lo, hi) == pytest.approx((looped.low, looped.high), abs=1e-12)
