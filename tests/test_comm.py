"""Traffic and "bytes to reach" of chapter 06, on hand-made run tables."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from medlora_lib.comm import bytes_to_reach, cumulative_traffic


def _run(method: str, seed: int, val: list[float], test: list[float], up: int = 100):
    rows = []
    for rnd, (v, t) in enumerate(zip(val, test, strict=True), start=1):
        for site, dv in (("A", 0.05), ("B", -0.05)):
            rows.append(
                {
                    "round": rnd,
                    "client": site,
                    "bytes_up": up,
                    "bytes_down": up,
                    "bytes_down_eval": up if rnd == len(val) else np.nan,
                    "val_balanced_accuracy": v + dv,
                    "test_balanced_accuracy": t + dv,
                }
            )
    return SimpleNamespace(
        method=method, config=SimpleNamespace(seed=seed), rounds=pd.DataFrame(rows)
    )


def test_cumulative_traffic_counts_every_site_and_the_final_download():
    t = cumulative_traffic([_run("m", 0, [0.5, 0.6, 0.7], [0.5, 0.6, 0.7])])
    assert list(t["total"]) == [400, 400, 600]  # 2 sites x (up + down), + 2 final
    assert np.allclose(t["cumulative_MB"], [4e-4, 8e-4, 1.4e-3])


def test_bytes_to_reach_reads_the_validation_curve_averaged_over_seeds():
    runs = [
        _run("fast", 0, [0.6, 0.7, 0.8], [0.9, 0.9, 0.9]),
        _run("fast", 1, [0.6, 0.8, 0.8], [0.9, 0.9, 0.9]),
        _run("slow", 0, [0.5, 0.55, 0.6], [0.95, 0.95, 0.95], up=50),
    ]
    curves, reach = bytes_to_reach(runs, 0.75)
    assert curves[curves["method"] == "fast"]["value"].round(6).tolist() == [
        0.6,
        0.75,
        0.8,
    ]
    assert reach.loc["fast", "first round >= 0.75"] == 2
    assert reach.loc["fast", "MB to get there"] == pytest.approx(8e-4)
    # the test curve would say "slow" is there from round 1: it is not read
    assert pd.isna(reach.loc["slow", "first round >= 0.75"])
    assert np.isnan(reach.loc["slow", "MB to get there"])
    _, on_test = bytes_to_reach(runs, 0.75, metric="test_balanced_accuracy")
    assert on_test.loc["slow", "first round >= 0.75"] == 1


def test_model_payload_table_matches_real_peft_models_and_the_full_model():
    import dataclasses

    import torch

    from medlora_lib.adapters import AdapterConfig, apply_adapters, get_shared_state
    from medlora_lib.comm import BASE_VARIANTS, model_payload_table
    from medlora_lib.models import build_convvit

    size, image = "small", (32, 32, 8)
    base = AdapterConfig(method="fedavg_lora", lora_rank=4, lora_alpha=8.0)
    table = model_payload_table(base, size, image)
    assert len(table) == len(BASE_VARIANTS) * 4 + 1
    full = sum(p.numel() for p in build_convvit(size, image_size=image).parameters())
    last = table.iloc[-1]
    assert last["method"] == "full-model FedAvg" and last["shared params"] == full
    assert last["MB / transfer (fp32)"] == pytest.approx(full * 4 / 1e6)
    # every adapter row is what a real peft model of that variant would send
    for label, change in BASE_VARIANTS[:2]:
        for method in ("fedavg_lora", "ffa_lora", "med_dual_lora"):
            acfg = dataclasses.replace(base, method=method, **change)
            torch.manual_seed(0)
            model = apply_adapters(build_convvit(size, image_size=image), acfg)
            real = sum(t.numel() for t in get_shared_state(model).values())
            row = table[(table["adapters"] == label) & (table["method"] == method)]
            assert int(row["shared params"].iloc[0]) == real, (label, method)
