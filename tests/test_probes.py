"""Chapter 00's frozen-feature probes (``medlora_lib.probes``)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from medlora_lib import probes
from medlora_lib.config import get_config
from medlora_lib.pipeline import load_client_data, resolve_data_dir


def test_balanced_accuracy_is_sklearns_for_any_number_of_classes():
    rng = np.random.default_rng(0)
    for k in (2, 4):
        y = rng.integers(0, k, 60)
        pred = np.where(rng.random(60) < 0.6, y, rng.integers(0, k, 60))
        assert probes.balanced_accuracy(y, pred) == pytest.approx(
            balanced_accuracy_score(y, pred)
        )
    v = np.array(["GE", "GE", "Canon", "Siemens"])
    assert probes.balanced_accuracy(v, np.array(["GE", "Canon", "Canon", "GE"])) == (
        pytest.approx((0.5 + 1 + 0) / 3)
    )


def test_bootstrap_interval_brackets_the_score_and_shrinks_with_n():
    rng = np.random.default_rng(1)

    def width(n):
        y = rng.integers(0, 2, n)
        pred = np.where(rng.random(n) < 0.75, y, 1 - y)
        lo, hi = probes.balanced_accuracy_ci(y, pred, 500, seed=3)
        assert lo <= probes.balanced_accuracy(y, pred) <= hi
        assert (lo, hi) == probes.balanced_accuracy_ci(y, pred, 500, seed=3)
        return hi - lo

    assert width(800) < width(50) / 2  # ~1/sqrt(n): 4x narrower at 16x the subjects
    assert np.isnan(probes.balanced_accuracy_ci([1], [1], 100)[0])
    assert np.isnan(probes.balanced_accuracy_ci([0, 1], [0, 1], 0)[1])


@pytest.mark.slow
def test_run_probes_on_the_smoke_data():
    cfg = get_config("smoke")
    clients, _ = load_client_data(resolve_data_dir(cfg, verbose=False))
    frame = probes.run_probes(
        clients, cfg.data.image_size, seed=0, n_resamples=50, train_subjects=0
    )
    assert len(frame) == 2 * 2 * 2 * 2  # protocol x weights x task x probe
    assert frame["score"].between(0, 1).all()
    assert (frame["ci_low"] <= frame["score"] + 1e-12).all()
    assert (frame["score"] <= frame["ci_high"] + 1e-12).all()
    x, y, v = probes.probe_training_set(clients)
    assert (frame["n_train"] == len(y)).all() and set(v) == set(clients)
    n_test = sum(c.num_examples("test") for c in clients.values())
    assert (frame["n_test"] == n_test).all()
    # pretrained and random features differ: the two weights give different features
    xs = x[:4]
    pre = probes._encode("pretrained (MAE)", xs, "2-channel", cfg.data.image_size, 0)
    rnd = probes._encode("random init", xs, "2-channel", cfg.data.image_size, 0)
    assert pre.shape == rnd.shape and not np.allclose(pre, rnd)
    assert len(probes.probe_training_set(clients, 5)[1]) == 5
