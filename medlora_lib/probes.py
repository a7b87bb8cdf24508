"""Frozen-feature probes of the foundation model (chapter ``notebooks/00_foundation_model_and_lora``).

Is the small stand-in a *foundation* model? Its frozen features should already separate
what matters. :func:`run_probes` fits two simple probes — a class-balanced logistic
regression (**linear**) and a 5-nearest-neighbour classifier (**k-NN**), both on
standardised features — for two tasks (disease: healthy vs disease; vendor: 4 classes)
on the CLS token and the mean fused patch token of the frozen encoder, pretrained (MAE)
and at random initialisation, for two ways of feeding ED and ES (**per frame**, as the
MAE was pretrained, or **2-channel**, the classifier's input). Scores are balanced
accuracy on the held-out test subjects with a percentile bootstrap interval over test
subjects (:func:`balanced_accuracy_ci`, :func:`scipy.stats.bootstrap`, paired).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from medlora_lib.errors import ConfigError

__all__ = [
    "PROTOCOLS",
    "WEIGHTS",
    "balanced_accuracy",
    "balanced_accuracy_ci",
    "encoder_features",
    "pooled_split",
    "probe_training_set",
    "run_probes",
]

#: How ED and ES are fed: separately (features concatenated) or as two channels.
PROTOCOLS: tuple[str, ...] = ("per frame", "2-channel")
#: The encoder's weights: the embedded pretrained small FM, or the same architecture
#: at random initialisation (same seed for every protocol).
WEIGHTS: tuple[str, ...] = ("pretrained (MAE)", "random init")


def balanced_accuracy(y: np.ndarray, pred: np.ndarray, axis: int = -1) -> float:
    """Mean recall over the classes present in ``y`` (= scikit-learn's
    ``balanced_accuracy_score``, any number of classes; numpy, for the bootstrap).

    Vectorised: given ``(..., n)`` arrays, one value per leading index (what
    :func:`scipy.stats.bootstrap` passes with ``vectorized=True``); a float for 1-D.
    """
    y = np.moveaxis(np.asarray(y), axis, -1)
    pred = np.moveaxis(np.asarray(pred), axis, -1)
    recall_sum = np.zeros(y.shape[:-1])
    present = np.zeros(y.shape[:-1])
    for c in np.unique(y):
        in_c = y == c
        n_c = in_c.sum(-1)
        hit = (in_c & (pred == c)).sum(-1)
        recall_sum += np.where(n_c > 0, hit / np.maximum(n_c, 1), 0.0)
        present += n_c > 0
    out = recall_sum / present
    return float(out) if out.ndim == 0 else out


def balanced_accuracy_ci(
    y: np.ndarray,
    pred: np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the balanced accuracy over test subjects.

    Subjects (label and prediction together, ``paired=True``) are resampled with
    replacement by :func:`scipy.stats.bootstrap` (the statistic vectorised over the
    resamples); the probe is not refitted, so the interval describes the sampling of
    the test set only.

    Returns:
        ``(low, high)``; ``(nan, nan)`` for ``n_resamples == 0`` or fewer than two
        test subjects.
    """
    from scipy.stats import bootstrap

    y, pred = np.asarray(y), np.asarray(pred)
    if n_resamples <= 0 or len(y) < 2:
        return float("nan"), float("nan")
    # labels as integer codes (vendor names are strings), the same for both arrays
    _, codes = np.unique(np.concatenate([y, pred]), return_inverse=True)
    codes = codes.reshape(-1)
    res = bootstrap(
        (codes[: len(y)], codes[len(y) :]),
        balanced_accuracy,
        paired=True,
        vectorized=True,
        n_resamples=int(n_resamples),
        confidence_level=confidence,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


@torch.no_grad()
def encoder_features(
    model: torch.nn.Module, images: torch.Tensor, batch: int = 64
) -> np.ndarray:
    """``[CLS token, mean fused patch token]`` of a ConvViT in eval mode, per subject."""
    model.eval()
    out = []
    for i in range(0, len(images), batch):
        f = model.forward_features(images[i : i + batch])
        out.append(torch.cat([f["cls"], f["patch_mean"]], dim=1))
    return torch.cat(out).numpy()


def pooled_split(
    clients: Mapping[str, Any], split: str
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Images, disease labels and vendor names of ``split`` pooled over ``clients``
    (:func:`medlora_lib.pipeline.load_client_data`'s dictionary)."""
    xs, ys, vs = [], [], []
    for c in clients.values():
        if split in c.splits:
            xs.append(c.splits[split][0])
            ys.append(c.splits[split][1].numpy())
            vs += [c.name] * c.num_examples(split)
    if not xs:
        raise ConfigError(f"pooled_split: no client has a {split!r} split")
    return torch.cat(xs), np.concatenate(ys), np.array(vs)


def probe_training_set(
    clients: Mapping[str, Any], subjects: int = 0
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """The probes' training set: train and validation subjects pooled (the probes
    select nothing), the first ``subjects`` of them if ``subjects > 0``."""
    x_tr, y_tr, v_tr = pooled_split(clients, "train")
    x_va, y_va, v_va = pooled_split(clients, "val")
    x, y, v = (
        torch.cat([x_tr, x_va]),
        np.concatenate([y_tr, y_va]),
        np.concatenate([v_tr, v_va]),
    )
    if subjects:
        x, y, v = x[:subjects], y[:subjects], v[:subjects]
    return x, y, v


def _encoder(weights: str, image_size: Sequence[int], in_frames: int, seed: int):
    from medlora_lib.models import build_convvit, load_pretrained

    torch.manual_seed(seed)  # the same random initialisation for every protocol
    model = build_convvit("small", image_size=tuple(image_size), in_frames=in_frames)
    if weights == "pretrained (MAE)":
        load_pretrained(model, "small")
    return model


def _encode(weights, images, protocol, image_size, seed) -> np.ndarray:
    if protocol == "per frame":
        model = _encoder(weights, image_size, 1, seed)
        return np.concatenate(
            [
                encoder_features(model, images[:, :1]),
                encoder_features(model, images[:, 1:]),
            ],
            1,
        )
    return encoder_features(_encoder(weights, image_size, 2, seed), images)


def run_probes(
    clients: Mapping[str, Any],
    image_size: Sequence[int],
    seed: int = 0,
    n_resamples: int = 1000,
    train_subjects: int = 0,
) -> pd.DataFrame:
    """Linear and k-NN probes on frozen features, pretrained vs random init.

    Args:
        clients: the data set (:func:`medlora_lib.pipeline.load_client_data`).
        image_size: the data's ``(H, W, D)``.
        seed: seeds the random initialisation and the bootstrap.
        n_resamples: bootstrap resamples per score (0: no interval).
        train_subjects: 0 = every train + validation subject, else the first ones.

    Returns:
        One row per (input protocol, task, probe, weights): ``input``, ``task``,
        ``probe``, ``weights``, ``score`` (test balanced accuracy), ``ci_low``,
        ``ci_high``, ``n_train``, ``n_test``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_tr, y_tr, v_tr = probe_training_set(clients, train_subjects)
    x_te, y_te, v_te = pooled_split(clients, "test")
    rows = []
    for protocol in PROTOCOLS:
        for weights in WEIGHTS:
            f_tr = _encode(weights, x_tr, protocol, image_size, seed)
            f_te = _encode(weights, x_te, protocol, image_size, seed)
            for task, (a_tr, a_te) in {
                "disease": (y_tr, y_te),
                "vendor": (v_tr, v_te),
            }.items():
                probes = {
                    "linear": make_pipeline(
                        StandardScaler(),
                        LogisticRegression(max_iter=3000, class_weight="balanced"),
                    ),
                    "k-NN": make_pipeline(StandardScaler(), KNeighborsClassifier(5)),
                }
                for pname, probe in probes.items():
                    pred = probe.fit(f_tr, a_tr).predict(f_te)
                    lo, hi = balanced_accuracy_ci(a_te, pred, n_resamples, seed)
                    rows.append(
                        {
                            "input": protocol,
                            "task": task,
                            "probe": pname,
                            "weights": weights,
                            "score": balanced_accuracy(a_te, pred),
                            "ci_low": lo,
                            "ci_high": hi,
                            "n_train": len(a_tr),
                            "n_test": len(a_te),
                        }
                    )
    return pd.DataFrame(rows)
