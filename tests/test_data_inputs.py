"""Bad input to the data layer found by a probe, and what the federation refuses.

- a folder holding another data set is not replaced without ``--overwrite``
  (``medlora synth --seed 1``, ``medlora prepare acdc`` from a subset);
- a truncated ``arrays/*.npz`` is a DataError naming the file;
- a vendor with one class only is prepared (with a warning) and refused by the
  federation unless ``fed.allow_single_class``;
- ``--profile paper`` on data prepared otherwise is refused, naming the field.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from medlora_lib.cli import main
from medlora_lib.config import get_config
from medlora_lib.data.dataset import CineDataset, load_case
from medlora_lib.data.manifest import read_manifest
from medlora_lib.data.synthetic import SynthConfig, make_synthetic
from medlora_lib.errors import ConfigError, DataError
from medlora_lib.pipeline import check_data_matches, load_client_data, resolve_data_dir

SIZES = {"Siemens": 5, "Philips": 4, "GE": 4, "Canon": 4}


def _tiny(seed=0, **kw):
    return SynthConfig.for_profile("smoke", subjects_per_vendor=SIZES, seed=seed, **kw)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("data") / "tiny", _tiny())


@pytest.fixture()
def tiny_copy(tiny_dir, tmp_path):
    return shutil.copytree(tiny_dir, tmp_path / "tiny")


# ------------------------------------------------------ another data set in OUT_DIR


def test_synth_with_another_seed_does_not_replace_the_folder(tiny_copy, capsys):
    before = (tiny_copy / "dataset.json").read_text()
    code = main(["synth", str(tiny_copy), "--profile", "smoke", "--seed", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ")
    assert str(tiny_copy) in err and "different data set" in err
    assert "seed 0 there, 1 here" in err and "--overwrite" in err
    assert (tiny_copy / "dataset.json").read_text() == before
    # the identical data set again is fine (rebuilt in place, same bytes)
    first = load_case(tiny_copy / "arrays" / "synth_ge_mnms_001.npz")[0]
    make_synthetic(tiny_copy, _tiny())
    again = load_case(tiny_copy / "arrays" / "synth_ge_mnms_001.npz")[0]
    np.testing.assert_array_equal(first, again)
    # --overwrite replaces it
    make_synthetic(tiny_copy, _tiny(seed=1), overwrite=True)
    info = json.loads((tiny_copy / "dataset.json").read_text())
    assert info["sources"][0]["config"]["seed"] == 1


def test_prepare_acdc_from_a_subset_does_not_replace_the_folder(tmp_path, capsys):
    from test_loaders_acdc import make_acdc

    patients = [(i, "NOR" if i <= 4 else "HCM", 1, 4) for i in range(1, 10)]
    make_acdc(tmp_path / "all", patients=patients)
    make_acdc(tmp_path / "subset", patients=patients[:5])
    args = ["--image-size", "16", "16", "4", "--spacing", "2", "2", "10"]
    out = tmp_path / "out"
    assert main(["prepare", "acdc", str(tmp_path / "all"), str(out), *args]) == 0
    capsys.readouterr()
    code = main(["prepare", "acdc", str(tmp_path / "subset"), str(out), *args])
    err = capsys.readouterr().err
    assert code == 2 and str(out) in err and "--overwrite" in err
    assert "subjects: 9 there, 5 here" in err
    assert len(read_manifest(out)) == 9
    # the same download again: fine
    assert main(["prepare", "acdc", str(tmp_path / "all"), str(out), *args]) == 0
    assert len(read_manifest(out)) == 9


# ------------------------------------------------------------- a truncated array


def test_truncated_array_names_the_file_and_the_fix(tiny_copy):
    path = tiny_copy / "arrays" / "synth_ge_mnms_001.npz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    for load in (
        lambda: load_case(path),
        lambda: CineDataset(tiny_copy),
        lambda: load_client_data(tiny_copy),
    ):
        with pytest.raises(DataError) as err:
            load()
        text = str(err.value)
        assert "synth_ge_mnms_001.npz" in text and "medlora prepare" in text
        assert "truncated" in text
    path.write_bytes(b"")  # an empty file, as a full disk leaves it
    with pytest.raises(DataError, match="synth_ge_mnms_001.npz"):
        load_case(path)


def test_truncated_first_array_when_the_size_is_not_recorded(tiny_copy):
    info = json.loads((tiny_copy / "dataset.json").read_text())
    del info["preprocessing"]
    (tiny_copy / "dataset.json").write_text(json.dumps(info))
    first = tiny_copy / read_manifest(tiny_copy)["path"].iloc[0]
    first.write_bytes(first.read_bytes()[:100])
    with pytest.raises(DataError, match=rf"{first.name}.*medlora prepare"):
        check_data_matches(get_config("smoke"), tiny_copy)


# ------------------------------------------------- a vendor with one class only


def _ge_all_diseased(folder):
    m = pd.read_csv(folder / "manifest.csv", dtype=str, keep_default_na=False)
    m.loc[m.vendor == "GE", "label"] = "1"
    m.to_csv(folder / "manifest.csv", index=False)


def test_federation_refuses_a_single_class_site(tiny_copy, monkeypatch):
    monkeypatch.delenv("MEDLORA_DATA_DIR", raising=False)
    _ge_all_diseased(tiny_copy)
    # the smoke profile allows single-class sites (its tiny sets have some); the
    # cpu and paper profiles do not
    data = [f'data.data_dir="{tiny_copy}"', "fed.allow_single_class=false"]
    assert get_config("cpu").fed.allow_single_class is False
    assert get_config("paper").fed.allow_single_class is False
    with pytest.raises(DataError) as err:
        resolve_data_dir(get_config("smoke", overrides=data))
    text = str(err.value)
    assert "site 'GE'" in text and "0 healthy" in text
    assert "fed.allow_single_class=true" in text and "fed.exclude=GE" in text
    # the reachable ways on: allow it (a warning), or leave the site out
    from medlora_lib.errors import DataWarning

    with pytest.warns(DataWarning, match="site 'GE'"):
        resolve_data_dir(
            get_config("smoke", overrides=[*data, "fed.allow_single_class=true"])
        )
    resolve_data_dir(get_config("smoke", overrides=[*data, "fed.exclude=GE"]))
    # the same under another partition: the site is named as it is formed
    with pytest.raises(DataError, match=r"site '.+-.+' \(fed.partition_by='centre'\)"):
        resolve_data_dir(
            get_config("smoke", overrides=[*data, "fed.partition_by=centre"])
        )
    # and in the Flower run config
    from medlora_lib.config import from_run_config

    cfg, _ = from_run_config({"profile": "paper", "fed.allow-single-class": True})
    assert cfg.fed.allow_single_class is True
    cfg, _ = from_run_config({"profile": "smoke"})
    assert cfg.fed.allow_single_class is True


def test_load_site_refuses_a_single_class_site_when_asked(tiny_copy):
    from medlora_lib.fl.sites import check_site_classes, load_site

    _ge_all_diseased(tiny_copy)
    load_site(tiny_copy, "GE", "vendor")  # default: checked by the caller
    with pytest.raises(DataError, match="site 'GE'"):
        load_site(tiny_copy, "GE", "vendor", allow_single_class=False)
    load_site(tiny_copy, "Siemens", "vendor", allow_single_class=False)
    manifest = read_manifest(tiny_copy)
    with pytest.warns(UserWarning):
        found = check_site_classes(manifest, "vendor", allow_single_class=True)
    assert found == ["GE"]


# ------------------------------------------- the paper profile on other data


def test_paper_profile_refuses_data_prepared_otherwise(tiny_copy):
    info = json.loads((tiny_copy / "dataset.json").read_text())
    size = info["preprocessing"]["image_size"]
    cfg = get_config(
        "paper", overrides={"data.image_size": size, "data.spacing": [4.5, 4.5, 10]}
    )
    with pytest.raises(ConfigError) as err:
        check_data_matches(cfg, tiny_copy)
    text = str(err.value)
    assert "`data.crop` is 'shift_inside'" in text and "'lv_centred'" in text
    assert "--profile paper --overwrite" in text and "data.crop=lv_centred" in text
    # the other field is named as well once the crop matches
    cfg = get_config(
        "paper",
        overrides={"data.image_size": size, "data.crop": "lv_centred"},
    )
    with pytest.raises(ConfigError, match=r"`data.intensity` is 'per_frame'"):
        check_data_matches(cfg, tiny_copy)
    # a folder written before the options existed counts as lv_centred + joint
    info["preprocessing"]["crop"] = "lv_bbox_centre_at_ED"
    del info["preprocessing"]["intensity"]
    (tiny_copy / "dataset.json").write_text(json.dumps(info))
    check_data_matches(get_config("smoke"), tiny_copy)
    with pytest.raises(ConfigError, match="data.crop"):
        check_data_matches(
            get_config("paper", overrides={"data.image_size": size}), tiny_copy
        )


def test_synthetic_paper_recipe_is_recorded(tmp_path):
    cfg = _tiny(crop="shift_inside", intensity="per_frame")
    out = make_synthetic(tmp_path / "p", cfg)
    pre = json.loads((out / "dataset.json").read_text())["preprocessing"]
    assert (pre["crop"], pre["intensity"]) == ("shift_inside", "per_frame")
    smoke = get_config("smoke", overrides=[f'data.data_dir="{out}"'])
    with pytest.raises(ConfigError, match="data.crop"):
        check_data_matches(smoke, out)
    check_data_matches(
        get_config(
            "smoke",
            overrides=["data.crop=shift_inside", "data.intensity=per_frame"],
        ),
        out,
    )
