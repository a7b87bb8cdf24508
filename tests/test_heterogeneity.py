"""Chapter 01's vendor-shift measures (``medlora_lib.data.heterogeneity``)."""

from __future__ import annotations

import numpy as np
import pytest

from medlora_lib.data.heterogeneity import (
    heterogeneity_sweep,
    histogram_features,
    vendor_shift,
)
from medlora_lib.data.preprocess import preprocess_case
from medlora_lib.data.synthetic import SynthConfig, generate_cohort, prepared_records

SMALL = dict(scale=0.06, seed=100, image_size=(32, 32, 8), spacing=(4.5, 4.5, 10.0))


def test_histogram_features_are_densities():
    x = np.random.default_rng(0).random((3, 2, 8, 8, 4))
    h = histogram_features(x, bins=16)
    assert h.shape == (3, 16)
    np.testing.assert_allclose(h.sum(1) / 16, 1.0)


def test_vendor_shift_is_zero_for_one_distribution_and_large_for_a_shifted_one():
    rng = np.random.default_rng(0)
    vendors = np.repeat(["Siemens", "Philips", "GE", "Canon"], 20)
    same = rng.beta(2, 5, (80, 2, 8, 8, 4))
    w, ba = vendor_shift(same, vendors, folds=5, seed=0)
    assert list(w.index) == ["Siemens", "Philips", "GE", "Canon"]
    assert np.allclose(np.diag(w), 0) and np.allclose(w, w.T)
    assert w.to_numpy().max() < 0.04 and ba < 0.5  # chance is 0.25
    shifted = same.copy()
    for k, v in enumerate(["Siemens", "Philips", "GE", "Canon"]):
        shifted[vendors == v] = np.clip(shifted[vendors == v] * (1 + 0.4 * k), 0, 1)
    w2, ba2 = vendor_shift(shifted, vendors, folds=5, seed=0)
    assert w2.loc["Siemens", "Canon"] > 0.1 and ba2 > 0.9


@pytest.mark.slow
def test_the_sweep_uses_the_generators_own_preprocessed_subjects():
    """The records the sweep reads are what the chapter's earlier loop made
    (generate_cohort + preprocess_case), for one worker and for two."""
    scfg = SynthConfig.for_profile("smoke", heterogeneity=0.5, **SMALL)
    loop = [
        preprocess_case(
            c.frames(),
            c.spacing,
            labels=c.labels(),
            target_spacing=scfg.spacing,
            image_size=scfg.image_size,
        )[0]
        for c in generate_cohort(scfg)
    ]
    for workers in (1, 2):
        recs = list(prepared_records(scfg, workers=workers))
        assert len(recs) == len(loop)
        assert all(np.array_equal(r.image, a) for r, a in zip(recs, loop, strict=True))


def _kw():
    return {k: v for k, v in SMALL.items() if k != "seed"}


@pytest.mark.slow
def test_the_shift_grows_with_the_knob():
    sweep = heterogeneity_sweep(
        [0.0, 1.0], profile="smoke", synth_seed=100, **_kw(), folds=3
    )
    assert list(sweep["heterogeneity"]) == [0.0, 1.0]
    assert sweep["mean Wasserstein"].is_monotonic_increasing
    assert (sweep["subjects"] > 0).all()
    two = heterogeneity_sweep(
        [1.0], profile="smoke", synth_seed=100, **_kw(), folds=3, workers=2
    )
    assert two.iloc[0].equals(sweep.iloc[1])
