"""Statistics for comparing federated methods over several seeds.

Chapters ``notebooks/03_fedavg_lora`` to ``notebooks/06_communication_analysis``: every
table that compares methods is built here, so that each chapter reports the same numbers
in the same way.

Everything takes a *results frame*: the concatenation of
:meth:`~medlora_lib.fl.simulate.RunResult.selected` frames of many runs (one run = one
method × one seed), as :func:`collect` builds it. Rows whose ``client`` is ``"mean"``
(mean over clients) or ``"pooled"`` (from pooled confusion counts) are summaries; every
other row is one vendor.

* :func:`seed_summary` — mean, standard deviation and Student-t interval over seeds.
* :func:`vendor_differences` — per vendor, the paired differences reference − baseline
  over the replicates (seeds), with a Student-t interval over replicates.
* :func:`vendor_level_comparison` — inference at the right unit: the vendors are the
  independent units, the replicates are nested in them. Mean over vendors of the
  per-vendor mean differences, a **hierarchical bootstrap** interval (resample vendors,
  then replicates within each), and a t-test on the per-vendor mean differences
  (``n_vendors − 1`` degrees of freedom — the summary-statistics test of a
  random-vendor-effect model).
* :func:`declare_families` / :func:`compare_families` — the comparisons of a chapter
  declared once, in families (primary: balanced accuracy against each baseline;
  secondary: specificity, the global adapter alone, each sweep level), with the
  correction for multiple comparisons applied within each family;
  :func:`verdict_sentence` and :func:`reading` turn a family's rows into the sentences
  the chapters glue.
* :func:`paired_comparison` — the older per-unit analysis: every (seed, vendor) pair as a
  unit (paired bootstrap, Wilcoxon). The pairs of one vendor share its test subjects, so
  they are not independent; kept for per-unit descriptions (wins / ties / losses), not
  for the verdicts.
* :func:`paper_table` — one row per method, ``mean ± half-width`` per metric, megabytes
  per round, and the published numbers of the Med-DualLoRA paper (:data:`PAPER_RESULTS`)
  as a last, clearly labelled row: they come from real data, not from ours.

With a handful of seeds and vendors these tests have little power: "no significant
difference" means the data cannot tell, not that the methods are equal.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats as sps

from medlora_lib.errors import ConfigError
from medlora_lib.experiments import ALL_METHODS
from medlora_lib.metrics import METRIC_NAMES

__all__ = [
    "METHOD_ORDER",
    "SUMMARY_CLIENTS",
    "DEFAULT_METRICS",
    "PAPER_SOURCE",
    "PAPER_LABEL",
    "PAPER_RESULTS",
    "collect",
    "seed_summary",
    "paired_comparison",
    "vendor_differences",
    "hierarchical_bootstrap",
    "vendor_level_comparison",
    "Comparison",
    "declare_families",
    "compare_families",
    "verdict_sentence",
    "describe_difference",
    "reading",
    "paper_table",
]

#: Canonical order of methods in every table (methods not listed follow, sorted).
METHOD_ORDER = ALL_METHODS
#: ``client`` values of summary rows; every other value is one vendor.
SUMMARY_CLIENTS = ("mean", "pooled")
#: Metrics shown by default (balanced accuracy and specificity lead: positives dominate).
DEFAULT_METRICS = ("balanced_accuracy", "sensitivity", "specificity", "auc")

#: Where the numbers of :data:`PAPER_RESULTS` come from.
PAPER_SOURCE = "Med-DualLoRA (arXiv 2603.10967), real ACDC + M&Ms, vendors as clients"
#: How :func:`paper_table` labels the paper's row.
PAPER_LABEL = "Med-DualLoRA (paper, real ACDC + M&Ms — different data)"
#: Published real-data numbers of the Med-DualLoRA paper. Only balanced accuracy and
#: specificity of Med-DualLoRA are public; every other metric is NaN, and no other
#: method has a row. Different data from this book's: a context line, not a target.
PAPER_RESULTS = pd.DataFrame(
    [
        {
            "method": "med_dual_lora",
            **dict.fromkeys(METRIC_NAMES, float("nan")),
            "balanced_accuracy": 0.768,
            "specificity": 0.612,
            "source": PAPER_SOURCE,
        }
    ]
)

_LEVELS = ("mean", "pooled", "client")
_CORRECTIONS = ("bh", "bonferroni", "none")
_CI_METHODS = ("percentile", "BCa")
_TIE_TOL = 1e-12  # differences below this are float round-off: counted as ties


_PAIRED_COLUMNS = [
    "reference",
    "baseline",
    "metric",
    "n_pairs",
    "n_dropped",
    "n_unmatched",
    "reference_mean",
    "baseline_mean",
    "mean_diff",
    "ci_low",
    "ci_high",
    "p_value",
    "p_adjusted",
    "correction",
    "wins",
    "ties",
    "losses",
    "verdict",
    "note",
]
_VENDOR_COLUMNS = [
    "family",
    "reference",
    "baseline",
    "metric",
    "n_vendors",
    "n_replicates",
    "n_dropped",
    "reference_mean",
    "baseline_mean",
    "mean_diff",
    "ci_low",
    "ci_high",
    "p_value",
    "p_adjusted",
    "correction",
    "vendors_better",
    "vendors_worse",
    "verdict",
    "note",
]


# ------------------------------------------------------------------------------ helpers
def _ordered_methods(methods: Iterable[Any]) -> list[str]:
    present = {str(m) for m in methods}
    known = [m for m in METHOD_ORDER if m in present]
    return known + sorted(present - set(known))


def _names(value: str | Iterable[str]) -> list[str]:
    """One name or several, as a list."""
    return [value] if isinstance(value, str) else list(value)


def _require_present(
    value: str | Iterable[str], present: Iterable[str], message: str
) -> list[str]:
    """:func:`_names` of ``value``, each of them in ``present``.

    Raises:
        ConfigError: ``message`` with ``{absent}`` filled by the names not present.
    """
    names, present = _names(value), set(present)
    absent = [n for n in names if n not in present]
    if absent:
        raise ConfigError(message.replace("{absent}", str(absent)))
    return names


def _check_confidence(confidence: float, name: str = "confidence") -> None:
    if not 0 < float(confidence) < 1:
        raise ConfigError(
            f"{name}={confidence!r}: expected a level in (0, 1), e.g. 0.95"
        )


def _check_test_args(
    caller: str, correction: str, confidence: float, alpha: float, n_boot: int
) -> None:
    if correction not in _CORRECTIONS:
        raise ConfigError(
            f"{caller}: correction={correction!r} is unknown; expected one of "
            f"{', '.join(map(repr, _CORRECTIONS))}"
        )
    _check_confidence(confidence)
    _check_confidence(alpha, "alpha")
    if int(n_boot) < 1:
        raise ConfigError(
            f"{caller}: n_boot={n_boot!r}; expected at least 1 (e.g. 10000)"
        )


def _check_columns(frame: pd.DataFrame, columns: Iterable[str], caller: str) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise ConfigError(
            f"{caller}: expected a results frame (pandas DataFrame, see "
            f"medlora_lib.stats.collect), got {type(frame).__name__}"
        )
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        have = [c for c in frame.columns if c in METRIC_NAMES]
        raise ConfigError(
            f"{caller}: the results frame has no column {', '.join(map(repr, missing))}; "
            f"metric columns present: {have or 'none'}. Build the frame with "
            "medlora_lib.stats.collect(runs) (RunResult.selected() frames)"
        )


def _rows_at_level(frame: pd.DataFrame, level: str, caller: str) -> pd.DataFrame:
    if level not in _LEVELS:
        raise ConfigError(
            f"{caller}: level={level!r} is unknown; expected one of {', '.join(_LEVELS)}"
        )
    client = frame["client"].astype(str)
    if level == "client":
        rows = frame[~client.isin(SUMMARY_CLIENTS)]
    else:
        rows = frame[client == level]
    if rows.empty:
        raise ConfigError(
            f"{caller}: no rows with level={level!r} "
            + (
                "(every row is a 'mean' or 'pooled' summary)"
                if level == "client"
                else f"(no row has client == {level!r})"
            )
            + "; pass RunResult.selected() frames, which hold vendor, mean and pooled rows"
        )
    dup = rows.duplicated(["method", "seed", "client"], keep=False)
    if dup.any():
        units = (
            rows.loc[dup, ["method", "seed", "client"]]
            .drop_duplicates()
            .astype(str)
            .apply(tuple, axis=1)
            .tolist()
        )
        raise ConfigError(
            f"{caller}: several rows for the same (method, seed, client): {units[:10]}"
            + (f" and {len(units) - 10} more" if len(units) > 10 else "")
            + ". The frame mixes variants or 'at' values, or holds one run twice; "
            "build it with collect(runs, variant=...) from distinct runs"
        )
    return rows


def _t_interval(
    values: np.ndarray, confidence: float
) -> tuple[float, float, float, int, str]:
    """(mean, std, half_width, n, note) of ``values`` (NaN-free)."""
    n = values.size
    if n == 0:
        return math.nan, math.nan, math.nan, 0, "no value (all NaN)"
    mean = float(np.mean(values))
    if n == 1:
        return mean, math.nan, math.nan, 1, "one seed: no interval"
    std = float(np.std(values, ddof=1))
    half = float(sps.t.ppf((1 + confidence) / 2, n - 1) * std / math.sqrt(n))
    return mean, std, half, n, ""


# ------------------------------------------------------------------------------ collect
def collect(
    results: Iterable[Any] | pd.DataFrame, variant: str = "deployed"
) -> pd.DataFrame:
    """Concatenate the validation-selected test rows of many runs into a results frame.

    Chapters ``notebooks/03_fedavg_lora`` to ``06_communication_analysis``.

    Args:
        results: :class:`~medlora_lib.fl.simulate.RunResult` objects, or DataFrames
            (a run's ``final`` table or ``selected()`` frame), or one DataFrame.
        variant: ``"deployed"`` (what each client would use) or ``"global_only"``
            (Med-DualLoRA's shared adapter alone; runs without it contribute nothing).

    Returns:
        One row per (method, seed, client) with the rows of ``RunResult.selected``.

    Raises:
        ConfigError: an item is neither a RunResult nor a DataFrame, or no run has a
            row of ``variant``.
    """
    if isinstance(results, pd.DataFrame):
        results = [results]
    frames = []
    n_items = 0
    for i, item in enumerate(results):
        n_items += 1
        if isinstance(item, pd.DataFrame):
            f = item
            if "variant" in f.columns:
                f = f[f["variant"] == variant]
            if "at" in f.columns:
                f = f[f["at"] == "selected"]
        elif callable(getattr(item, "selected", None)):
            f = item.selected(variant)
        else:
            raise ConfigError(
                f"collect: item {i} is a {type(item).__name__}; expected a RunResult "
                "(from simulate) or a DataFrame of its selected() rows"
            )
        if len(f):
            frames.append(f)
    if not frames:
        raise ConfigError(
            f"collect: none of the {n_items} runs has a row with variant={variant!r} "
            "at the selected round; 'global_only' exists only for methods with a "
            "local adapter (med_dual_lora)"
        )
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------------------ seeds
def seed_summary(
    frame: pd.DataFrame,
    metrics: Sequence[str] = DEFAULT_METRICS,
    level: Literal["mean", "pooled", "client"] = "mean",
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Mean, standard deviation and Student-t interval of each metric over seeds.

    Chapters ``notebooks/03_fedavg_lora`` to ``06_communication_analysis``.

    The interval is ``mean ± t_{(1+confidence)/2, n-1} · std / √n`` (``std`` with
    ``ddof=1``): it describes the spread between seeds of one setup, not the
    uncertainty of the test sets. NaN values (e.g. the AUC of pooled rows, or balanced
    accuracy of a vendor without healthy subjects) are dropped per metric, so ``n_seeds``
    can differ between metrics.

    Args:
        frame: a results frame (:func:`collect`).
        metrics: metric columns to summarise.
        level: ``"mean"`` — the mean-over-clients rows; ``"pooled"`` — the rows from
            pooled confusion counts; ``"client"`` — the per-vendor rows, one group per
            (method, client).
        confidence: level of the interval.

    Returns:
        Tidy table, one row per (method[, client], metric): ``n_seeds``, ``mean``,
        ``std``, ``half_width``, ``ci_low``, ``ci_high``, ``confidence`` and ``note``
        (why the interval is NaN: one seed, or no value). Methods in
        :data:`METHOD_ORDER`.

    Raises:
        ConfigError: unknown level, missing metric column, bad confidence, or several
            rows for one (method, seed, client).
    """
    metrics = _names(metrics)
    _check_confidence(confidence)
    _check_columns(frame, ["method", "seed", "client", *metrics], "seed_summary")
    rows = _rows_at_level(frame, level, "seed_summary")
    keys = ["method", "client"] if level == "client" else ["method"]
    out = []
    for method in _ordered_methods(rows["method"].unique()):
        sub = rows[rows["method"].astype(str) == method]
        groups = (
            [
                (c, sub[sub["client"] == c])
                for c in sorted(sub["client"].unique(), key=str)
            ]
            if level == "client"
            else [(None, sub)]
        )
        for client, g in groups:
            g = g.sort_values("seed", kind="stable")  # order-free float sums
            for metric in metrics:
                v = g[metric].to_numpy(dtype=float)
                v = v[~np.isnan(v)]
                mean, std, half, n, note = _t_interval(v, confidence)
                row: dict[str, Any] = {"method": method}
                if client is not None:
                    row["client"] = client
                row.update(
                    metric=metric,
                    n_seeds=n,
                    mean=mean,
                    std=std,
                    half_width=half,
                    ci_low=mean - half,
                    ci_high=mean + half,
                    confidence=float(confidence),
                    note=note,
                )
                out.append(row)
    cols = [
        *keys,
        "metric",
        "n_seeds",
        "mean",
        "std",
        "half_width",
        "ci_low",
        "ci_high",
        "confidence",
        "note",
    ]
    return pd.DataFrame(out, columns=cols)


# ------------------------------------------------------------------------------ paired
def _adjust(p: np.ndarray, correction: str) -> np.ndarray:
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    if not ok.any():
        return out
    if correction == "bh":
        out[ok] = sps.false_discovery_control(p[ok], method="bh")
    elif correction == "bonferroni":
        out[ok] = np.minimum(p[ok] * ok.sum(), 1.0)
    else:
        out[ok] = p[ok]
    return out


def _bootstrap_ci(
    d: np.ndarray, n_boot: int, seed: int, confidence: float, ci_method: str
) -> tuple[float, float, str]:
    if d.size < 2:
        return math.nan, math.nan, "one pair: no interval"
    if np.ptp(d) == 0:
        # every resample has the same mean: the interval is that single value
        return float(d[0]), float(d[0]), "all differences equal: zero-width interval"

    def run(method: str) -> tuple[float, float]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BCa on heavy ties: NaN, handled below
            res = sps.bootstrap(
                (d,),
                np.mean,
                n_resamples=n_boot,
                confidence_level=confidence,
                method=method,
                vectorized=True,
                rng=np.random.default_rng(seed),
            )
        return float(res.confidence_interval.low), float(res.confidence_interval.high)

    low, high = run(ci_method)
    if ci_method != "percentile" and (math.isnan(low) or math.isnan(high)):
        low, high = run("percentile")
        return low, high, f"{ci_method} undefined (ties): percentile interval"
    return low, high, ""


def _fmt_units(units: Iterable[tuple[Any, Any]], limit: int = 12) -> str:
    units = sorted(units, key=lambda u: (str(u[0]), str(u[1])))
    text = ", ".join(f"(seed={s}, client={c})" for s, c in units[:limit])
    return text + (f" and {len(units) - limit} more" if len(units) > limit else "")


def paired_comparison(
    frame: pd.DataFrame,
    reference: str = "med_dual_lora",
    baselines: Sequence[str] | None = None,
    metric: str = "balanced_accuracy",
    n_boot: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
    correction: Literal["bh", "bonferroni", "none"] = "bh",
    *,
    dropna: bool = False,
    alpha: float = 0.05,
    ci_method: Literal["percentile", "BCa"] = "percentile",
) -> pd.DataFrame:
    """Compare ``reference`` with each baseline on the same (seed, vendor) units.

    Chapters ``notebooks/04_med_dual_lora`` and ``05``/``06`` (method comparisons).

    The paired unit is one vendor in one seed (per-vendor rows only; the ``mean`` and
    ``pooled`` summaries are left out). Per baseline, with ``d = reference − baseline``
    per unit:

    * a paired-bootstrap interval of the mean of ``d`` (``scipy.stats.bootstrap`` with
      ``numpy.random.default_rng(seed)``, the same stream for every baseline so that a
      baseline's row does not depend on which other baselines are compared);
    * the two-sided Wilcoxon signed-rank p-value of ``d`` (zero differences are
      dropped, scipy's default; all differences zero → ``p = 1``);
    * the p-value adjusted across the baselines (``correction``);
    * wins / ties / losses of the reference (differences below 1e-12 are ties);
    * ``verdict``: significant after correction at ``alpha`` → "reference better" or
      "baseline better" by the sign of the mean difference; else "no significant
      difference" (which, with few units, means "cannot tell", not "equal").

    Units are sorted before anything is computed, so the order of the input rows does
    not change the result.

    Args:
        frame: a results frame (:func:`collect`).
        reference: the method compared with every baseline.
        baselines: methods to compare with; ``None`` — every other method of the frame,
            in :data:`METHOD_ORDER`.
        metric: the metric column compared (higher is better).
        n_boot: bootstrap resamples.
        seed: seed of the bootstrap's generator.
        confidence: level of the bootstrap interval.
        correction: ``"bh"`` (Benjamini–Hochberg, ``scipy.stats.false_discovery_control``),
            ``"bonferroni"`` (``p × m`` clipped at 1) or ``"none"``.
        dropna: compare on the units both methods have, instead of raising when a unit
            is missing for one of them.
        alpha: significance level of ``verdict`` (on the adjusted p-value).
        ci_method: ``"percentile"`` or ``"BCa"`` (falls back to percentile, with a note,
            when BCa is undefined because of ties).

    Returns:
        One row per baseline: ``reference``, ``baseline``, ``metric``, ``n_pairs``,
        ``n_dropped`` (units left out: NaN metric for either method, or — with
        ``dropna`` — no partner), ``n_unmatched`` (of those, units without a partner),
        ``reference_mean``, ``baseline_mean``, ``mean_diff``, ``ci_low``, ``ci_high``,
        ``p_value``, ``p_adjusted``, ``correction``, ``wins``, ``ties``, ``losses``,
        ``verdict``, ``note``.

    Raises:
        ConfigError: unknown correction / ci_method, bad ``confidence`` / ``alpha`` /
            ``n_boot``, a method absent from the frame, a missing metric column, several
            rows per (method, seed, client), units missing for one method (without
            ``dropna``), or no unit left to compare.
    """
    caller = "paired_comparison"
    _check_test_args(caller, correction, confidence, alpha, n_boot)
    if ci_method not in _CI_METHODS:
        raise ConfigError(
            f"{caller}: ci_method={ci_method!r} is unknown; expected one of "
            f"{', '.join(map(repr, _CI_METHODS))}"
        )
    baselines, paired = _paired_units(
        frame, reference, baselines, metric, dropna, caller
    )
    out = []
    for base_name in baselines:
        units, n_dropped, n_unmatched = paired[base_name]
        units = units.sort_values(["seed", "client"], kind="stable")
        r, b = units["ref"].to_numpy(), units["base"].to_numpy()
        d = units["d"].to_numpy()
        low, high, note = _bootstrap_ci(d, int(n_boot), seed, confidence, ci_method)
        if np.all(d == 0):
            p = 1.0
        else:
            p = float(sps.wilcoxon(d, alternative="two-sided").pvalue)
        out.append(
            {
                "reference": reference,
                "baseline": base_name,
                "metric": metric,
                "n_pairs": int(d.size),
                "n_dropped": n_dropped,
                "n_unmatched": n_unmatched,
                "reference_mean": float(r.mean()),
                "baseline_mean": float(b.mean()),
                "mean_diff": float(d.mean()),
                "ci_low": low,
                "ci_high": high,
                "p_value": p,
                "wins": int((d > 0).sum()),
                "ties": int((d == 0).sum()),
                "losses": int((d < 0).sum()),
                "note": note,
            }
        )
    return _with_verdicts(pd.DataFrame(out), correction, alpha, _PAIRED_COLUMNS)


# ------------------------------------------------------------------- at the vendor level
def _paired_units(
    frame: pd.DataFrame,
    reference: str,
    baselines: Sequence[str] | None,
    metric: str,
    dropna: bool,
    caller: str,
) -> tuple[list[str], dict[str, tuple[pd.DataFrame, int]]]:
    """Per baseline: the (seed, client) units both methods have, with ``d``.

    Returns ``(baselines, {baseline: (units, n_dropped, n_unmatched)})``; ``units`` has
    the columns
    ``seed, client, ref, base, d`` (sorted by client, then seed).
    """
    _check_columns(frame, ["method", "seed", "client", metric], caller)
    rows = _rows_at_level(frame, "client", caller)
    rows = rows.assign(method=rows["method"].astype(str))
    methods = set(rows["method"].unique())
    if reference not in methods:
        raise ConfigError(
            f"{caller}: reference={reference!r} has no per-vendor row; methods in the "
            f"frame: {_ordered_methods(methods)}"
        )
    if baselines is None:
        baselines = [m for m in _ordered_methods(methods) if m != reference]
    else:
        baselines = _require_present(
            baselines,
            methods,
            f"{caller}: baseline(s) {{absent}} have no per-vendor row; methods in the "
            f"frame: {_ordered_methods(methods)}",
        )
        if reference in baselines:
            raise ConfigError(f"{caller}: {reference!r} is both reference and baseline")
    if not baselines:
        raise ConfigError(
            f"{caller}: no baseline to compare {reference!r} with; the frame holds no "
            "other method"
        )

    def by_unit(method: str) -> pd.Series:
        g = rows[rows["method"] == method]
        return pd.Series(
            g[metric].to_numpy(dtype=float),
            index=pd.MultiIndex.from_arrays(
                [g["client"].astype(str).to_numpy(), g["seed"].to_numpy()],
                names=["client", "seed"],
            ),
        )

    order = {c: i for i, c in enumerate(dict.fromkeys(rows["client"].astype(str)))}
    ref = by_unit(reference)
    out = {}
    for base_name in baselines:
        base = by_unit(base_name)
        only_ref = ref.index.difference(base.index)
        only_base = base.index.difference(ref.index)
        n_unmatched = len(only_ref) + len(only_base)
        if n_unmatched and not dropna:
            parts = []
            if len(only_ref):
                parts.append(
                    f"missing for {base_name!r}: "
                    + _fmt_units((s, c) for c, s in only_ref)
                )
            if len(only_base):
                parts.append(
                    f"missing for {reference!r}: "
                    + _fmt_units((s, c) for c, s in only_base)
                )
            raise ConfigError(
                f"{caller}: {reference!r} and {base_name!r} do not cover the same "
                f"(seed, client) units — {'; '.join(parts)}. Run the missing seeds, or "
                "pass dropna=True to compare on the common units only"
            )
        common = ref.index.intersection(base.index).sort_values()
        units = pd.DataFrame(
            {
                "client": common.get_level_values("client"),
                "seed": common.get_level_values("seed"),
                "ref": ref.reindex(common).to_numpy(),
                "base": base.reindex(common).to_numpy(),
            }
        )
        keep = ~(units["ref"].isna() | units["base"].isna())
        n_dropped = n_unmatched + int((~keep).sum())
        units = units[keep]
        # vendors in the frame's order (first appearance), replicates by seed
        units = units.sort_values(
            ["client", "seed"], key=lambda c: c.map(order) if c.name == "client" else c
        ).reset_index(drop=True)
        if units.empty:
            raise ConfigError(
                f"{caller}: no (seed, client) unit where both {reference!r} and "
                f"{base_name!r} have a {metric!r} value ({n_dropped} dropped)"
            )
        d = (units["ref"] - units["base"]).to_numpy(dtype=float, copy=True)
        d[np.abs(d) < _TIE_TOL] = 0.0
        units["d"] = d
        out[base_name] = (units, n_dropped, n_unmatched)
    return list(baselines), out


def vendor_differences(
    frame: pd.DataFrame,
    reference: str = "med_dual_lora",
    baselines: Sequence[str] | None = None,
    metric: str = "balanced_accuracy",
    confidence: float = 0.95,
    *,
    dropna: bool = False,
) -> pd.DataFrame:
    """Per vendor: the paired differences ``reference − baseline`` over the replicates.

    Chapters ``notebooks/03_fedavg_lora``, ``04_med_dual_lora`` and
    ``07_beyond_the_paper``. A replicate is one seed (its own training run, and with
    ``data.split="per_seed"`` its own train / validation / test split of each vendor).

    Returns:
        One row per (baseline, vendor): ``reference, baseline, metric, client,
        n_replicates, reference_mean, baseline_mean, mean_diff, ci_low, ci_high``
        (Student-t over the replicates), ``wins, ties, losses``.

    Raises:
        ConfigError: as :func:`paired_comparison`.
    """
    caller = "vendor_differences"
    _check_confidence(confidence)
    baselines, paired = _paired_units(
        frame, reference, baselines, metric, dropna, caller
    )
    out = []
    for base_name in baselines:
        units = paired[base_name][0]
        for client, g in units.groupby("client", sort=False):
            d = g["d"].to_numpy()
            mean, _, half, n, _ = _t_interval(d, confidence)
            out.append(
                {
                    "reference": reference,
                    "baseline": base_name,
                    "metric": metric,
                    "client": client,
                    "n_replicates": n,
                    "reference_mean": float(g["ref"].mean()),
                    "baseline_mean": float(g["base"].mean()),
                    "mean_diff": mean,
                    "ci_low": mean - half,
                    "ci_high": mean + half,
                    "wins": int((d > 0).sum()),
                    "ties": int((d == 0).sum()),
                    "losses": int((d < 0).sum()),
                }
            )
    return pd.DataFrame(out)


def hierarchical_bootstrap(
    groups: Sequence[np.ndarray],
    n_boot: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, np.ndarray]:
    """Percentile interval of the mean over groups of the per-group means, resampling
    groups (vendors) with replacement and then, independently in every drawn slot, the
    values (replicates) of the drawn group with replacement.

    Chapter ``notebooks/04_med_dual_lora``. With few groups the interval is only as
    wide as the groups allow (4 vendors: at most 4⁴ vendor draws); it is reported with
    the vendor-level t-test of :func:`vendor_level_comparison`, not instead of it.

    Returns:
        ``(low, high, means)``: the interval and the ``n_boot`` bootstrap means.
    """
    _check_confidence(confidence)
    groups = [np.asarray(g, dtype=float) for g in groups]
    if not groups or any(g.size == 0 for g in groups):
        raise ConfigError("hierarchical_bootstrap: every group needs a value")
    rng = np.random.default_rng(seed)
    k = len(groups)
    pick = rng.integers(0, k, size=(n_boot, k))
    # per group, an independent replicate-resample mean for every (draw, slot)
    resampled = np.stack(
        [
            g[rng.integers(0, g.size, size=(n_boot, k, g.size))].mean(axis=2)
            for g in groups
        ]
    )  # (group, draw, slot)
    draws = np.arange(n_boot)[:, None]
    slots = np.arange(k)[None, :]
    means = resampled[pick, draws, slots].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high), means


def vendor_level_comparison(
    frame: pd.DataFrame,
    reference: str = "med_dual_lora",
    baselines: Sequence[str] | None = None,
    metric: str = "balanced_accuracy",
    n_boot: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
    correction: Literal["bh", "bonferroni", "none"] = "bh",
    *,
    dropna: bool = False,
    alpha: float = 0.05,
    family: str = "",
) -> pd.DataFrame:
    """Compare ``reference`` with each baseline with the **vendor** as the unit.

    Chapters ``notebooks/03_fedavg_lora``, ``04_med_dual_lora`` and
    ``07_beyond_the_paper``. The replicates (seeds) of one vendor share its subjects
    and its scanner: they are nested in the vendor, not independent units. Per
    baseline, with ``d = reference − baseline`` per (vendor, replicate):

    * ``mean_diff`` — the mean over vendors of each vendor's mean ``d`` (every vendor
      weighs the same, as in the book's "mean over vendors");
    * ``ci_low`` / ``ci_high`` — :func:`hierarchical_bootstrap` (vendors, then
      replicates) at ``confidence``, the same generator stream for every baseline;
    * ``p_value`` — two-sided one-sample t-test (``scipy.stats.ttest_1samp``) of the
      per-vendor mean differences against 0, ``n_vendors − 1`` degrees of freedom: for a
      balanced design this is the test of the fixed effect in a random-vendor-intercept
      model. All differences zero → ``p = 1``; one vendor → no test (NaN);
    * ``p_adjusted`` across the rows (``correction``; :func:`compare_families` adjusts
      within a declared family instead), ``verdict`` as in :func:`paired_comparison`;
    * ``vendors_better`` / ``vendors_worse`` — vendors whose mean ``d`` is > 0 / < 0.

    With four vendors the test has three degrees of freedom: only large, consistent
    differences reach significance. That is the honest power of four hospitals.

    Returns:
        One row per baseline: ``family, reference, baseline, metric, n_vendors,
        n_replicates`` (per vendor; the smallest if they differ), ``n_dropped``,
        ``reference_mean, baseline_mean, mean_diff, ci_low, ci_high, p_value,
        p_adjusted, correction, vendors_better, vendors_worse, verdict, note``.

    Raises:
        ConfigError: as :func:`paired_comparison`.
    """
    caller = "vendor_level_comparison"
    _check_test_args(caller, correction, confidence, alpha, n_boot)
    baselines, paired = _paired_units(
        frame, reference, baselines, metric, dropna, caller
    )
    out = []
    for base_name in baselines:
        units, n_dropped, _ = paired[base_name]
        per = units.groupby("client", sort=False)
        groups = [g["d"].to_numpy() for _, g in per]
        vendor_d = np.array([g.mean() for g in groups])
        sizes = sorted({g.size for g in groups})
        note = "" if len(sizes) == 1 else f"replicates per vendor differ: {sizes}"
        if np.all(vendor_d == 0) and all(np.all(g == 0) for g in groups):
            p, low, high = 1.0, 0.0, 0.0
            note = note or "all differences zero"
        else:
            low, high, _ = hierarchical_bootstrap(groups, int(n_boot), seed, confidence)
            if vendor_d.size < 2:
                p = math.nan
                note = note or "one vendor: no test"
            elif np.ptp(vendor_d) == 0:
                p = 0.0  # identical non-zero vendor means: no spread to test against
                note = note or "every vendor has the same mean difference"
            else:
                p = float(sps.ttest_1samp(vendor_d, 0.0).pvalue)
        out.append(
            {
                "family": family,
                "reference": reference,
                "baseline": base_name,
                "metric": metric,
                "n_vendors": int(vendor_d.size),
                "n_replicates": int(sizes[0]),
                "n_dropped": n_dropped,
                "reference_mean": float(per["ref"].mean().mean()),
                "baseline_mean": float(per["base"].mean().mean()),
                "mean_diff": float(vendor_d.mean()),
                "ci_low": low,
                "ci_high": high,
                "p_value": p,
                "vendors_better": int((vendor_d > 0).sum()),
                "vendors_worse": int((vendor_d < 0).sum()),
                "note": note,
            }
        )
    table = pd.DataFrame(out)
    return _with_verdicts(table, correction, alpha)


def _with_verdicts(
    table: pd.DataFrame,
    correction: str,
    alpha: float,
    columns: Sequence[str] = (),
) -> pd.DataFrame:
    """Adjusted p-values (``correction``) and verdicts at ``alpha``; ``columns`` kept."""
    table = table.copy()
    table["p_adjusted"] = _adjust(table["p_value"].to_numpy(dtype=float), correction)
    table["correction"] = correction
    table["verdict"] = [
        "no significant difference"
        if not (pa < alpha) or md == 0
        else ("reference better" if md > 0 else "baseline better")
        for pa, md in zip(table["p_adjusted"], table["mean_diff"], strict=True)
    ]
    return table[list(columns or _VENDOR_COLUMNS)]


@dataclass(frozen=True)
class Comparison:
    """One declared comparison: ``reference − baseline`` on ``metric``, in ``family``."""

    family: str
    reference: str
    baseline: str
    metric: str = "balanced_accuracy"


def declare_families(
    reference: str,
    baselines: Sequence[str],
    *,
    secondary_metrics: Sequence[str] = ("specificity",),
    global_only: str | None = None,
    controls: Sequence[tuple[str, str]] = (),
    sweep: Mapping[str, tuple[str, str]] | None = None,
) -> list[Comparison]:
    """The comparisons of a chapter, declared once, in families.

    Chapters ``notebooks/03_fedavg_lora`` to ``07_beyond_the_paper``.

    * ``primary``: balanced accuracy, ``reference`` against each baseline;
    * ``secondary``: each of ``secondary_metrics`` against each baseline, and — when
      ``global_only`` names the method label of the global adapter alone (e.g.
      ``"med_dual_lora_global"``) — the deployed model against it on balanced accuracy;
    * ``capacity``: the capacity-matched controls, ``(reference, baseline)`` pairs on
      balanced accuracy (e.g. Med-DualLoRA against FedAvg-LoRA at rank 2r);
    * ``sweep``: one family of its own, ``{level label: (reference, baseline)}`` on
      balanced accuracy (a chapter 7 sweep, one comparison per level).

    :func:`compare_families` corrects for multiple comparisons within each family.
    """
    out = [Comparison("primary", reference, b) for b in baselines]
    for m in secondary_metrics:
        out += [Comparison("secondary", reference, b, m) for b in baselines]
    if global_only:
        out.append(Comparison("secondary", reference, global_only))
    out += [Comparison("capacity", ref, base) for ref, base in controls]
    for level, (ref, base) in (sweep or {}).items():
        out.append(Comparison(f"sweep: {level}", ref, base))
    return out


def compare_families(
    frames: pd.DataFrame | Mapping[str, pd.DataFrame],
    comparisons: Sequence[Comparison],
    *,
    correction: Literal["bh", "bonferroni", "none"] = "bh",
    alpha: float = 0.05,
    n_boot: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
    dropna: bool = False,
) -> pd.DataFrame:
    """Run every declared comparison at the vendor level; correct within each family.

    Chapters ``notebooks/03_fedavg_lora`` to ``07_beyond_the_paper``.

    Args:
        frames: one results frame, or ``{family: frame}`` when families come from
            different runs (a sweep level's runs); a family without its own frame uses
            the frame under ``""``. Family names starting with ``"sweep:"`` are
            corrected together, as one family.
        comparisons: from :func:`declare_families`.

    Returns:
        :func:`vendor_level_comparison` rows, one per comparison, in declaration order,
        with ``p_adjusted`` / ``verdict`` computed within the family.
    """
    if not comparisons:
        raise ConfigError("compare_families: no comparison declared")
    if isinstance(frames, pd.DataFrame):
        frames = {"": frames}
    rows = []
    for c in comparisons:
        frame = frames.get(c.family, frames.get(""))
        if frame is None:
            raise ConfigError(
                f"compare_families: no results frame for family {c.family!r}; pass "
                "{family: frame} with that family or a default under ''"
            )
        rows.append(
            vendor_level_comparison(
                frame,
                c.reference,
                [c.baseline],
                c.metric,
                n_boot=n_boot,
                seed=seed,
                confidence=confidence,
                correction="none",
                dropna=dropna,
                alpha=alpha,
                family=c.family,
            )
        )
    table = pd.concat(rows, ignore_index=True)
    group = table["family"].where(~table["family"].str.startswith("sweep:"), "sweep")
    parts = []
    for _, idx in table.groupby(group, sort=False).groups.items():
        parts.append(_with_verdicts(table.loc[idx], correction, alpha))
    return pd.concat(parts).sort_index()


def describe_difference(row: Mapping[str, Any]) -> str:
    """One comparison's difference as the tables give it (for the glued sentences)."""
    return (
        f"{row['mean_diff']:+.3f}, 95 % interval {row['ci_low']:+.3f} to "
        f"{row['ci_high']:+.3f}, adjusted p = {row['p_adjusted']:.2f}"
    )


def reading(row: Mapping[str, Any], name: str) -> str:
    """What the test and the interval of one comparison allow one to say, and no more."""
    if row["verdict"] == "reference better":
        return f"better than {name}"
    if row["verdict"] == "baseline better":
        return f"worse than {name}"
    if row["ci_low"] > 0:
        return (
            f"probably better than {name} (the interval lies above zero, but the "
            "corrected test does not call it)"
        )
    if row["ci_high"] < 0:
        return (
            f"probably worse than {name} (the interval lies below zero, but the "
            "corrected test does not call it)"
        )
    return f"not distinguishable from {name}"


def verdict_sentence(table: pd.DataFrame, name: str = "Med-DualLoRA") -> str:
    """The verdict of one family (e.g. the primary rows of :func:`compare_families`)."""
    better = table[table["verdict"] == "reference better"]["baseline"].tolist()
    worse = table[table["verdict"] == "baseline better"]["baseline"].tolist()
    if better and not worse and len(better) == len(table):
        return f"{name} is significantly better than every baseline here."
    if worse:
        return (
            f"{name} does **not** win here: it is significantly worse than "
            + ", ".join(worse)
            + (" and better than " + ", ".join(better) if better else "")
            + "."
        )
    if better:
        return (
            f"{name} is significantly better than "
            + ", ".join(better)
            + " and not distinguishable from the others."
        )
    return (
        f"{name} is not significantly different from any baseline here (vendor-level "
        "tests, corrected within the family)."
    )


# ------------------------------------------------------------------------------ table
def _fmt_cell(mean: float, half: float, n: int, digits: int) -> str:
    if n == 0 or math.isnan(mean):
        return "—"
    if math.isnan(half):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def _fmt_mb(mb: float) -> str:
    return "—" if math.isnan(mb) else f"{mb:,.2f}"


def paper_table(
    frame: pd.DataFrame,
    mb_per_round: Mapping[str, float],
    metrics: Sequence[str] = DEFAULT_METRICS,
    level: Literal["mean", "pooled"] = "mean",
    *,
    order: Sequence[str] | None = None,
    formatted: bool = True,
    confidence: float = 0.95,
    digits: int = 3,
    include_paper: bool = True,
) -> pd.DataFrame:
    """The methods table of the book: ``mean ± half-width`` per metric, MB per round.

    Chapters ``notebooks/04_med_dual_lora`` and ``06_communication_analysis``.

    Each cell is the mean over seeds and the half-width of its Student-t interval
    (:func:`seed_summary`); one seed gives the mean alone, no value gives "—". The last
    row holds the published numbers of the Med-DualLoRA paper (:data:`PAPER_RESULTS`),
    labelled :data:`PAPER_LABEL`: they were measured on real ACDC + M&Ms, not on this
    book's data, and unknown cells show "—".

    Args:
        frame: a results frame (:func:`collect`).
        mb_per_round: megabytes one client sends per round, by method (e.g. from
            :func:`medlora_lib.comm.closed_form_bytes` ``["shared_bytes"] / 1e6``);
            methods left out show "—".
        metrics: metric columns, in order.
        level: ``"mean"`` (mean over clients) or ``"pooled"`` (pooled counts) rows.
        order: methods, in order; ``None`` — the frame's methods in
            :data:`METHOD_ORDER`, then any others.
        formatted: strings ``"0.812 ± 0.021"``; ``False`` — numbers: per metric the
            mean, ``<metric>_half_width`` and ``<metric>_n_seeds``, so a notebook can
            sort and plot.
        confidence: level of the intervals.
        digits: decimals of the formatted numbers.
        include_paper: add the paper's row.

    Returns:
        One row per method (column ``method``), then the paper's row; the metric
        columns and ``MB / round``.

    Raises:
        ConfigError: ``level="client"`` or unknown, a method of ``order`` absent from
            the frame, or what :func:`seed_summary` raises.
    """
    if level not in ("mean", "pooled"):
        raise ConfigError(
            f"paper_table: level={level!r}; expected 'mean' or 'pooled' (one row per "
            "method). Use seed_summary(..., level='client') for per-vendor numbers"
        )
    metrics = _names(metrics)
    summary = seed_summary(frame, metrics, level=level, confidence=confidence)
    present = _ordered_methods(summary["method"].unique())
    if order is None:
        order = present
    else:
        order = _require_present(
            order,
            present,
            "paper_table: order names {absent}, which the frame does not hold "
            f"(methods present: {present})",
        )
    lookup = summary.set_index(["method", "metric"])
    mb = {str(k): float(v) for k, v in mb_per_round.items()}
    rows = []
    for method in order:
        row: dict[str, Any] = {"method": method}
        for m in metrics:
            s = lookup.loc[(method, m)]
            if formatted:
                row[m] = _fmt_cell(
                    s["mean"], s["half_width"], int(s["n_seeds"]), digits
                )
            else:
                row[m] = float(s["mean"])
                row[f"{m}_half_width"] = float(s["half_width"])
                row[f"{m}_n_seeds"] = int(s["n_seeds"])
        value = mb.get(method, math.nan)
        row["MB / round"] = _fmt_mb(value) if formatted else value
        rows.append(row)
    if include_paper:
        paper = PAPER_RESULTS.iloc[0]
        row = {"method": PAPER_LABEL}
        for m in metrics:
            v = float(paper[m]) if m in paper.index else math.nan
            if formatted:
                row[m] = "—" if math.isnan(v) else f"{v:.{digits}f}"
            else:
                row[m] = v
                row[f"{m}_half_width"] = math.nan
                row[f"{m}_n_seeds"] = 0
        row["MB / round"] = "—" if formatted else math.nan
        rows.append(row)
    return pd.DataFrame(rows)
