"""Benchmark the synthetic data path: generate + preprocess the cpu-profile data set.

Prints subjects per second, wall time, peak memory (RSS), the in-memory size of the
whole preprocessed cpu data set, the seconds per subject of preprocessing real-size
volumes, and the upper-bound balanced accuracy of a logistic regression on the true
phenotype measurements (how separable the classes are by design).

Run: ``.venv/bin/python benchmarks/bench_data.py [--profile cpu] [--scale 1.0]``.
Explained in ``book/synthetic_data.md``.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medlora_lib.data.preprocess import preprocess_case
from medlora_lib.data.synthetic import (
    SynthConfig,
    cohort_plan,
    generate_cohort,
    make_synthetic,
    measure_phenotype,
)

FEATURES = ["lv_edv_ml", "lv_ef", "wall_max_mm", "rv_edv_ml", "rv_ef"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def upper_bound(df: pd.DataFrame, seed: int = 0) -> float:
    """5-fold cross-validated balanced accuracy of a logistic regression on FEATURES."""
    model = make_pipeline(
        StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=1000)
    )
    cv = StratifiedKFold(5, shuffle=True, random_state=seed)
    pred = cross_val_predict(model, df[FEATURES].to_numpy(), df["label"], cv=cv)
    return float(balanced_accuracy_score(df["label"], pred))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--scale", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--workers", type=int, default=1, help="also time make_synthetic(workers=N)"
    )
    args = ap.parse_args()
    cfg = SynthConfig.for_profile(args.profile, scale=args.scale, seed=args.seed)
    n = len(cohort_plan(cfg))

    t0 = time.perf_counter()
    t_gen = t_pre = 0.0
    images, labels, rows = [], [], []
    tick = time.perf_counter()
    for case in generate_cohort(cfg):
        t1 = time.perf_counter()
        t_gen += t1 - tick
        image, seg = preprocess_case(
            case.frames(),
            tuple(case.spacing),
            labels=case.labels(),
            target_spacing=cfg.spacing,
            image_size=cfg.image_size,
        )
        tick = time.perf_counter()
        t_pre += tick - t1
        images.append(image)
        labels.append(seg)
        row = measure_phenotype(seg, cfg.spacing)
        row.update(vendor=case.vendor, pathology=case.pathology, label=case.label)
        rows.append(row)
    wall = time.perf_counter() - t0
    nbytes = sum(a.nbytes for a in images) + sum(a.nbytes for a in labels)
    df = pd.DataFrame(rows)

    # preprocessing of real-size volumes (256 x 256 x 12, 25 frames at 1.4 mm)
    rng = np.random.default_rng(0)
    big = rng.random((2, 256, 256, 12), dtype=np.float32)
    seg = np.zeros((2, 256, 256, 12), np.uint8)
    seg[:, 100:140, 110:150, 2:9] = 1
    reps = 3
    t = time.perf_counter()
    for _ in range(reps):
        preprocess_case(
            big,
            (1.4, 1.4, 10.0),
            labels=seg,
            target_spacing=cfg.spacing,
            image_size=cfg.image_size,
        )
    t_real = (time.perf_counter() - t) / reps
    t = time.perf_counter()
    cine_cases = list(
        generate_cohort(
            SynthConfig.for_profile(args.profile, subjects_per_vendor={"Siemens": 2}),
            with_cine=True,
        )
    )
    t_cine = (time.perf_counter() - t) / len(cine_cases)

    t_workers = None
    if args.workers > 1:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            make_synthetic(Path(tmp) / "d", cfg, workers=args.workers)
            t_workers = time.perf_counter() - t

    print(
        f"profile {args.profile}: {n} subjects, image {cfg.image_size} "
        f"at {cfg.spacing} mm"
    )
    print("| measure | value |")
    print("|---|---|")
    print(f"| wall time, generate + preprocess | {wall:.1f} s |")
    print(f"| subjects / second | {n / wall:.1f} |")
    print(f"| generation (ED+ES, native grid) | {1000 * t_gen / n:.0f} ms / subject |")
    print(
        f"| preprocessing (synthetic native grid) | {1000 * t_pre / n:.0f} ms / subject |"
    )
    print(f"| preprocessing 2x256x256x12 @1.4 mm | {1000 * t_real:.0f} ms / subject |")
    print(
        f"| generation with whole cine ({cine_cases[0].cine.shape[-1]} frames) "
        f"| {t_cine:.2f} s / subject |"
    )
    if t_workers is not None:
        print(
            f"| make_synthetic, {args.workers} workers (incl. writing) | {t_workers:.1f} s |"
        )
    print(f"| peak RSS | {peak_rss_mb():.0f} MB |")
    print(f"| in-memory size of the preprocessed set | {nbytes / 2**20:.1f} MB |")
    print(
        f"| logistic-regression upper bound (balanced acc.) | {upper_bound(df):.3f} |"
    )
    print()
    print(df.groupby("pathology")[FEATURES].mean().round(1).to_string())


if __name__ == "__main__":
    main()
