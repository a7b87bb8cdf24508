"""How different the vendors are, measured from the images (chapter
``notebooks/01_data_and_vendor_heterogeneity``).

Two measures of a data set's vendor shift, and the sweep of the synthetic generator's
``heterogeneity`` knob that shows both grow with it:

* the **Wasserstein distance** between two vendors' voxel-intensity distributions
  (``scipy.stats.wasserstein_distance``; every 7th voxel, both frames pooled);
* how well a **vendor-identification probe** tells the vendors apart from a case's
  intensity histogram alone (standardised logistic regression, stratified k-fold
  cross-validated predictions, balanced accuracy; chance is one over the number of
  vendors).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medlora_lib.data.manifest import VENDORS

__all__ = ["histogram_features", "vendor_shift", "heterogeneity_sweep"]


def histogram_features(images: np.ndarray, bins: int = 32) -> np.ndarray:
    """A normalised intensity histogram on [0, 1] per case (both frames pooled):
    ``(cases, bins)``."""
    flat = np.asarray(images).reshape(len(images), -1)
    return np.stack(
        [np.histogram(f, bins=bins, range=(0, 1), density=True)[0] for f in flat]
    )


def vendor_shift(
    images: np.ndarray, vendors: np.ndarray, folds: int = 5, seed: int = 0
) -> tuple[Any, float]:
    """The vendors' pairwise Wasserstein distances and the vendor-identification
    probe's cross-validated balanced accuracy.

    Args:
        images: ``(cases, ...)`` preprocessed images (intensities in [0, 1]).
        vendors: ``(cases,)`` vendor names.
        folds: stratified folds of the probe.
        seed: shuffles the folds.

    Returns:
        ``(distances, balanced_accuracy)``: a vendors × vendors DataFrame (in the order
        of :data:`~medlora_lib.data.manifest.VENDORS`) and a float.
    """
    import pandas as pd
    from scipy.stats import wasserstein_distance
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    images, vendors = np.asarray(images), np.asarray(vendors)
    names = [v for v in VENDORS if v in set(vendors)]
    pooled = {v: images[vendors == v].ravel()[::7] for v in names}
    w = pd.DataFrame(
        [[wasserstein_distance(pooled[a], pooled[b]) for b in names] for a in names],
        index=names,
        columns=names,
    )
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    pred = cross_val_predict(clf, histogram_features(images), vendors, cv=cv)
    return w, float(balanced_accuracy_score(vendors, pred))


def heterogeneity_sweep(
    levels: Sequence[float],
    *,
    profile: str = "cpu",
    scale: float = 0.3,
    synth_seed: int = 100,
    image_size: Sequence[int] = (48, 48, 8),
    spacing: Sequence[float] = (3.0, 3.0, 10.0),
    folds: int = 5,
    seed: int = 0,
    workers: int = 1,
) -> Any:
    """:func:`vendor_shift` of a synthetic cohort at each ``heterogeneity`` level.

    Each level's cohort is generated afresh (``SynthConfig.for_profile(profile,
    scale=scale, heterogeneity=level, seed=synth_seed, ...)``, ``smoke`` or ``cpu``
    sizes) and preprocessed at ``image_size`` / ``spacing``, in ``workers`` processes
    (the data are identical for any number,
    :func:`~medlora_lib.data.synthetic.prepared_records`; at the chapter's 150 subjects a
    level, starting the spawned workers costs about what they save, so one by default).

    Returns:
        One row per level: ``heterogeneity``, ``mean Wasserstein`` (off-diagonal mean),
        ``vendor-ID balanced accuracy``, ``healthy share, min–max over vendors`` and
        ``subjects``.
    """
    import pandas as pd

    from medlora_lib.data.synthetic import SynthConfig, prepared_records

    rows = []
    for level in levels:
        scfg = SynthConfig.for_profile(
            "smoke" if profile == "smoke" else "cpu",
            scale=scale,
            heterogeneity=level,
            seed=synth_seed,
            image_size=tuple(image_size),
            spacing=tuple(spacing),
        )
        records = list(prepared_records(scfg, workers=workers))
        imgs = np.stack([r.image for r in records])
        vend = np.array([r.vendor for r in records])
        labels = np.array([r.label for r in records])
        w, ba = vendor_shift(imgs, vend, folds, seed)
        off_diag = w.to_numpy()[~np.eye(len(w), dtype=bool)].mean()
        prevalence = pd.Series(labels == 0).groupby(vend).mean()
        rows.append(
            {
                "heterogeneity": level,
                "mean Wasserstein": off_diag,
                "vendor-ID balanced accuracy": ba,
                "healthy share, min–max over vendors": (
                    f"{prevalence.min():.0%}–{prevalence.max():.0%}"
                ),
                "subjects": len(vend),
            }
        )
    return pd.DataFrame(rows)
