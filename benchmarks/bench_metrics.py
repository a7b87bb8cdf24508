"""Benchmark: one call of the per-site metrics, ``medlora_lib.metrics.binary_metrics``
(confusion counts + a Mann-Whitney AUC) vs the scikit-learn calls it replaced.

Every round evaluates every site on its validation and test split (and Med-DualLoRA its
global-only variant too), so a chapter makes thousands of these calls: chapter
``notebooks/03_fedavg_lora`` alone about 35 runs x 20 rounds x 4 sites x 2 splits (x 2
variants for Med-DualLoRA). Both sides compute the same seven metrics on the same
inputs (a split of 14 and one of 120 subjects: the ``cpu`` profile's test split of a
vendor and a pooled one); the test ``tests/test_metrics.py`` checks the values agree.
Run::

    .venv/bin/python benchmarks/bench_metrics.py          # ~10 s
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time

import numpy as np

from medlora_lib.metrics import binary_metrics


def sklearn_metrics(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict:
    """The former implementation: scikit-learn's functions, one call per metric."""
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        f1_score,
        matthews_corrcoef,
        recall_score,
        roc_auc_score,
    )

    pred = (p >= threshold).astype(int)
    return {
        "balanced_accuracy": balanced_accuracy_score(y, pred),
        "sensitivity": recall_score(y, pred),
        "specificity": recall_score(y, pred, pos_label=0),
        "auc": roc_auc_score(y, p),
        "f1": f1_score(y, pred, zero_division=0),
        "mcc": matthews_corrcoef(y, pred),
        "accuracy": accuracy_score(y, pred),
    }


def _per_call_ms(fn, y, p, repeat: int) -> float:
    fn(y, p)  # warm-up (imports)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn(y, p)
    return (time.perf_counter() - t0) / repeat * 1e3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=300)
    args = ap.parse_args(argv)
    print(f"$ python benchmarks/bench_metrics.py {shlex.join(sys.argv[1:])}")
    print(
        f"machine: {platform.machine()}, {platform.processor() or 'cpu'}; "
        f"python {platform.python_version()}"
    )
    rng = np.random.default_rng(0)
    print(
        f"{'subjects':>8}  {'sklearn ms/call':>15}  {'medlora ms/call':>15}  {'speed-up':>8}"
    )
    for n in (14, 120):
        y = rng.integers(0, 2, n)
        y[:2] = (0, 1)
        p = rng.random(n)
        ref = sklearn_metrics(y, p)
        ours = binary_metrics(y, p)
        worst = max(abs(ref[k] - ours[k]) for k in ref)
        assert worst < 1e-12, f"the two disagree by {worst}"
        t_sk = _per_call_ms(sklearn_metrics, y, p, args.repeat)
        t_ml = _per_call_ms(binary_metrics, y, p, args.repeat)
        print(f"{n:>8}  {t_sk:>15.3f}  {t_ml:>15.3f}  {t_sk / t_ml:>7.1f}x")
    calls = 35 * 20 * 4 * 2 * 1.2
    print(
        f"chapter 03 makes ~{calls:,.0f} calls: "
        f"{calls * t_sk / 1e3:.0f} s with sklearn, {calls * t_ml / 1e3:.1f} s now "
        "(at the 120-subject cost, an upper bound)"
    )


if __name__ == "__main__":
    main()
