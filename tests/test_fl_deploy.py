"""The same apps on Flower's Deployment Runtime (SuperLink + 2 SuperNodes on loopback).

Checks that one round gives exactly the simulation's result for the same seed.
"""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from medlora_lib.config import get_config
from medlora_lib.fl import simulate
from medlora_lib.fl.deploy import deploy, write_app_dir
from medlora_lib.pipeline import resolve_data_dir


@pytest.fixture(scope="module")
def two_vendor_data(tmp_path_factory):
    src = resolve_data_dir(get_config("smoke"), verbose=False)
    dst = tmp_path_factory.mktemp("two") / "data"
    shutil.copytree(src, dst)
    m = pd.read_csv(dst / "manifest.csv", dtype=str, keep_default_na=False)
    m[m.vendor.isin(["Siemens", "Philips"])].to_csv(dst / "manifest.csv", index=False)
    return dst


def test_generated_app_dir_leaves_project_pyproject_alone(tmp_path):
    from pathlib import Path

    project = Path(__file__).resolve().parent.parent / "pyproject.toml"
    before = project.read_text()
    app = write_app_dir(tmp_path / "app", tmp_path / "s.json", tmp_path / "o.json")
    text = (app / "pyproject.toml").read_text()
    assert "[tool.flwr.app.components]" in text and str(tmp_path / "s.json") in text
    assert "tool.flwr" not in before and project.read_text() == before


@pytest.mark.slow
def test_deployment_equals_simulation(two_vendor_data, tmp_path):
    cfg = get_config(
        "smoke",
        overrides=[
            'model.pretrained="none"',
            "fed.num_rounds=1",
            "train.num_threads=1",
            f'data.data_dir="{two_vendor_data}"',
        ],
        method="med_dual_lora",
        seed=3,
    )
    dep = deploy(cfg, work_dir=tmp_path / "work", timeout=420, verbose=False)
    sim = simulate(cfg, verbose=False)
    assert dep.provenance["runtime"] == "flower-deployment"
    assert list(dep.rounds["client"]) == ["Siemens", "Philips"]
    assert dep.failures == []
    np.testing.assert_allclose(
        dep.rounds["train_loss"], sim.rounds["train_loss"], rtol=1e-6
    )
    cols = [
        c for c in sim.rounds.columns if c.startswith(("val_", "test_", "global_only_"))
    ]
    pd.testing.assert_frame_equal(dep.rounds[cols], sim.rounds[cols])
    pd.testing.assert_frame_equal(dep.final, sim.final)
    assert (dep.rounds["bytes_up"] == sim.rounds["bytes_up"]).all()


@pytest.mark.slow
def test_medlora_deploy_cli_end_to_end(two_vendor_data, tmp_path, capsys):
    """``medlora deploy`` (the command a user types): 2 SuperNodes, 2 rounds, results
    written, and the metrics equal to the plain in-process loop for the same seed (the
    second round exercises evaluation inside the next train message)."""
    from medlora_lib.cli import main
    from medlora_lib.fl.simulate import RunResult, prepare_specs, run_inprocess

    out = tmp_path / "out"
    args = [
        "deploy",
        "--method",
        "fedavg_lora",
        "--profile",
        "smoke",
        "--data",
        str(two_vendor_data),
        "--out",
        str(out),
        "--seed",
        "5",
        "--timeout",
        "420",
        "--quiet",
        "--set",
        'model.pretrained="none"',
        "fed.num_rounds=2",
        "train.num_threads=1",
    ]
    assert main(args) in (0, None)
    printed = capsys.readouterr().out
    assert "wrote" in printed and "results.json" in printed
    dep = RunResult.load(out)
    assert dep.provenance["runtime"] == "flower-deployment"
    assert sorted(dep.rounds["round"].unique()) == [1, 2]
    assert dep.comm["matches_closed_form"]
    rows, _ = run_inprocess(prepare_specs([dep.config])[0], verbose=False)
    plain = pd.DataFrame(rows)
    np.testing.assert_allclose(dep.rounds["train_loss"], plain["train_loss"], rtol=1e-6)
    for c in ("val_balanced_accuracy", "test_balanced_accuracy", "test_tp", "test_fn"):
        np.testing.assert_array_equal(dep.rounds[c], plain[c])
