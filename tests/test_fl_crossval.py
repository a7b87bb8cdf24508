"""The cross-vendor matrix (chapter 02): shape, diagonal = ``local`` run, determinism."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from medlora_lib.config import get_config
from medlora_lib.fl import simulate
from medlora_lib.fl.crossval import (
    MATRIX_COLUMNS,
    balanced_accuracy_ci,
    cross_vendor_matrix,
)


def _cfg(method: str = "local"):
    return get_config(
        "smoke",
        overrides=[
            'model.pretrained="none"',
            "fed.num_rounds=2",
            "train.num_threads=1",
        ],
        method=method,
        seed=0,
    )


@pytest.fixture(scope="module")
def matrix() -> pd.DataFrame:
    return cross_vendor_matrix(_cfg())


def test_matrix_is_four_by_four(matrix):
    assert list(matrix.columns) == list(MATRIX_COLUMNS)
    assert len(matrix) == 16
    vendors = ["Siemens", "Philips", "GE", "Canon"]
    assert list(matrix["train_vendor"].unique()) == vendors
    assert list(matrix["test_vendor"].unique()) == vendors
    assert (matrix.groupby("train_vendor")["round"].nunique() == 1).all()
    assert matrix["round"].between(1, 2).all()
    # every test split is evaluated by every model: same n in each column
    assert (matrix.groupby("test_vendor")["n"].nunique() == 1).all()
    assert (
        matrix[["balanced_accuracy", "specificity", "sensitivity"]]
        .stack()
        .between(0, 1)
        .all()
    )


def test_diagonal_equals_local_run(matrix):
    local = simulate(_cfg(), verbose=False).selected().set_index("client")
    diag = matrix[matrix["train_vendor"] == matrix["test_vendor"]].set_index(
        "train_vendor"
    )
    for vendor, row in diag.iterrows():
        ref = local.loc[vendor]
        assert row["round"] == ref["round"]
        for k in ("balanced_accuracy", "specificity", "sensitivity", "auc", "n"):
            a, b = float(row[k]), float(ref[k])
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)


def test_deterministic_and_method_is_forced(matrix):
    again = cross_vendor_matrix(_cfg("fedavg_lora"))  # method replaced by `local`
    pd.testing.assert_frame_equal(matrix, again)


def test_cache_round_trip(matrix, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDLORA_CACHE", str(tmp_path))
    # the data are regenerated under the new cache; stored == returned
    first = cross_vendor_matrix(_cfg(), use_cache=True)
    assert list((tmp_path / "runs").glob("local-*-crossvendor/matrix.csv"))
    second = cross_vendor_matrix(_cfg(), use_cache=True)
    pd.testing.assert_frame_equal(first, second, check_dtype=False)


def test_balanced_accuracy_ci():
    lo, hi = balanced_accuracy_ci(0.8, 0.6, 40, 10)
    s, p = 33 / 42, 7 / 12  # Agresti-Caffo shrunk rates
    half = 1.96 * np.sqrt((s * (1 - s) / 42 + p * (1 - p) / 12) / 4)
    assert lo == pytest.approx(0.7 - half)
    assert hi == pytest.approx(0.7 + half)
    lo, hi = balanced_accuracy_ci(0.0, 1.0, 2, 1)  # extreme rates: never zero width
    assert lo < 0.5 < hi
    assert all(math.isnan(v) for v in balanced_accuracy_ci(0.5, float("nan"), 5, 0))
    assert all(math.isnan(v) for v in balanced_accuracy_ci(0.5, 0.5, 5, 0))
