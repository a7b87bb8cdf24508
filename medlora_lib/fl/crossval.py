"""Cross-vendor evaluation: train on one vendor alone, test on every vendor.

Chapter ``notebooks/02_single_site_baseline``.

:func:`cross_vendor_matrix` trains each vendor's ``local`` model exactly as
:func:`medlora_lib.fl.simulate` does for ``method="local"`` (the same
:class:`~medlora_lib.fl.task.ClientRuntime`, rounds × local epochs, seeds and
validation-based round selection), and additionally evaluates it on every other vendor's
test split. The diagonal of the matrix is therefore, number for number, the ``local``
run's per-client test metrics at the selected round.

:func:`balanced_accuracy_ci` is a normal-approximation interval for a balanced accuracy
computed from ``n_pos`` diseased and ``n_neg`` healthy test subjects (small test sets give
wide intervals; the chapter prints them next to every table).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from medlora_lib.config import ExperimentConfig
from medlora_lib.errors import ConfigError

__all__ = ["MATRIX_COLUMNS", "cross_vendor_matrix", "balanced_accuracy_ci"]

#: Columns of :func:`cross_vendor_matrix`'s table, in order.
MATRIX_COLUMNS = (
    "train_vendor",
    "test_vendor",
    "round",
    "balanced_accuracy",
    "specificity",
    "sensitivity",
    "auc",
    "n",
    "n_pos",
    "n_neg",
)


def _as_local(cfg: ExperimentConfig) -> ExperimentConfig:
    if not isinstance(cfg, ExperimentConfig):
        raise ConfigError(
            "cross_vendor_matrix: expected an ExperimentConfig (get_config(...)), got "
            f"{type(cfg).__name__}"
        )
    if cfg.method == "local":
        return cfg
    return ExperimentConfig.from_dict({**cfg.to_dict(), "method": "local"})


def cross_vendor_matrix(
    cfg: ExperimentConfig, *, use_cache: bool = False, verbose: bool = False
) -> pd.DataFrame:
    """Train each vendor alone (``local``) and test its model on every vendor.

    Chapter ``notebooks/02_single_site_baseline``.

    Each vendor trains for ``fed.num_rounds`` × ``train.local_epochs`` on its own training
    split; after every round its model is evaluated on its own val split and on every
    vendor's test split. The round is selected per *training* vendor on its own val split
    (``train.selection_metric``; ties: the earlier round), as in
    :func:`medlora_lib.fl.simulate.select_rounds`; the test metrics on every vendor are read
    at that one round. Same config and seed ⇒ identical numbers, and the diagonal equals
    ``simulate(cfg with method="local").selected()``.

    Args:
        cfg: the experiment config; its ``method`` is replaced by ``local``.
        use_cache: reuse / store the table next to the ``simulate`` cache
            (``default_cache_dir()/runs/local-…-crossvendor/matrix.csv``).
        verbose: print one line per round.

    Returns:
        One row per (train vendor, test vendor) with :data:`MATRIX_COLUMNS` (``round`` is
        the selected round of the training vendor), vendors in partition order.

    Raises:
        ConfigError: invalid config (as :func:`medlora_lib.fl.simulate`).
        DataError: the data folder does not match its manifest or the config.
    """
    from medlora_lib.fl.federation import InProcessSites, run_rounds
    from medlora_lib.fl.result import select_rounds
    from medlora_lib.fl.simulate import plan
    from medlora_lib.fl.sites import load_options, load_sites
    from medlora_lib.fl.task import ClientRuntime

    cfg = _as_local(cfg)
    (p,) = plan([cfg], use_cache=True, scratch=Path("."))
    cache = p.run_dir.parent / f"{p.run_dir.name}-crossvendor" / "matrix.csv"
    if use_cache and cache.exists():
        if verbose:
            print(f"cross-vendor matrix cached: {cache}")
        return pd.read_csv(cache)

    names = list(p.sites)
    data = load_sites(p.data_dir, names, **load_options(cfg))
    runtimes = {
        n: ClientRuntime.build(cfg, data, n, data_key=str(p.data_dir)) for n in names
    }
    # every runtime holds the same frozen backbone, so one site's (prefix-cached)
    # evaluation inputs serve every model: after training, each model evaluates every
    # site's splits as well as its own
    all_sets = {n: rt.eval_sets[n] for n, rt in runtimes.items()}
    metric = cfg.train.selection_metric
    rows: list[dict[str, Any]] = []
    sites = InProcessSites(runtimes, federated=False)

    def on_train(site: str, res: Any) -> None:
        rt = runtimes[site]
        own = rt.eval_sets
        rt.eval_sets = all_sets
        try:
            evals = rt.evaluate_round(res.shared, res.private)
        finally:
            rt.eval_sets = own
        rnd = (
            len([r for r in rows if r["client"] == site and r["test_vendor"] == site])
            + 1
        )
        val = evals[site].get(f"val_{metric}", float("nan"))
        for test_name in names:
            m = evals[test_name]
            rows.append(
                {
                    "client": site,
                    "round": rnd,
                    "test_vendor": test_name,
                    f"val_{metric}": val,
                    **{k: m.get(f"test_{k}", float("nan")) for k in MATRIX_COLUMNS[3:]},
                }
            )
        if verbose:
            print(
                f"[cross-vendor] round {rnd}/{cfg.fed.num_rounds} {site:>8s} "
                f"val {metric} {val:.3f}",
                flush=True,
            )

    sites.on_train = on_train
    run_rounds(sites, cfg, {}, label="cross-vendor")
    per_round = pd.DataFrame(rows)
    chosen = select_rounds(
        per_round[per_round["client"] == per_round["test_vendor"]], metric
    )
    picked = [
        per_round[(per_round["client"] == n) & (per_round["round"] == chosen[n])]
        for n in names
    ]
    matrix = (
        pd.concat(picked)
        .rename(columns={"client": "train_vendor"})
        .loc[:, list(MATRIX_COLUMNS)]
        .reset_index(drop=True)
    )
    if use_cache:
        from medlora_lib.results import write_table

        write_table(cache, matrix)
    return matrix


def balanced_accuracy_ci(
    sensitivity: float,
    specificity: float,
    n_pos: float,
    n_neg: float,
    z: float = 1.96,
) -> tuple[float, float]:
    """Approximate interval of a balanced accuracy (clipped to [0, 1]).

    Chapter ``notebooks/02_single_site_baseline``. The variance of
    ``(sens + spec) / 2`` is ``(sens(1-sens)/n_pos + spec(1-spec)/n_neg) / 4``, with each
    rate shrunk as ``(k + 1) / (n + 2)`` and ``n + 2`` subjects (Agresti–Caffo) so that a
    rate of 0 or 1 on a few subjects does not give a zero-width interval. With a handful
    of subjects per class the interval is wide and only indicative.

    Args:
        sensitivity: observed true-positive rate.
        specificity: observed true-negative rate.
        n_pos: diseased test subjects.
        n_neg: healthy test subjects.
        z: the normal quantile (1.96 for 95 %).

    Returns:
        ``(low, high)`` around the observed balanced accuracy; ``(nan, nan)`` when a
        class is absent.
    """
    nan = float("nan")
    if not n_pos or not n_neg or math.isnan(sensitivity) or math.isnan(specificity):
        return nan, nan
    var = 0.0
    for rate, n in ((sensitivity, n_pos), (specificity, n_neg)):
        shrunk = (rate * n + 1) / (n + 2)
        var += shrunk * (1 - shrunk) / (n + 2)
    ba = (sensitivity + specificity) / 2
    half = z * math.sqrt(var / 4)
    return max(0.0, ba - half), min(1.0, ba + half)
