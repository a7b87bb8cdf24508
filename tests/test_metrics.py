"""Metrics against hand-computed values; single-class inputs say so instead of crashing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medlora_lib.metrics import binary_metrics


def test_hand_computed():
    y = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    p = np.array([0.1, 0.6, 0.2, 0.9, 0.8, 0.4, 0.7, 0.95])
    m = binary_metrics(y, p)
    # TN=2 FP=1 TP=4 FN=1
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["sensitivity"] == pytest.approx(4 / 5)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert m["f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 1))
    assert m["auc"] == pytest.approx(14 / 15)
    assert m["n"] == 8 and m["n_pos"] == 5 and m["n_neg"] == 3
    assert m["notes"] == ""


def test_single_class_is_reported_not_raised():
    m = binary_metrics([1, 1, 1], [0.9, 0.2, 0.7])
    assert math.isnan(m["balanced_accuracy"]) and math.isnan(m["auc"])
    assert math.isnan(m["specificity"])
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert "no healthy subjects" in m["notes"]


def test_equals_scikit_learn_on_random_and_tied_cases():
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        f1_score,
        matthews_corrcoef,
        roc_auc_score,
    )

    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(2, 60))
        y = rng.integers(0, 2, n)
        if len(set(y)) < 2:
            y[0], y[-1] = 0, 1
        p = rng.random(n)
        if trial % 3 == 0:  # ties in the scores (a coarse model)
            p = np.round(p, 1)
        if trial % 7 == 0:  # every prediction one class: MCC's zero denominator
            p = np.full(n, 0.9)
        m = binary_metrics(y, p)
        pred = (p >= 0.5).astype(int)
        assert m["balanced_accuracy"] == pytest.approx(
            balanced_accuracy_score(y, pred), abs=1e-12
        )
        assert m["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert m["mcc"] == pytest.approx(matthews_corrcoef(y, pred), abs=1e-12)
        assert m["f1"] == pytest.approx(f1_score(y, pred, zero_division=0), abs=1e-12)
        assert m["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
