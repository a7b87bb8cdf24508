"""Chapter 08's tables and verdicts from a frame with known numbers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pandas as pd
import pytest

from medlora_lib.experiments import PRIVACY_SETTINGS, privacy_configs
from medlora_lib.privacy.report import (
    local_adapter_under_dp,
    privacy_table,
    privacy_verdict,
)


def _frame():
    rows = []
    settings = [("no DP", "none", math.inf, 0.0), ("DP-SGD z=1", "dp_sgd", 4.0, -0.02)]
    settings += [("site DP z=1", "site_dp", 9.0, -0.20)]
    for label, kind, eps, drop in settings:
        for seed in (0, 1, 2):
            ba = 0.75 + 0.01 * seed + drop
            for client in ("A", "B", "mean"):
                rows.append(
                    {
                        "method": "fedavg_lora",
                        "seed": seed,
                        "client": client,
                        "balanced_accuracy": ba,
                        "specificity": 0.6,
                        "setting": label,
                        "kind": kind,
                        "epsilon": eps,
                        "seconds_per_round": 1.0,
                        "MB": 2.0,
                    }
                )
    return pd.DataFrame(rows)


def test_privacy_table_pairs_each_setting_with_its_no_dp_seed():
    t = privacy_table(_frame()).set_index("setting")
    assert t.loc["no DP", "balanced_accuracy"] == pytest.approx(0.76)
    assert t.loc["DP-SGD z=1", "ba_change"] == pytest.approx(-0.02)
    assert t.loc["DP-SGD z=1", "ba_change_half_width"] == pytest.approx(0.0, abs=1e-12)
    assert t.loc["site DP z=1", "ba_change"] == pytest.approx(-0.20)
    assert t.loc["site DP z=1", "epsilon"] == 9.0
    # the interval over seeds of 0.75, 0.76, 0.77: t_{0.975,2} * 0.01 / sqrt(3)
    assert t.loc["no DP", "ba_half_width"] == pytest.approx(
        4.302652729 * 0.01 / math.sqrt(3), rel=1e-6
    )
    assert (t["n_seeds"] == 3).all()


def test_verdict_calls_a_large_drop_too_costly():
    text = privacy_verdict(privacy_table(_frame()), tolerance=0.05)
    assert "DP-SGD (each patient): ε=4: BA 0.740 (-0.020; affordable)" in text
    assert "site-level DP (each site): ε=9: BA 0.560 (-0.200; too costly)" in text


def test_local_adapter_under_dp_reads_both_variants():
    def result(seed, dep, glo):
        final = pd.DataFrame(
            [
                {
                    "method": "med_dual_lora",
                    "seed": seed,
                    "client": "mean",
                    "variant": v,
                    "at": "selected",
                    "balanced_accuracy": b,
                }
                for v, b in (("deployed", dep), ("global_only", glo))
            ]
        )
        return SimpleNamespace(
            method="med_dual_lora",
            config=SimpleNamespace(seed=seed),
            selected=lambda variant="deployed", f=final: f[
                (f["variant"] == variant) & (f["at"] == "selected")
            ],
        )

    rs = [result(s, 0.7 + 0.01 * s, 0.6) for s in range(3)]
    t = local_adapter_under_dp([("site DP", "site_dp", r) for r in rs])
    assert t.iloc[0]["local_adapter_adds"] == pytest.approx(0.11)
    assert t.iloc[0]["deployed"] == pytest.approx(0.71)


def test_privacy_configs_cover_settings_methods_and_seeds():
    planned = privacy_configs("smoke", seeds=(0, 1))
    assert len(planned) == len(PRIVACY_SETTINGS) * 2 * 2
    none = [c for label, kind, c in planned if kind == "none"]
    assert all(not c.privacy.active for c in none)
    sgd = [c for label, kind, c in planned if kind == "dp_sgd"]
    assert all(c.privacy.dp_sgd and c.privacy.site_dp == "off" for c in sgd)
    site = [c for label, kind, c in planned if kind == "site_dp"]
    assert all(c.privacy.site_dp == "server_adaptive" for c in site)


def test_the_tradeoff_plot_draws_each_kind_at_its_epsilon():
    import matplotlib

    matplotlib.use("Agg")
    from medlora_lib.plotting import plot_privacy_tradeoff

    fig, ax = plot_privacy_tradeoff(privacy_table(_frame()))
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["fedavg_lora, DP-SGD", "fedavg_lora, site DP"]
    xs = sorted(float(x) for line in ax.get_lines() for x in line.get_xdata()[:1])
    assert 4.0 in xs and 9.0 in xs
    assert ax.get_xscale() == "log"


def test_local_adapter_sentence_says_when_an_interval_holds_zero():
    from medlora_lib.privacy.report import local_adapter_sentence

    local = pd.DataFrame(
        [
            {
                "setting": "no DP",
                "local_adapter_adds": 0.0,
                "half_width": 0.1,
                "deployed": 0.7,
                "global_only": 0.7,
            },
            {
                "setting": "site DP z=1",
                "local_adapter_adds": 0.188,
                "half_width": 0.1,
                "deployed": 0.698,
                "global_only": 0.510,
            },
            {
                "setting": "DP-SGD z=1",
                "local_adapter_adds": 0.01,
                "half_width": 0.05,
                "deployed": 0.53,
                "global_only": 0.52,
            },
        ]
    )
    text = local_adapter_sentence(local)
    assert "no DP" not in text
    assert "site DP z=1: +0.188 (± 0.100) — deployed 0.698" in text
    assert "DP-SGD z=1: +0.010 (± 0.050), not distinguishable from 0" in text
