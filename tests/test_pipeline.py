"""From a config to data: caching of the synthetic set, real-data checks, client sets."""

from __future__ import annotations

import hashlib

import pytest

from medlora_lib.config import get_config
from medlora_lib.errors import ConfigError, DataError
from medlora_lib.pipeline import load_client_data, resolve_data_dir


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDLORA_CACHE", str(tmp_path_factory.mktemp("cache")))
    mp.delenv("MEDLORA_DATA_DIR", raising=False)
    yield resolve_data_dir(get_config("smoke"), verbose=False)
    mp.undo()


def _digest(folder):
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.npz")):
        h.update(f.read_bytes())
    return h.hexdigest()


def test_synthetic_set_is_cached_and_deterministic(smoke_dir, tmp_path, monkeypatch):
    again = resolve_data_dir(get_config("smoke"), verbose=False)
    assert again == smoke_dir
    monkeypatch.setenv("MEDLORA_CACHE", str(tmp_path))
    fresh = resolve_data_dir(get_config("smoke"), verbose=False)
    assert fresh != smoke_dir and _digest(fresh) == _digest(smoke_dir)


def test_vendor_and_acdc_client_definitions(smoke_dir):
    clients, manifest = load_client_data(smoke_dir)
    assert list(clients) == ["Siemens", "Philips", "GE", "Canon"]
    five, m5 = load_client_data(smoke_dir, clients="vendor+acdc")
    assert list(five) == ["Siemens", "Philips", "GE", "Canon", "ACDC"]
    assert set(m5.loc[m5.client == "ACDC", "dataset"]) == {"synthetic-acdc"}
    n4 = sum(c.num_examples(s) for c in clients.values() for s in c.splits)
    n5 = sum(c.num_examples(s) for c in five.values() for s in c.splits)
    assert n4 == n5 == len(manifest)
    x, y = clients["GE"].splits["train"]
    assert x.shape[1:] == (2, 32, 32, 8) and x.dtype.is_floating_point
    assert set(y.tolist()) <= {0, 1}


def test_real_data_dir_errors(smoke_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDLORA_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match="manifest.csv"):
        resolve_data_dir(get_config("smoke"))
    monkeypatch.setenv("MEDLORA_DATA_DIR", str(smoke_dir))
    assert resolve_data_dir(get_config("smoke")) == smoke_dir
    with pytest.raises(ConfigError, match="data.image_size"):
        resolve_data_dir(get_config("cpu"))


@pytest.mark.slow
def test_calibration_runs_in_workers_give_the_numbers_of_one_process():
    """Chapter 01's centralised reference, one run per seed: in two worker processes
    (the cpu rule) the same rows as one after the other in this process."""
    import pandas as pd

    from medlora_lib.fl.simulate import worker_count
    from medlora_lib.pipeline import calibration_runs

    cfg = get_config(
        "cpu",
        overrides={
            "data.image_size": [32, 32, 8],
            "data.spacing": [4.5, 4.5, 10.0],
            "data.scale": 0.06,
        },
    )
    if worker_count([cfg, cfg]) < 2:
        pytest.skip("one CPU: nothing runs in parallel")
    clients, _ = load_client_data(resolve_data_dir(cfg, verbose=False))
    one = calibration_runs(cfg, clients, epochs=2, seeds=[0, 1], max_parallel=1)
    two = calibration_runs(cfg, clients, epochs=2, seeds=[0, 1])
    assert list(one.columns) == [
        "seed", "best epoch", "balanced_accuracy", "sensitivity", "specificity",
        "auc", "seconds",
    ]  # fmt: skip
    cols = [c for c in one.columns if c != "seconds"]
    pd.testing.assert_frame_equal(one[cols], two[cols])
    assert (one["seconds"] > 0).all()
