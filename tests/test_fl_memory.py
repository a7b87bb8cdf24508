"""What a client process keeps in memory: only the site it serves, within a budget.

A simulation process serves whichever site a message names; what it keeps of the other
sites (models, arrays, prefix-cache entries) is bounded by ``MEDLORA_SITE_CACHE_GB``
(:func:`medlora_lib.fl.task.site_cache_bytes`), a new experiment drops the previous
one's runtimes, and the in-process runner frees what it built. Dropping and rebuilding
changes no number.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from medlora_lib.config import get_config
from medlora_lib.errors import ConfigError
from medlora_lib.fl import simulate, task
from medlora_lib.fl.sites import load_options, load_site, site_names
from medlora_lib.pipeline import resolve_data_dir

SMOKE = ['model.pretrained="none"', "fed.num_rounds=1", "train.num_threads=1"]


def _cfg(method: str = "med_dual_lora", *extra: str):
    return get_config("smoke", overrides=[*SMOKE, *extra], method=method)


@pytest.fixture(scope="module")
def data_dir():
    return resolve_data_dir(_cfg(), verbose=False)


@pytest.fixture(autouse=True)
def _empty_caches():
    task.clear_runtime_cache()
    yield
    task.clear_runtime_cache()


def _builder(cfg, data_dir, site):
    def build():
        data = load_site(data_dir, site, **load_options(cfg))
        return task.ClientRuntime.build(cfg, {site: data}, site, str(data_dir))

    return build


def _serve(cfg, data_dir, site, experiment="e1"):
    return task.get_runtime(experiment, site, _builder(cfg, data_dir, site))


def test_site_cache_budget_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("MEDLORA_SITE_CACHE_GB", raising=False)
    assert task.site_cache_bytes() == 500_000_000
    monkeypatch.setenv("MEDLORA_SITE_CACHE_GB", "2")
    assert task.site_cache_bytes() == 2_000_000_000
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv("MEDLORA_SITE_CACHE_GB", bad)
        with pytest.raises(ConfigError, match=r"MEDLORA_SITE_CACHE_GB=.*number of GB"):
            task.site_cache_bytes()


def test_held_bytes_counts_a_shared_storage_once():
    a = torch.zeros(1000)
    view = a[10:20]
    assert task.held_bytes(a) == 4000
    assert task.held_bytes(a, view, {"x": [a]}) == 4000
    assert task.held_bytes(a, torch.zeros(10)) == 4040


def test_one_site_runtime_holds_its_arrays_without_a_copy(data_dir):
    """One site's training inputs are the loaded arrays (or its prefix-cache entry)
    themselves, not a concatenated copy of them."""
    for cache in ("true", "false"):
        cfg = _cfg("med_dual_lora", f"train.use_prefix_cache={cache}")
        data = load_site(data_dir, "Siemens", **load_options(cfg))
        rt = task.ClientRuntime.build(cfg, {"Siemens": data}, "Siemens", "d")
        if cache == "false":
            x = data.splits["train"][0]
            assert rt.train_inputs["image"].data_ptr() == x.data_ptr()
        else:
            entry = task._PREFIX_CACHE[rt.prefix_keys[0]]
            for k, v in rt.train_inputs.items():
                assert v.data_ptr() == entry[k].data_ptr()
        assert len(rt.prefix_keys) == (3 if cache == "true" else 0)


def test_a_process_keeps_other_sites_only_within_the_budget(data_dir, monkeypatch):
    cfg = _cfg()
    siemens, philips, ge = site_names(data_dir)[:3]
    monkeypatch.setenv("MEDLORA_SITE_CACHE_GB", "0")
    a = _serve(cfg, data_dir, siemens)
    assert list(task._RUNTIMES) == [("e1", siemens)]
    assert set(task._PREFIX_CACHE) == set(a.prefix_keys) and len(a.prefix_keys) == 3
    b = _serve(cfg, data_dir, philips)
    # budget 0: only the site being served, with its own prefix-cache entries
    assert list(task._RUNTIMES) == [("e1", philips)]
    assert set(task._PREFIX_CACHE) == set(b.prefix_keys)
    assert not set(a.prefix_keys) & set(task._PREFIX_CACHE)
    assert _serve(cfg, data_dir, philips) is b  # served again: not rebuilt

    # a budget that fits one other site: the least recently served one goes first
    one = max(task.held_bytes(a), task.held_bytes(b))  # the larger of two sites
    monkeypatch.setenv("MEDLORA_SITE_CACHE_GB", str((one + 1000) / 1e9))
    _serve(cfg, data_dir, siemens)
    assert [k[1] for k in task._RUNTIMES] == [philips, siemens]
    _serve(cfg, data_dir, ge)
    assert [k[1] for k in task._RUNTIMES] == [siemens, ge]

    # a generous budget keeps every site of the experiment
    monkeypatch.setenv("MEDLORA_SITE_CACHE_GB", "2")
    for s in (siemens, philips, ge):
        _serve(cfg, data_dir, s)
    assert [k[1] for k in task._RUNTIMES] == [siemens, philips, ge]
    # a new experiment drops the previous one's runtimes (not its prefix entries,
    # which fit the budget: the same frozen prefix is reused, not recomputed)
    before = set(task._PREFIX_CACHE)
    c = _serve(_cfg("fedavg_lora"), data_dir, siemens, experiment="e2")
    assert list(task._RUNTIMES) == [("e2", siemens)]
    assert set(c.prefix_keys) <= before and set(task._PREFIX_CACHE) == before


def test_inprocess_runner_frees_what_it_built(data_dir, monkeypatch):
    """After an in-process run nothing of it stays beyond the budget; with budget 0
    nothing at all, and the numbers are those of a run that kept everything."""
    cfgs = [_cfg("local"), _cfg("fedavg_lora")]
    kept = [simulate(c, runtime="inprocess", verbose=False) for c in cfgs]
    assert task._PREFIX_CACHE  # the default budget keeps the prefix for reuse
    monkeypatch.setenv("MEDLORA_SITE_CACHE_GB", "0")
    task.clear_runtime_cache()
    for c, ref in zip(cfgs, kept, strict=True):
        r = simulate(c, runtime="inprocess", verbose=False)
        assert not task._PREFIX_CACHE and not task._RUNTIMES
        np.testing.assert_array_equal(r.rounds["train_loss"], ref.rounds["train_loss"])
        pd.testing.assert_frame_equal(
            r.final.drop(columns=["notes"]), ref.final.drop(columns=["notes"])
        )


@pytest.mark.slow
def test_a_simulated_client_holds_only_the_site_it_serves(
    data_dir, monkeypatch, tmp_path
):
    """Flower's Simulation Runtime hands any site to any process; with
    MEDLORA_SITE_CACHE_GB=0 a process keeps only the site of the message it handles
    (its model, arrays and prefix-cache entries), and the federation computes the same
    numbers as the plain in-process loop."""
    from tests.flower_apps import probe_app

    log = tmp_path / "probe.jsonl"
    monkeypatch.setenv("MEDLORA_PROBE_LOG", str(log))
    monkeypatch.setenv("MEDLORA_SITE_CACHE_GB", "0")
    cfg = _cfg("med_dual_lora", "fed.num_rounds=2")
    res = simulate(cfg, verbose=False, app_dir=probe_app(tmp_path))
    names = site_names(data_dir)
    manifest = pd.read_csv(data_dir / "manifest.csv")
    n_train = manifest[manifest["split"] == "train"].groupby("vendor").size()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [r for r in records if r["type"] in ("train", "evaluate")]
    assert len(steps) == 2 * len(names) + len(names)  # 2 train rounds + final eval
    assert len({r["pid"] for r in steps}) >= 2  # several processes served the sites
    for r in steps:
        site = names[r["partition"]]
        assert r["sites"] == [site], r
        assert r["train_subjects"] == [int(n_train[site])], r
        assert r["prefix_entries"] <= 3, r  # train / val / test of this site
    ref = simulate(cfg, runtime="inprocess", verbose=False)
    np.testing.assert_allclose(
        res.rounds["train_loss"], ref.rounds["train_loss"], rtol=1e-5
    )
    for c in ("val_balanced_accuracy", "test_balanced_accuracy", "test_tp"):
        np.testing.assert_array_equal(res.rounds[c], ref.rounds[c])
