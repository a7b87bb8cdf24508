"""Bad input refused before anything starts; in-process methods; single-class clients; CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medlora_lib.config import get_config
from medlora_lib.errors import ConfigError, DataError
from medlora_lib.fl import RunResult, simulate
from medlora_lib.fl.simulate import cache_path, plan
from medlora_lib.pipeline import resolve_data_dir

SMOKE = ['model.pretrained="none"', "fed.num_rounds=1", "train.num_threads=1"]


@pytest.fixture(scope="module")
def data_dir():
    return resolve_data_dir(get_config("smoke"), verbose=False)


def test_unknown_method_is_refused(data_dir):
    with pytest.raises(ConfigError, match="fedbogus"):  # when the config is built
        get_config("smoke", overrides=SMOKE, method="fedbogus")


def test_unknown_profile_is_refused():
    with pytest.raises(ConfigError, match="profile"):
        get_config("laptop")


@pytest.mark.parametrize(
    "override, match",
    [
        ("adapter.lora_rank=0", "lora_rank"),
        ("adapter.lora_rank=-2", "lora_rank"),
        ('adapter.adapted_blocks="last0"', "adapts no block"),
        ("adapter.adapted_blocks=[]", "no block"),
        ("adapter.adapted_blocks=[12]", "out of range"),
    ],
)
def test_bad_adapter_config_is_refused_before_start(data_dir, override, match):
    with pytest.raises(ConfigError, match=match):
        cfg = get_config("smoke", overrides=[*SMOKE, override], method="med_dual_lora")
        simulate(cfg)


def test_data_folder_not_matching_manifest(data_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(data_dir, bad)
    victim = pd.read_csv(bad / "manifest.csv")["path"].iloc[3]
    (bad / victim).unlink()
    cfg = get_config("smoke", overrides=[*SMOKE, f'data.data_dir="{bad}"'])
    with pytest.raises(DataError):
        simulate(cfg)


def test_data_of_another_profile_is_refused(data_dir):
    cfg = get_config(
        "smoke",
        overrides=[*SMOKE, f'data.data_dir="{data_dir}"', "data.image_size=[48,48,8]"],
    )
    # refused before anything starts (the pipeline's dataset.json check or ours)
    with pytest.raises((DataError, ConfigError), match="image"):
        plan([cfg], use_cache=False, scratch=Path("."))


def test_local_and_centralized_run_inprocess(data_dir, tmp_path):
    cfgs = [
        get_config("smoke", overrides=SMOKE, method=m) for m in ("local", "centralized")
    ]
    local, central = simulate(cfgs, verbose=False)
    for r in (local, central):
        assert r.provenance["runtime"] == "inprocess"
        assert len(r.rounds) == 4
        assert set(r.selected().client) >= {"Siemens", "Philips", "GE", "Canon"}
    assert local.comm["total_bytes_up"] == 0
    # centralized: one pooled model, the same training loss on every client row
    assert central.rounds["train_loss"].nunique() == 1
    assert (
        central.rounds["num_examples"] == central.rounds["num_examples"].iloc[0]
    ).all()
    out = local.save(tmp_path / "run")
    again = RunResult.load(out)
    pd.testing.assert_frame_equal(again.final, local.final, check_dtype=False)
    assert json.loads((out / "results.json").read_text())["method"] == "local"


def test_single_class_client_split_is_reported_not_crashed(data_dir, tmp_path):
    one = tmp_path / "oneclass"
    shutil.copytree(data_dir, one)
    m = pd.read_csv(one / "manifest.csv", dtype=str, keep_default_na=False)
    m.loc[(m.vendor == "GE") & (m.split.isin(["val", "test"])), "label"] = "1"
    m.to_csv(one / "manifest.csv", index=False)
    cfg = get_config(
        "smoke", overrides=[*SMOKE, f'data.data_dir="{one}"'], method="local"
    )
    r = simulate(cfg, verbose=False)
    ge = r.selected().set_index("client").loc["GE"]
    assert np.isnan(ge["balanced_accuracy"]) and np.isnan(ge["auc"])
    assert "no healthy subjects" in ge["notes"]
    assert not np.isnan(ge["sensitivity"])
    other = r.selected().set_index("client").loc["Siemens"]
    assert not np.isnan(other["balanced_accuracy"])


def test_cache_reuses_a_run(data_dir, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MEDLORA_CACHE", str(tmp_path))
    cfg = get_config(
        "smoke", overrides=[*SMOKE, f'data.data_dir="{data_dir}"'], method="local"
    )
    a = simulate(cfg, use_cache=True, verbose=False)
    assert (cache_path(cfg, data_dir) / "results.json").exists()
    b = simulate(cfg, use_cache=True, verbose=True)
    assert "cached" in capsys.readouterr().out
    pd.testing.assert_frame_equal(a.final, b.final, check_dtype=False)
    # a change to the code that computes a run makes the cached result stale
    from medlora_lib.fl import runcache

    before = cache_path(cfg, data_dir)
    monkeypatch.setattr(runcache, "code_fingerprint", lambda: "changed-code")
    assert cache_path(cfg, data_dir) != before
    assert not (cache_path(cfg, data_dir) / "results.json").exists()


def test_run_cache_keys_on_every_result_module_without_a_hand_kept_list():
    from medlora_lib.fl import runcache

    root = Path(runcache.__file__).resolve().parent.parent
    names = {p.relative_to(root).as_posix() for p in runcache.result_modules()}
    # the modules an old hand-kept list forgot are in, and any new module is too
    assert {"fl/simulate.py", "fl/server_app.py", "models/checkpoint.py"} <= names
    every = {p.relative_to(root).as_posix() for p in root.rglob("*.py")}
    assert every - names == set(runcache.PRESENTATION_MODULES) & every
    assert "plotting.py" not in names


def test_cli_refuses_a_bad_out_before_training(data_dir, tmp_path, capsys):
    from medlora_lib.cli import main

    f = tmp_path / "a-file"
    f.write_text("x")
    args = ["run", "--method", "local", "--profile", "smoke", "--set", *SMOKE]
    assert main([*args, "--out", str(f)]) == 2
    assert "is a file" in capsys.readouterr().err
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "results.json").write_text("{}")
    assert main([*args, "--out", str(tmp_path / "done")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_cli_run_writes_results(data_dir, tmp_path):
    from medlora_lib.cli import main

    out = tmp_path / "cli"
    rc = main(
        [
            "run",
            "--method",
            "local",
            "--profile",
            "smoke",
            "--out",
            str(out),
            "--seed",
            "2",
            "--set",
            *SMOKE,
        ]
    )
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["seed"] == 2 and res["config"]["method"] == "local"
    assert len(pd.read_csv(out / "rounds.csv")) == 4


def test_cli_run_bad_method_is_a_clean_error(capsys):
    from medlora_lib.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["run", "--method", "nope", "--profile", "smoke"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    # the choices come from the method registry
    assert "error:" in err and "med_dual_lora" in err and "Traceback" not in err


def test_acdc_as_fifth_site(data_dir):
    cfg = get_config(
        "smoke", overrides=[*SMOKE, "fed.partition_by=vendor+acdc"], method="local"
    )
    assert plan([cfg], use_cache=False, scratch=Path("."))[0].sites[-1] == "ACDC"
    r = simulate(cfg, verbose=False)
    assert list(r.rounds["client"]) == ["Siemens", "Philips", "GE", "Canon", "ACDC"]


def test_sites_by_centre(data_dir):
    cfg = get_config(
        "smoke", overrides=[*SMOKE, "fed.partition_by=centre"], method="local"
    )
    r = simulate(cfg, verbose=False)
    assert "Philips-2" in set(r.rounds["client"]) and "Philips-3" in set(
        r.rounds["client"]
    )


def test_old_results_with_fed_clients_still_load():
    from medlora_lib.config import ExperimentConfig

    d = get_config("smoke").to_dict()
    d["fed"].pop("partition_by")
    d["fed"]["clients"] = "vendor+acdc"
    assert ExperimentConfig.from_dict(d).fed.partition_by == "vendor+acdc"


@pytest.mark.slow
def test_ctrl_c_during_a_simulation_stops_everything_cleanly(tmp_path):
    """Ctrl-C: a one-line message, exit status 130, no traceback, no process left."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    env = {**os.environ, "MEDLORA_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "medlora_lib.cli", "run", "--method", "fedavg_lora"]
    cmd += ["--profile", "smoke", "--out", str(tmp_path / "out"), "--set", *SMOKE[:1]]
    cmd += ["fed.num_rounds=100000", "train.num_threads=1"]
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell that starts jobs in the background ignores SIGINT; a terminal does not
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    t0 = time.monotonic()
    while time.monotonic() - t0 < 240:  # until the federation runs
        kids = psutil.Process(proc.pid).children(recursive=True)
        if any("flwr" in " ".join(k.cmdline()) for k in kids if k.is_running()):
            break
        time.sleep(0.5)
    time.sleep(15)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    time.sleep(2)
    left = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        where = " ".join(p.info["cmdline"] or []) + " " + str(p.info["cwd"] or "")
        if str(tmp_path) in where:
            left.append(where)
    assert left == []


def test_a_site_without_training_data_is_refused_before_start(data_dir, tmp_path):
    bad = tmp_path / "no-ge-train"
    shutil.copytree(data_dir, bad)
    m = pd.read_csv(bad / "manifest.csv", dtype=str, keep_default_na=False)
    m.loc[(m.vendor == "GE") & (m.split == "train"), "split"] = "test"
    m.to_csv(bad / "manifest.csv", index=False)
    cfg = get_config(
        "smoke", overrides=[*SMOKE, f'data.data_dir="{bad}"'], method="fedavg_lora"
    )
    with pytest.raises(
        DataError, match=r"\['GE'\] have no training subjects.*fed.exclude"
    ):
        simulate(cfg, verbose=False)
