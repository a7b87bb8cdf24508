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
