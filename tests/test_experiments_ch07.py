"""Chapter 07's experiments as library calls (``medlora_lib.experiments``): the sweep of
the two shifts, its refusal of real data, and the four ways to serve a late site."""

from __future__ import annotations

import pytest

from medlora_lib import experiments as ex
from medlora_lib.errors import ConfigError

SMOKE = {
    "model.pretrained": "none",
    "fed.num_rounds": 1,
    "train.num_threads": 1,
}


def test_sweep_configs_move_one_knob_and_reuse_the_main_comparison(monkeypatch):
    monkeypatch.delenv("MEDLORA_DATA_DIR", raising=False)
    planned = ex.shift_sweep_configs("smoke", seeds=[0, 1], overrides=SMOKE)
    assert len(planned) == len(ex.SHIFT_SETTINGS) * 2 * len(ex.SHIFT_METHODS)
    by = {}
    for label, cfg in planned:
        by.setdefault(label, []).append(cfg)
    main = ex.comparison_configs("smoke", ex.SHIFT_METHODS, [0, 1], SMOKE)
    assert by["both shifts"] == main  # same configs, so the same cache entries
    for cfg in by["label shift only"]:
        assert (cfg.data.appearance_shift, cfg.data.label_shift) == (0.0, 1.0)
    for cfg in by["appearance shift only"]:
        assert (cfg.data.appearance_shift, cfg.data.label_shift) == (1.0, 0.0)
    with pytest.raises(ConfigError, match="data.label_shift"):
        ex.shift_sweep_configs("smoke", [0], settings=[("bad", 1.0, 1.5)])


def test_sweep_refuses_real_data_naming_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDLORA_DATA_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="MEDLORA_DATA_DIR") as err:
        ex.run_shift_sweep("smoke", [0], overrides=SMOKE)
    assert str(tmp_path) in str(err.value) and "run_sweep=False" in str(err.value)
    assert (
        ex.run_shift_sweep("smoke", [0], overrides=SMOKE, on_real_data="skip") is None
    )
    monkeypatch.delenv("MEDLORA_DATA_DIR")
    with pytest.raises(ConfigError, match="same runs"):
        ex.shift_sweep_configs("smoke", [0], overrides={"data.data_dir": str(tmp_path)})
    assert ex.real_data_dir(ex.comparison_configs("smoke", ["local"], [0])[0]) is None


@pytest.mark.slow
def test_sweep_and_joins_run_end_to_end(monkeypatch):
    monkeypatch.delenv("MEDLORA_DATA_DIR", raising=False)
    frame = ex.run_shift_sweep(
        "smoke",
        seeds=[0],
        methods=["local", "med_dual_lora"],
        overrides=SMOKE,
        runtime="inprocess",
    )
    assert set(frame["setting"]) == {s for s, _, _ in ex.SHIFT_SETTINGS}
    vendors = {"Siemens", "Philips", "GE", "Canon"}
    assert vendors <= set(frame["client"])
    frame = frame[frame["client"].isin(vendors)]
    assert len(frame) == 3 * 2 * 4
    levels = frame.groupby("setting")[["appearance_shift", "label_shift"]].first()
    assert tuple(levels.loc["label shift only"]) == (0.0, 1.0)
    # the label knob changes who is ill: the test sets differ in their healthy count
    n_healthy = frame.groupby("setting")["n_neg"].sum()
    assert n_healthy["appearance shift only"] != n_healthy["both shifts"]
    assert n_healthy["label shift only"] == n_healthy["both shifts"]

    joins = ex.run_new_site_joins(
        "smoke", newcomers=["Canon"], seeds=[0], overrides=SMOKE, runtime="inprocess"
    )
    assert list(joins["setting"]) == list(ex.JOIN_SETTINGS)
    assert (
        set(joins["vendor"]) == {"Canon"}
        and joins["balanced_accuracy"].between(0, 1).all()
    )
    # "alone" and "member" are the main comparison's Canon rows
    ref = ex.run_comparison("smoke", ["local", "med_dual_lora"], [0], SMOKE)
    alone = ref[0].selected().set_index("client").loc["Canon", "balanced_accuracy"]
    assert joins.set_index("setting").loc["alone (local)", "balanced_accuracy"] == alone
    diff = ex.join_differences(joins)
    assert list(diff.index) == ["join − alone", "join − zero-shot", "join − member"]
    assert (diff["count"] == 1).all() and (diff["wins"] + diff["losses"] <= 1).all()
    with pytest.raises(ConfigError, match="newcomer"):
        ex.run_new_site_joins("smoke", newcomers=[])
