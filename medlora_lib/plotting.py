"""Plots for the book: functions take tidy DataFrames / arrays and return ``(fig, ax)``.

One colour per method and one per vendor, fixed across every chapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

__all__ = [
    "VENDOR_COLORS",
    "METHOD_COLORS",
    "set_style",
    "plot_client_sizes",
    "plot_case_grid",
    "plot_intensity_distributions",
    "plot_distance_matrix",
    "plot_phenotypes",
    "plot_loss_curve",
    "plot_reconstructions",
    "plot_probe_results",
    "plot_round_curves",
    "plot_method_bars",
    "plot_method_curves",
    "plot_paired_differences",
    "plot_privacy_tradeoff",
    "plot_epsilon_curves",
]

VENDOR_COLORS: dict[str, str] = {
    "Siemens": "#1b9e77",
    "Philips": "#d95f02",
    "GE": "#7570b3",
    "Canon": "#e7298a",
}

METHOD_COLORS: dict[str, str] = {
    "local": "#7f7f7f",
    "centralized": "#000000",
    "fedavg_lora": "#1f77b4",
    "ffa_lora": "#17becf",
    "fedsa_lora": "#9467bd",
    "fedprox_lora": "#8c564b",
    "med_dual_lora": "#d62728",
    "med_dual_lora_global": "#ff9896",
}


def set_style() -> None:
    """The book's plot style (readable at page width, colour-blind-safe palettes)."""
    sns.set_theme(context="notebook", style="whitegrid")
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 110, "axes.titlesize": 11})


def plot_client_sizes(manifest: pd.DataFrame, ax: Any = None) -> tuple[Any, Any]:
    """Stacked bars of healthy / diseased subjects per vendor, prevalence annotated."""
    counts = (
        manifest.groupby(["vendor", "label"])
        .size()
        .unstack(fill_value=0)
        .reindex(columns=[0, 1], fill_value=0)
    )
    order = [v for v in VENDOR_COLORS if v in counts.index]
    counts = counts.loc[order]
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 3.4))
    ax.bar(order, counts[0], color="#9ecae1", label="healthy (NOR)")
    ax.bar(order, counts[1], bottom=counts[0], color="#de2d26", label="disease")
    for i, v in enumerate(order):
        total = counts.loc[v].sum()
        ax.text(
            i,
            total,
            f"{counts.loc[v, 0] / total:.0%} healthy",
            ha="center",
            va="bottom",
            fontsize=9,
        )
    ax.set_ylabel("subjects")
    ax.set_xlabel("client (scanner vendor)")
    ax.legend(frameon=False)
    return fig, ax


def plot_case_grid(
    images: Sequence[np.ndarray],
    titles: Sequence[str],
    ncols: int,
    slice_index: int | None = None,
    row_labels: Sequence[str] | None = None,
) -> tuple[Any, Any]:
    """A grid of mid-ventricular slices; each image is (H, W, D) already in [0, 1]."""
    nrows = int(np.ceil(len(images) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.7 * ncols, 1.8 * nrows))
    axes = np.atleast_2d(axes)
    for k, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if k >= len(images):
            ax.axis("off")
            continue
        img = images[k]
        z = img.shape[-1] // 2 if slice_index is None else slice_index
        ax.imshow(img[..., z].T, cmap="gray", vmin=0, vmax=1, origin="lower")
        ax.set_title(titles[k], fontsize=8)
    if row_labels is not None:
        for r, lab in enumerate(row_labels):
            axes[r, 0].set_ylabel(lab, fontsize=9)
    fig.tight_layout()
    return fig, axes


def plot_intensity_distributions(df: pd.DataFrame, ax: Any = None) -> tuple[Any, Any]:
    """Densities of voxel intensities per vendor (``df``: columns vendor, intensity)."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 3.4))
    for vendor, group in df.groupby("vendor", sort=False):
        sns.kdeplot(
            group["intensity"],
            ax=ax,
            label=vendor,
            bw_adjust=0.6,
            color=VENDOR_COLORS.get(vendor),
            clip=(0, 1),
        )
    ax.set_xlabel("preprocessed intensity (a.u., [0, 1])")
    ax.set_ylabel("density")
    ax.legend(frameon=False)
    return fig, ax


def plot_distance_matrix(
    matrix: pd.DataFrame, title: str, ax: Any = None, fmt: str = ".3f"
) -> tuple[Any, Any]:
    """Heatmap of a vendor × vendor matrix (distances, or train × test scores)."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(4.2, 3.6))
    sns.heatmap(
        matrix, annot=True, fmt=fmt, cmap="viridis", ax=ax, cbar=False, square=True
    )
    ax.set_title(title)
    return fig, ax


def plot_phenotypes(
    df: pd.DataFrame, x: str, y: str, ax: Any = None
) -> tuple[Any, Any]:
    """Scatter of two phenotype measurements coloured by pathology."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5.5, 4))
    sns.scatterplot(
        data=df, x=x, y=y, hue="pathology", style="label", ax=ax, s=22, alpha=0.8
    )
    ax.legend(fontsize=8, frameon=False, bbox_to_anchor=(1.02, 1), loc="upper left")
    return fig, ax


def plot_loss_curve(
    steps: Sequence[int],
    losses: Sequence[float],
    ax: Any = None,
    label: str | None = None,
) -> tuple[Any, Any]:
    """Training loss against optimisation step."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5.5, 3.2))
    ax.plot(steps, losses, lw=1.2, label=label)
    ax.set_xlabel("optimisation step")
    ax.set_ylabel("MSE on masked patches")
    ax.set_yscale("log")
    return fig, ax


def plot_reconstructions(
    originals: Sequence[np.ndarray],
    masked: Sequence[np.ndarray],
    recons: Sequence[np.ndarray],
    titles: Sequence[str],
) -> tuple[Any, Any]:
    """Rows of (input, visible patches, reconstruction) mid slices, each (H, W, D)."""
    n = len(originals)
    fig, axes = plt.subplots(n, 3, figsize=(5.4, 1.9 * n))
    axes = np.atleast_2d(axes)
    for i in range(n):
        for j, (img, name) in enumerate(
            [
                (originals[i], "input"),
                (masked[i], "visible (25 %)"),
                (recons[i], "reconstruction"),
            ]
        ):
            ax = axes[i, j]
            z = img.shape[-1] // 2
            ax.imshow(img[..., z].T, cmap="gray", vmin=0, vmax=1, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
        axes[i, 0].set_ylabel(titles[i], fontsize=8)
    fig.tight_layout()
    return fig, axes


def plot_probe_results(df: pd.DataFrame, ax: Any = None) -> tuple[Any, Any]:
    """Grouped bars: probe score per task × probe, pretrained vs random init.

    ``df`` columns: task, probe, weights, score, (optional) ci_low, ci_high.
    """
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6.5, 3.4))
    df = df.copy()
    df["probe on task"] = df["task"] + "\n" + df["probe"]
    sns.barplot(
        data=df,
        x="probe on task",
        y="score",
        hue="weights",
        ax=ax,
        palette={"pretrained (MAE)": "#d62728", "random init": "#7f7f7f"},
    )
    ax.set_ylim(0, 1)
    ax.set_ylabel("balanced accuracy (test)")
    ax.set_xlabel("")
    ax.legend(frameon=False, loc="lower right")
    return fig, ax


def plot_round_curves(
    rounds: pd.DataFrame,
    metric: str = "val_balanced_accuracy",
    ax: Any = None,
    selected: dict[str, int] | None = None,
) -> tuple[Any, Any]:
    """One line per client (vendor colours): ``metric`` against the round.

    ``rounds`` is ``RunResult.rounds`` (columns ``round``, ``client`` and ``metric``);
    ``selected`` (client → round) marks each client's validation-selected round.
    Chapter ``notebooks/02_single_site_baseline``.
    """
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5.5, 3.4))
    for client, g in rounds.groupby("client", sort=False):
        g = g.sort_values("round")
        color = VENDOR_COLORS.get(str(client))
        ax.plot(g["round"], g[metric], marker=".", lw=1.2, color=color, label=client)
        if selected and client in selected:
            r = g[g["round"] == selected[client]]
            ax.plot(r["round"], r[metric], marker="*", ms=12, color=color, lw=0)
    ax.set_xlabel("round (× local epochs)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.legend(frameon=False, fontsize=8)
    return fig, ax


def plot_method_bars(
    df: pd.DataFrame,
    metric: str = "balanced_accuracy",
    ax: Any = None,
    group: str = "client",
) -> tuple[Any, Any]:
    """Grouped bars: ``metric`` per ``group`` (e.g. vendor), one colour per method.

    ``df`` columns: ``method``, ``group``, ``metric`` and optionally ``ci_low`` /
    ``ci_high`` (drawn as error bars). Chapter ``notebooks/02_single_site_baseline``.
    """
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6.5, 3.4))
    groups = list(dict.fromkeys(df[group]))
    methods = list(dict.fromkeys(df["method"]))
    width = 0.8 / max(len(methods), 1)
    x = np.arange(len(groups))
    for j, method in enumerate(methods):
        sub = df[df["method"] == method].set_index(group).reindex(groups)
        pos = x + (j - (len(methods) - 1) / 2) * width
        yerr = None
        if {"ci_low", "ci_high"} <= set(sub.columns):
            yerr = np.vstack(
                [sub[metric] - sub["ci_low"], sub["ci_high"] - sub[metric]]
            ).clip(min=0)
        ax.bar(
            pos,
            sub[metric],
            width,
            color=METHOD_COLORS.get(str(method), "#bbbbbb"),
            label=method,
        )
        if yerr is not None:
            # a white halo under a black bar keeps the interval visible on any colour
            for color, lw in (("white", 3.0), ("#333333", 1.2)):
                ax.errorbar(
                    pos,
                    sub[metric],
                    yerr=yerr,
                    fmt="none",
                    ecolor=color,
                    elinewidth=lw,
                    capsize=3,
                    capthick=lw,
                )
    ax.set_xticks(x, groups)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"{metric.replace('_', ' ')} (test)")
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig, ax


def plot_method_curves(
    rounds: pd.DataFrame,
    metric: str = "val_balanced_accuracy",
    ax: Any = None,
    methods: Sequence[str] | None = None,
) -> tuple[Any, Any]:
    """Per method: ``metric`` per round, mean over clients, then mean ± sd over seeds.

    ``rounds`` is the concatenation of several runs' ``RunResult.rounds`` (columns
    ``method``, ``seed``, ``round``, ``client`` and ``metric``). The band is ± one
    standard deviation over seeds (training variability). Chapter
    ``notebooks/03_fedavg_lora``.
    """
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6.0, 3.6))
    per_seed = (
        rounds.groupby(["method", "seed", "round"], sort=False)[metric]
        .mean()
        .reset_index()
    )
    order = list(methods) if methods is not None else list(dict.fromkeys(rounds.method))
    for method in order:
        g = per_seed[per_seed["method"] == method]
        if g.empty:
            continue
        s = g.groupby("round")[metric].agg(["mean", "std"]).sort_index()
        color = METHOD_COLORS.get(str(method), "#bbbbbb")
        ax.plot(s.index, s["mean"], color=color, lw=1.6, label=method)
        ax.fill_between(
            s.index,
            s["mean"] - s["std"].fillna(0),
            s["mean"] + s["std"].fillna(0),
            color=color,
            alpha=0.15,
            lw=0,
        )
    ax.set_xlabel("round (× local epochs)")
    ax.set_ylabel(metric.replace("_", " ") + " (mean over clients)")
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig, ax


def plot_paired_differences(
    table: pd.DataFrame, ax: Any = None, label: str | None = None
) -> tuple[Any, Any]:
    """Forest plot of paired differences (reference − baseline) with their intervals.

    ``table`` is :func:`medlora_lib.stats.paired_comparison`'s output (columns
    ``baseline``, ``mean_diff``, ``ci_low``, ``ci_high``, ``verdict``). A filled marker
    is a difference that survives the multiple-comparison correction. Chapter
    ``notebooks/04_med_dual_lora``.
    """
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5.5, 3.2))
    y = np.arange(len(table))[::-1]
    for yi, (_, row) in zip(y, table.iterrows(), strict=True):
        color = METHOD_COLORS.get(str(row["baseline"]), "#444444")
        significant = row["verdict"] != "no significant difference"
        ax.errorbar(
            row["mean_diff"],
            yi,
            xerr=[
                [row["mean_diff"] - row["ci_low"]],
                [row["ci_high"] - row["mean_diff"]],
            ],
            fmt="o",
            color=color,
            mfc=color if significant else "white",
            capsize=3,
        )
    ax.axvline(0, color="grey", lw=1, ls="--")
    ax.set_yticks(y, [f"vs {b}" for b in table["baseline"]])
    ref = str(table["reference"].iloc[0]) if "reference" in table and len(table) else ""
    metric = str(table["metric"].iloc[0]) if "metric" in table and len(table) else ""
    ax.set_xlabel(label or f"{ref} − baseline, {metric.replace('_', ' ')}")
    return fig, ax


def plot_privacy_tradeoff(table: pd.DataFrame, ax: Any = None) -> tuple[Any, Any]:
    """Balanced accuracy against the ε spent (log scale), one colour per method, one
    marker per kind of DP (``o`` DP-SGD, ``s`` site-level); each method without DP is
    a dashed line with its interval shaded. Chapter ``notebooks/08_privacy``.

    ``table``: :func:`medlora_lib.privacy.report.privacy_table`.
    """
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6.5, 3.8))
    markers = {"dp_sgd": ("o", "DP-SGD"), "site_dp": ("s", "site DP")}
    for method, g in table.groupby("method", sort=False):
        color = METHOD_COLORS.get(str(method), "#555555")
        base = g[g["kind"] == "none"]
        if len(base):
            b = base.iloc[0]
            ax.axhline(b["balanced_accuracy"], color=color, ls="--", lw=1)
            if np.isfinite(b["ba_half_width"]):
                ax.axhspan(
                    b["balanced_accuracy"] - b["ba_half_width"],
                    b["balanced_accuracy"] + b["ba_half_width"],
                    color=color,
                    alpha=0.08,
                )
        for kind, (marker, name) in markers.items():
            k = g[g["kind"] == kind].sort_values("epsilon")
            if k.empty:
                continue
            ax.errorbar(
                k["epsilon"],
                k["balanced_accuracy"],
                yerr=k["ba_half_width"].fillna(0.0),
                color=color,
                marker=marker,
                ls="-" if kind == "dp_sgd" else ":",
                capsize=3,
                label=f"{method}, {name}",
            )
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("ε spent over the run (log scale; δ = 1e-5)")
    ax.set_ylabel("balanced accuracy (test)\nmean over vendors, seeds")
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig, ax


def plot_epsilon_curves(curves: pd.DataFrame, ax: Any = None) -> tuple[Any, Any]:
    """ε spent after each round, one line per privacy setting (mean over seeds and
    methods; DP-SGD solid, site-level dotted). Chapter ``notebooks/08_privacy``.

    ``curves``: :func:`medlora_lib.privacy.report.epsilon_curves`.
    """
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6.5, 3.4))
    palette = sns.color_palette(
        "colorblind", n_colors=max(1, curves["setting"].nunique())
    )
    for color, (setting, g) in zip(
        palette, curves.groupby("setting", sort=False), strict=False
    ):
        m = g.groupby("round")["epsilon"].mean()
        ls = "-" if (g["kind"] == "dp_sgd").all() else ":"
        ax.plot(m.index, m.values, ls=ls, marker=".", color=color, label=setting)
    ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel("ε spent so far (δ = 1e-5)")
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig, ax
