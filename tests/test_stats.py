"""Seed summaries, paired comparisons and the paper table on hand-built results frames."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from medlora_lib.errors import ConfigError
from medlora_lib.stats import (
    PAPER_LABEL,
    PAPER_RESULTS,
    collect,
    paired_comparison,
    paper_table,
    seed_summary,
)
from medlora_lib.stats import _adjust as adjust_p

CLIENTS = ("siemens", "philips", "ge", "canon")


def results_frame(values: dict[str, np.ndarray], metric: str = "balanced_accuracy"):
    """A results frame: ``values[method]`` is (seeds × clients) of ``metric``.

    Adds the ``mean`` row (mean over clients) and a ``pooled`` row whose AUC is NaN,
    as ``build_result`` does; sensitivity, specificity and AUC are fixed offsets.
    """
    rows = []
    for method, grid in values.items():
        grid = np.asarray(grid, dtype=float)
        for s, per_client in enumerate(grid):
            for client, v in zip(CLIENTS, per_client, strict=False):
                rows.append(
                    {
                        "method": method,
                        "seed": s,
                        "client": client,
                        "variant": "deployed",
                        "at": "selected",
                        metric: v,
                        "sensitivity": v + 0.1,
                        "specificity": v - 0.1,
                        "auc": v + 0.05,
                    }
                )
            m = float(np.nanmean(per_client))
            base = {
                "method": method,
                "seed": s,
                "variant": "deployed",
                "at": "selected",
            }
            other = {"sensitivity": m + 0.1, "specificity": m - 0.1}
            rows.append({**base, "client": "mean", metric: m, **other, "auc": m + 0.05})
            rows.append(
                {**base, "client": "pooled", metric: m - 0.01, **other, "auc": math.nan}
            )
    return pd.DataFrame(rows)


def improvement_frame(seed: int = 0) -> pd.DataFrame:
    """5 seeds × 4 vendors = 20 units: med_dual_lora = fedavg_lora + 0.1 + small noise;
    ffa_lora identical to med_dual_lora; local = med_dual_lora + 0.1 (better)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.55, 0.7, size=(5, 4))
    ref = base + 0.1 + rng.normal(0, 0.01, size=(5, 4))
    return results_frame(
        {
            "med_dual_lora": ref,
            "fedavg_lora": base,
            "ffa_lora": ref.copy(),
            "local": ref + 0.1 + rng.normal(0, 0.01, size=(5, 4)),
        }
    )


# ------------------------------------------------------------------------------ seeds
def test_t_interval_matches_hand_computation():
    grid = np.array([[0.70, 0.70], [0.74, 0.74], [0.78, 0.78]])  # mean rows .70 .74 .78
    s = seed_summary(
        results_frame({"fedavg_lora": grid}), metrics=["balanced_accuracy"]
    )
    row = s.iloc[0]
    half = sps.t.ppf(0.975, 2) * 0.04 / math.sqrt(3)
    assert row["n_seeds"] == 3
    assert row["mean"] == pytest.approx(0.74)
    assert row["std"] == pytest.approx(0.04)
    assert row["half_width"] == pytest.approx(half)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((0.74 - half, 0.74 + half))
    s90 = seed_summary(
        results_frame({"fedavg_lora": grid}), ["balanced_accuracy"], confidence=0.9
    )
    assert s90["half_width"].iloc[0] == pytest.approx(
        sps.t.ppf(0.95, 2) * 0.04 / math.sqrt(3)
    )


def test_levels_pick_their_rows_and_drop_nan_per_metric():
    rng = np.random.default_rng(1)
    frame = results_frame({"fedavg_lora": rng.uniform(0.5, 0.9, size=(4, 4))})
    pooled = seed_summary(frame, ["balanced_accuracy", "auc"], level="pooled")
    pooled = pooled.set_index("metric")
    assert pooled.loc["auc", "n_seeds"] == 0 and math.isnan(pooled.loc["auc", "mean"])
    assert "no value" in pooled.loc["auc", "note"]
    expected = frame[frame["client"] == "pooled"]["balanced_accuracy"].mean()
    assert pooled.loc["balanced_accuracy", "mean"] == pytest.approx(expected)

    per_client = seed_summary(frame, ["balanced_accuracy"], level="client")
    assert sorted(per_client["client"]) == sorted(CLIENTS)
    ge = per_client.set_index("client").loc["ge"]
    vals = frame[frame["client"] == "ge"]["balanced_accuracy"]
    assert ge["n_seeds"] == 4 and ge["mean"] == pytest.approx(vals.mean())
    assert ge["std"] == pytest.approx(vals.std(ddof=1))

    # a NaN in one seed leaves 3 values for that metric only
    frame.loc[(frame["client"] == "mean") & (frame["seed"] == 0), "auc"] = np.nan
    s = seed_summary(frame, ["balanced_accuracy", "auc"]).set_index("metric")
    assert s.loc["auc", "n_seeds"] == 3 and s.loc["balanced_accuracy", "n_seeds"] == 4


def test_seed_summary_one_seed_gives_nan_interval_and_a_note():
    s = seed_summary(results_frame({"local": [[0.6, 0.8, 0.7, 0.9]]}))
    row = s.set_index("metric").loc["balanced_accuracy"]
    assert row["n_seeds"] == 1 and row["mean"] == pytest.approx(0.75)
    assert math.isnan(row["half_width"]) and math.isnan(row["ci_low"])
    assert "one seed" in row["note"]


def test_seed_summary_errors_name_the_problem():
    frame = improvement_frame()
    with pytest.raises(ConfigError, match="'dice'"):
        seed_summary(frame, ["dice"])
    with pytest.raises(ConfigError, match="level='vendor'"):
        seed_summary(frame, level="vendor")
    with pytest.raises(ConfigError, match=r"several rows .*collect"):
        seed_summary(pd.concat([frame, frame]))


# ------------------------------------------------------------------------------ paired
def test_clear_improvement_is_significant():
    t = paired_comparison(improvement_frame(), baselines=["fedavg_lora", "local"])
    t = t.set_index("baseline")
    fed = t.loc["fedavg_lora"]
    assert fed["n_pairs"] == 20 and fed["n_dropped"] == 0
    assert fed["mean_diff"] == pytest.approx(0.1, abs=0.01)
    assert fed["mean_diff"] == pytest.approx(
        fed["reference_mean"] - fed["baseline_mean"]
    )
    assert 0 < fed["ci_low"] < fed["mean_diff"] < fed["ci_high"]
    assert fed["p_adjusted"] < 0.05
    assert (fed["wins"], fed["ties"], fed["losses"]) == (20, 0, 0)
    assert fed["verdict"] == "reference better"
    loc = t.loc["local"]
    assert loc["ci_high"] < 0 and loc["verdict"] == "baseline better"
    assert loc["losses"] == 20


def test_identical_methods_are_not_different():
    t = paired_comparison(improvement_frame(), baselines=["ffa_lora"]).iloc[0]
    assert t["p_value"] == 1.0 and t["p_adjusted"] == 1.0
    assert t["verdict"] == "no significant difference"
    assert t["ci_low"] <= 0 <= t["ci_high"]
    assert t["mean_diff"] == 0 and t["ties"] == 20
    assert "zero-width" in t["note"]


def test_bca_interval_also_excludes_zero():
    t = paired_comparison(
        improvement_frame(), baselines=["fedavg_lora"], ci_method="BCa", n_boot=2000
    ).iloc[0]
    assert 0 < t["ci_low"] < t["mean_diff"] < t["ci_high"]


def test_row_order_of_the_input_does_not_matter():
    frame = improvement_frame()
    shuffled = frame.sample(frac=1.0, random_state=3).reset_index(drop=True)
    assert not shuffled.equals(frame)
    a = paired_comparison(frame)
    b = paired_comparison(shuffled)
    pd.testing.assert_frame_equal(a, b)
    assert list(a["baseline"]) == ["local", "fedavg_lora", "ffa_lora"]  # canonical
    pd.testing.assert_frame_equal(seed_summary(frame), seed_summary(shuffled))


def test_missing_units_raise_an_error_naming_them():
    frame = improvement_frame()
    gone = (frame["method"] == "fedavg_lora") & (frame["seed"] == 2)
    gone &= frame["client"] == "philips"
    with pytest.raises(ConfigError) as err:
        paired_comparison(frame[~gone], baselines=["fedavg_lora"])
    msg = str(err.value)
    assert "missing for 'fedavg_lora'" in msg and "(seed=2, client=philips)" in msg
    assert "dropna=True" in msg


def test_dropna_compares_common_units_and_counts_the_dropped():
    frame = improvement_frame()
    gone = (frame["method"] == "fedavg_lora") & (frame["seed"] == 2)
    gone &= frame["client"] == "philips"
    frame = frame[~gone].copy()
    nan_unit = (frame["method"] == "med_dual_lora") & (frame["seed"] == 4)
    nan_unit &= frame["client"] == "ge"
    frame.loc[nan_unit, "balanced_accuracy"] = np.nan
    t = paired_comparison(frame, baselines=["fedavg_lora"], dropna=True).iloc[0]
    assert t["n_pairs"] == 18 and t["n_dropped"] == 2 and t["n_unmatched"] == 1
    assert t["wins"] + t["ties"] + t["losses"] == 18
    ref = frame[(frame["method"] == "med_dual_lora") & ~frame["client"].isin(["mean"])]
    ref = ref[(ref["client"] != "pooled") & ref["balanced_accuracy"].notna()]
    ref = ref[~((ref["seed"] == 2) & (ref["client"] == "philips"))]
    assert t["reference_mean"] == pytest.approx(ref["balanced_accuracy"].mean())
    # a NaN alone is dropped pairwise without dropna
    frame2 = improvement_frame()
    frame2.loc[
        (frame2["client"] == "ge") & (frame2["seed"] == 0), "balanced_accuracy"
    ] = np.nan
    t2 = paired_comparison(frame2, baselines=["fedavg_lora"]).iloc[0]
    assert t2["n_pairs"] == 19 and t2["n_dropped"] == 1 and t2["n_unmatched"] == 0


def test_bh_correction_equals_scipy_and_hand_values():
    p = np.array([0.01, 0.04, 0.03, 0.2])
    hand = np.array([0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.2])
    np.testing.assert_allclose(adjust_p(p, "bh"), hand)
    np.testing.assert_allclose(adjust_p(p, "bh"), sps.false_discovery_control(p))
    # end to end: the table's adjusted p-values are scipy's BH of its raw ones
    rng = np.random.default_rng(7)
    base = rng.uniform(0.5, 0.8, size=(3, 4))
    frame = results_frame(
        {
            "med_dual_lora": base,
            "fedavg_lora": base - 0.02 + rng.normal(0, 0.03, size=(3, 4)),
            "ffa_lora": base - 0.01 + rng.normal(0, 0.03, size=(3, 4)),
            "fedsa_lora": base + rng.normal(0, 0.03, size=(3, 4)),
        }
    )
    t = paired_comparison(frame, n_boot=200)
    assert t["p_value"].nunique() == 3
    np.testing.assert_allclose(
        t["p_adjusted"], sps.false_discovery_control(t["p_value"].to_numpy())
    )
    assert (t["p_adjusted"] >= t["p_value"]).all()
    assert (t["correction"] == "bh").all()


def test_bonferroni_is_clipped_at_one_and_none_leaves_p():
    np.testing.assert_allclose(
        adjust_p(np.array([0.01, 0.5, 0.6]), "bonferroni"), [0.03, 1.0, 1.0]
    )
    frame = improvement_frame()
    bon = paired_comparison(frame, correction="bonferroni", n_boot=200)
    np.testing.assert_allclose(
        bon["p_adjusted"], np.minimum(bon["p_value"] * 3, 1.0), rtol=1e-12
    )
    assert bon.set_index("baseline").loc["ffa_lora", "p_adjusted"] == 1.0
    none = paired_comparison(frame, correction="none", n_boot=200)
    np.testing.assert_array_equal(none["p_adjusted"], none["p_value"])


def test_unknown_correction_or_method_is_an_error():
    frame = improvement_frame()
    with pytest.raises(ConfigError, match="correction='holm'"):
        paired_comparison(frame, correction="holm")
    with pytest.raises(ConfigError, match="reference='fedbn'"):
        paired_comparison(frame, reference="fedbn")
    with pytest.raises(ConfigError, match=r"baseline\(s\) \['fedbn'\]"):
        paired_comparison(frame, baselines=["fedbn"])
    with pytest.raises(ConfigError, match="'dice'"):
        paired_comparison(frame, metric="dice")


# ------------------------------------------------------------------------------ collect
class _Run:
    """Stands in for RunResult: ``selected`` filters ``final`` the same way."""

    def __init__(self, final: pd.DataFrame):
        self.final = final

    def selected(self, variant: str = "deployed") -> pd.DataFrame:
        f = self.final
        return f[(f["variant"] == variant) & (f["at"] == "selected")].reset_index(
            drop=True
        )


def test_collect_keeps_selected_rows_of_the_variant():
    a = results_frame({"med_dual_lora": [[0.7, 0.8, 0.6, 0.9]]})
    final = pd.concat(
        [a, a.assign(at="final"), a.assign(variant="global_only", auc=0.0)],
        ignore_index=True,
    )
    b = results_frame({"fedavg_lora": [[0.6, 0.7, 0.5, 0.8]]})
    out = collect([_Run(final), b])
    assert len(out) == len(a) + len(b)
    assert set(out["at"]) == {"selected"} and set(out["variant"]) == {"deployed"}
    g = collect([_Run(final), _Run(b)], variant="global_only")
    assert set(g["method"]) == {"med_dual_lora"} and (g["auc"] == 0.0).all()
    with pytest.raises(ConfigError, match="variant='global_only'"):
        collect([_Run(b)], variant="global_only")
    with pytest.raises(ConfigError, match="item 0 is a dict"):
        collect([{"method": "x"}])


# ------------------------------------------------------------------------------ table
def test_paper_table_rows_formatting_and_mb_column():
    grid = np.array([[0.70] * 4, [0.74] * 4, [0.78] * 4])
    frame = results_frame(
        {
            "med_dual_lora": grid + 0.05,
            "fedavg_lora": grid,
            "local": grid[:1],  # one seed: mean alone
        }
    )
    mb = {"fedavg_lora": 0.59, "med_dual_lora": 0.295, "local": 0.0}
    t = paper_table(frame, mb, metrics=["balanced_accuracy"])
    assert list(t.columns) == ["method", "balanced_accuracy", "MB / round"]
    assert list(t["method"]) == ["local", "fedavg_lora", "med_dual_lora", PAPER_LABEL]
    half = sps.t.ppf(0.975, 2) * 0.04 / math.sqrt(3)
    row = t.set_index("method")
    assert row.loc["fedavg_lora", "balanced_accuracy"] == f"0.740 ± {half:.3f}"
    assert row.loc["med_dual_lora", "balanced_accuracy"] == f"0.790 ± {half:.3f}"
    assert row.loc["local", "balanced_accuracy"] == "0.700"  # one seed: no ±
    assert list(row["MB / round"]) == ["0.00", "0.59", "0.29", "—"]
    pooled = paper_table(frame, mb, metrics=["balanced_accuracy"], level="pooled")
    assert pooled.set_index("method").loc["fedavg_lora", "balanced_accuracy"] == (
        f"0.730 ± {half:.3f}"
    )


def test_paper_table_paper_row_and_numeric_mode():
    rng = np.random.default_rng(2)
    frame = results_frame(
        {
            "med_dual_lora": rng.uniform(0.6, 0.8, size=(3, 4)),
            "fedavg_lora": rng.uniform(0.6, 0.8, size=(3, 4)),
        }
    )
    mb = {"fedavg_lora": 1.2345, "med_dual_lora": 0.6}
    t = paper_table(frame, mb)
    assert list(t.columns) == [
        "method",
        "balanced_accuracy",
        "sensitivity",
        "specificity",
        "auc",
        "MB / round",
    ]
    paper = t.iloc[-1]
    assert paper["method"] == PAPER_LABEL and "different data" in PAPER_LABEL
    assert paper["balanced_accuracy"] == "0.768" and paper["specificity"] == "0.612"
    assert paper["sensitivity"] == "—" and paper["auc"] == "—"
    assert paper["MB / round"] == "—"
    assert list(t["MB / round"][:2]) == ["1.23", "0.60"]
    assert "±" in t.iloc[0]["auc"]

    num = paper_table(frame, mb, formatted=False, order=["med_dual_lora"])
    assert list(num["method"]) == ["med_dual_lora", PAPER_LABEL]
    expected = frame[(frame["method"] == "med_dual_lora") & (frame["client"] == "mean")]
    assert num["balanced_accuracy"].iloc[0] == pytest.approx(
        expected["balanced_accuracy"].mean()
    )
    assert num["MB / round"].iloc[0] == 0.6 and math.isnan(num["MB / round"].iloc[1])
    assert num["specificity"].iloc[1] == pytest.approx(0.612)
    assert math.isnan(num["auc"].iloc[1])
    assert num["balanced_accuracy_n_seeds"].iloc[0] == 3

    no_paper = paper_table(frame, {}, include_paper=False)
    assert PAPER_LABEL not in set(no_paper["method"])
    assert (no_paper["MB / round"] == "—").all()
    with pytest.raises(ConfigError, match="fedbn"):
        paper_table(frame, mb, order=["fedbn"])
    with pytest.raises(ConfigError, match="level='client'"):
        paper_table(frame, mb, level="client")


def test_paper_results_constant():
    row = PAPER_RESULTS.set_index("method").loc["med_dual_lora"]
    assert row["balanced_accuracy"] == 0.768 and row["specificity"] == 0.612
    assert math.isnan(row["auc"]) and math.isnan(row["sensitivity"])
    assert "ACDC + M&Ms" in row["source"] and "arXiv 2603.10967" in row["source"]
    assert list(PAPER_RESULTS["method"]) == ["med_dual_lora"]


# ----------------------------------------------------------------- at the vendor level
def _two_methods(diff: np.ndarray, seed: int = 0) -> pd.DataFrame:
    """reference = baseline + ``diff`` (seeds × clients); baseline is noise."""
    rng = np.random.default_rng(seed)
    base = 0.6 + 0.02 * rng.standard_normal(diff.shape)
    return results_frame({"med_dual_lora": base + diff, "fedavg_lora": base})


def test_one_vendors_gain_is_not_the_federations():
    from medlora_lib.stats import vendor_level_comparison

    # one vendor gains 0.15 in every seed; the three others nothing (tiny noise)
    rng = np.random.default_rng(1)
    diff = 0.003 * rng.standard_normal((5, 4))
    diff[:, 0] += 0.15
    diff[:, 1:] += 0.004  # a hair above zero, so 20 of 20 pairs are "wins"
    frame = _two_methods(diff)
    per_unit = paired_comparison(frame, baselines=["fedavg_lora"])
    assert per_unit["p_value"].iloc[0] < 0.01  # 20 "independent" pairs: significant
    row = vendor_level_comparison(frame, baselines=["fedavg_lora"]).iloc[0]
    vendor_d = pd.DataFrame(diff).mean(axis=0).to_numpy()
    assert row["n_vendors"] == 4 and row["n_replicates"] == 5
    assert row["mean_diff"] == pytest.approx(vendor_d.mean())
    assert row["p_value"] == pytest.approx(sps.ttest_1samp(vendor_d, 0).pvalue)
    assert row["p_value"] > 0.05 and row["verdict"] == "no significant difference"
    assert row["ci_low"] <= row["mean_diff"] <= row["ci_high"]


def test_a_consistent_gain_at_every_vendor_is_significant():
    from medlora_lib.stats import vendor_level_comparison

    rng = np.random.default_rng(2)
    diff = 0.1 + 0.01 * rng.standard_normal((5, 4))
    row = vendor_level_comparison(_two_methods(diff)).iloc[0]
    assert row["verdict"] == "reference better" and row["vendors_better"] == 4
    assert 0.08 < row["ci_low"] < row["ci_high"] < 0.12


def test_hierarchical_bootstrap_resamples_vendors_then_replicates():
    from medlora_lib.stats import hierarchical_bootstrap

    groups = [np.array([1.0, 1.0, 1.0]), np.array([0.0, 0.0, 0.0])]
    low, high, means = hierarchical_bootstrap(groups, n_boot=4000, seed=0)
    # vendor draws only (replicates are constant): means are 0, 0.5 or 1
    assert set(np.unique(means)) == {0.0, 0.5, 1.0}
    assert np.mean(means == 0.5) == pytest.approx(0.5, abs=0.03)
    assert (low, high) == (0.0, 1.0)
    # one vendor: only the replicates vary; the interval is that vendor's bootstrap
    lo1, hi1, m1 = hierarchical_bootstrap([np.array([0.0, 1.0])], n_boot=4000, seed=0)
    assert set(np.unique(m1)) == {0.0, 0.5, 1.0} and (lo1, hi1) == (0.0, 1.0)
    again = hierarchical_bootstrap(groups, n_boot=4000, seed=0)[2]
    np.testing.assert_array_equal(means, again)


def test_vendor_differences_are_per_vendor_over_replicates():
    from medlora_lib.stats import vendor_differences

    diff = (
        np.tile([0.1, 0.0, -0.05, 0.02], (5, 1)) + np.linspace(-0.01, 0.01, 5)[:, None]
    )
    t = vendor_differences(_two_methods(diff)).set_index("client")
    assert list(t.index) == list(CLIENTS)
    np.testing.assert_allclose(t["mean_diff"], [0.1, 0.0, -0.05, 0.02], atol=1e-12)
    half = sps.t.ppf(0.975, 4) * np.std(diff[:, 0], ddof=1) / np.sqrt(5)
    assert t.loc["siemens", "ci_high"] - 0.1 == pytest.approx(half)
    assert t.loc["siemens", "wins"] == 5 and t.loc["ge", "losses"] == 5


def test_families_are_declared_once_and_corrected_within():
    from medlora_lib.stats import (
        compare_families,
        declare_families,
        vendor_level_comparison,
    )

    rng = np.random.default_rng(3)
    base = 0.6 + 0.02 * rng.standard_normal((5, 4))
    frame = results_frame(
        {
            "med_dual_lora": base + 0.05,
            "fedavg_lora": base + 0.01 * rng.standard_normal((5, 4)),
            "local": base - 0.02 + 0.03 * rng.standard_normal((5, 4)),
            "med_dual_lora_global": base + 0.03 * rng.standard_normal((5, 4)),
        }
    )
    fams = declare_families(
        "med_dual_lora", ["local", "fedavg_lora"], global_only="med_dual_lora_global"
    )
    assert [(c.family, c.baseline, c.metric) for c in fams] == [
        ("primary", "local", "balanced_accuracy"),
        ("primary", "fedavg_lora", "balanced_accuracy"),
        ("secondary", "local", "specificity"),
        ("secondary", "fedavg_lora", "specificity"),
        ("secondary", "med_dual_lora_global", "balanced_accuracy"),
    ]
    t = compare_families(frame, fams)
    prim = t[t["family"] == "primary"]
    direct = vendor_level_comparison(frame, baselines=["local", "fedavg_lora"])
    np.testing.assert_allclose(prim["p_adjusted"], direct["p_adjusted"])
    sec = t[t["family"] == "secondary"]
    np.testing.assert_allclose(
        sec["p_adjusted"], adjust_p(sec["p_value"].to_numpy(), "bh")
    )
    with pytest.raises(ConfigError, match="no comparison declared"):
        compare_families(frame, [])


def test_verdict_sentences_follow_the_rows():
    from medlora_lib.stats import reading, verdict_sentence

    def table(*verdicts):
        return pd.DataFrame(
            {"baseline": [f"b{i}" for i in range(len(verdicts))], "verdict": verdicts}
        )

    assert "better than every baseline" in verdict_sentence(
        table("reference better", "reference better")
    )
    s = verdict_sentence(table("baseline better", "reference better"))
    assert "does **not** win" in s and "worse than b0" in s and "better than b1" in s
    assert "not significantly different" in verdict_sentence(
        table("no significant difference")
    )
    row = {"verdict": "no significant difference", "ci_low": 0.01, "ci_high": 0.1}
    assert reading(row, "X").startswith("probably better than X")


def test_capacity_controls_match_the_trainable_counts():
    from medlora_lib.comm import closed_form_bytes
    from medlora_lib.experiments import capacity_control_configs, comparison_configs
    from medlora_lib.stats import declare_families

    ctl = capacity_control_configs(
        "smoke", seeds=[0, 1], overrides={"fed.num_rounds": 2}
    )
    assert [c.seed for c in ctl["fedavg_lora_2r"]] == [0, 1]
    fed, dual = comparison_configs(
        "smoke", ["fedavg_lora", "med_dual_lora"], [0], {"fed.num_rounds": 2}
    )
    r = fed.adapter.lora_rank
    wide, half = ctl["fedavg_lora_2r"][0], ctl["med_dual_lora_half"][0]
    assert wide.adapter.lora_rank == 2 * r and wide.fed.num_rounds == 2
    assert (half.adapter.lora_rank, half.adapter.local_lora_rank) == (r // 2, r // 2)
    count = {
        k: closed_form_bytes(c)["trainable_params"]
        for k, c in (("fed", fed), ("dual", dual), ("wide", wide), ("half", half))
    }
    assert count["wide"] == count["dual"] and count["half"] == count["fed"]
    fams = declare_families(
        "med_dual_lora",
        [],
        secondary_metrics=(),
        controls=[("med_dual_lora", "fedavg_lora_2r")],
    )
    assert [(c.family, c.baseline) for c in fams] == [("capacity", "fedavg_lora_2r")]
    with pytest.raises(ConfigError, match="even adapter.lora_rank"):
        capacity_control_configs("smoke", [0], {"adapter.lora_rank": 3})
