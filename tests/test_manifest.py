"""Manifest: vendors, splits, atomic writing, merge / refusal, read validation."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from medlora_lib.data.manifest import (
    MANIFEST_COLUMNS,
    VENDORS,
    PreparedRecord,
    assign_splits,
    normalise_vendor,
    read_manifest,
    write_prepared_dataset,
)
from medlora_lib.data.preprocess import preprocessing_params
from medlora_lib.errors import DataError


@pytest.mark.parametrize(
    "name, expected",
    [
        ("SIEMENS", "Siemens"),
        ("siemens", "Siemens"),
        ("A", "Siemens"),
        ("Philips Medical Systems", "Philips"),
        ("b", "Philips"),
        ("GE MEDICAL SYSTEMS", "GE"),
        ("C", "GE"),
        ("Canon", "Canon"),
        ("TOSHIBA", "Canon"),
        ("D", "Canon"),
        ("  Philips  ", "Philips"),
    ],
)
def test_normalise_vendor(name, expected):
    assert normalise_vendor(name) == expected


def test_normalise_vendor_unknown():
    with pytest.raises(DataError, match=r"'Hitachi'.*Siemens, Philips, GE, Canon"):
        normalise_vendor("Hitachi")


def test_manifest_constants():
    assert MANIFEST_COLUMNS == (
        "subject_id",
        "dataset",
        "vendor",
        "centre",
        "pathology",
        "label",
        "split",
        "path",
    )
    assert VENDORS == ("Siemens", "Philips", "GE", "Canon")


def _table(counts: dict[str, tuple[int, int]]) -> pd.DataFrame:
    rows = []
    for vendor, (healthy, disease) in counts.items():
        for i in range(healthy + disease):
            rows.append(
                {
                    "subject_id": f"{vendor.lower()}_{i:03d}",
                    "vendor": vendor,
                    "label": int(i >= healthy),
                }
            )
    return pd.DataFrame(rows)


def test_splits_deterministic_and_order_independent():
    df = _table({"Siemens": (10, 30), "Philips": (20, 25), "GE": (5, 12)})
    a = assign_splits(df, 0.15, 0.25, seed=3)
    b = assign_splits(df.sample(frac=1.0, random_state=1), 0.15, 0.25, seed=3)
    key = lambda d: dict(zip(d["subject_id"], d["split"], strict=True))  # noqa: E731
    assert key(a) == key(b)
    assert list(a["subject_id"]) == list(df["subject_id"])  # row order kept
    c = assign_splits(df, 0.15, 0.25, seed=4)
    assert key(a) != key(c)
    # one client's split does not depend on the other clients
    only = assign_splits(df[df["vendor"] == "GE"], 0.15, 0.25, seed=3)
    assert key(only).items() <= key(a).items()


def test_splits_stratified_with_both_classes_everywhere():
    df = _table({"Siemens": (3, 20), "Canon": (14, 36)})
    out = assign_splits(df, 0.15, 0.25, seed=0)
    for _vendor, sub in out.groupby("vendor"):
        for split in ("train", "val", "test"):
            assert set(sub.loc[sub["split"] == split, "label"]) == {0, 1}
    canon = out[out["vendor"] == "Canon"]
    n_test = (canon["split"] == "test").sum()
    assert n_test == round(14 * 0.25) + round(36 * 0.25)


def test_single_class_client_error_names_client():
    df = _table({"Siemens": (5, 10), "GE": (0, 8)})
    with pytest.raises(DataError, match=r"'GE'.*0 healthy.*8 diseased.*--merge"):
        assign_splits(df, 0.15, 0.25, seed=0)
    with pytest.warns(UserWarning, match="GE"):
        out = assign_splits(df, 0.15, 0.25, seed=0, allow_single_class=True)
    assert set(out["split"]) == {"train", "val", "test"}


def test_empty_client_error():
    df = _table({"Siemens": (5, 10)})
    with pytest.raises(DataError, match=r"client 'Canon'.*no subjects"):
        assign_splits(df, 0.15, 0.25, seed=0, clients=["Siemens", "Canon"])
    with pytest.raises(DataError, match="empty"):
        assign_splits(df.iloc[:0], 0.15, 0.25, seed=0)
    with pytest.raises(DataError, match="val_fraction"):
        assign_splits(df, 0.6, 0.5, seed=0)


def _records(prefix, vendors=("Siemens", "Philips"), n=6, size=(8, 8, 2), dataset="d"):
    rng = np.random.default_rng(0)
    for vendor in vendors:
        for i in range(n):
            yield PreparedRecord(
                subject_id=f"{prefix}_{vendor}_{i}",
                dataset=dataset,
                vendor=vendor,
                centre="c1",
                pathology="NOR" if i < 2 else "DCM",
                label=0 if i < 2 else 1,
                image=rng.random((2, *size), dtype=np.float32),
                seg=np.ones((2, *size), np.uint8),
            )


def _info(source, size=(8, 8, 2), spacing=(3.0, 3.0, 10.0)):
    return {
        "preprocessing": preprocessing_params(spacing, size),
        "image_size": list(size),
        "spacing": list(spacing),
        "sources": [source],
        "split": {"val_fraction": 0.2, "test_fraction": 0.2, "seed": 0},
    }


def test_write_and_read_roundtrip(tmp_path):
    out = write_prepared_dataset(tmp_path / "out", _records("a"), _info("a"))
    df = read_manifest(out)
    assert tuple(df.columns) == MANIFEST_COLUMNS and len(df) == 12
    assert set(df["split"]) == {"train", "val", "test"}
    with np.load(out / df["path"][0]) as z:
        assert z["image"].dtype == np.float32 and z["label"].dtype == np.uint8
        assert z["image"].shape == (2, 8, 8, 2)
    info = json.loads((out / "dataset.json").read_text())
    assert info["split"]["val_fraction"] == 0.2 and info["sources"] == [{"name": "a"}]
    assert info["num_subjects"] == 12
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folders left


def test_failure_midway_leaves_nothing(tmp_path):
    def broken():
        yield from _records("a", n=3)
        raise DataError("corrupt file `x.nii.gz`")

    with pytest.raises(DataError, match="corrupt"):
        write_prepared_dataset(tmp_path / "out", broken(), _info("a"))
    assert list(tmp_path.iterdir()) == []
    # an existing data set survives a failed overwrite untouched
    out = write_prepared_dataset(tmp_path / "out", _records("a"), _info("a"))
    before = sorted(p.name for p in (out / "arrays").iterdir())
    with pytest.raises(DataError):
        write_prepared_dataset(out, broken(), _info("b"), overwrite=True)
    assert sorted(p.name for p in (out / "arrays").iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_refuses_a_different_data_set(tmp_path):
    out = write_prepared_dataset(tmp_path / "out", _records("a"), _info("a"))
    with pytest.raises(DataError, match=r"different data set.*--merge.*--overwrite"):
        write_prepared_dataset(out, _records("b"), _info("b"))
    # same data set again: rebuilt in place
    write_prepared_dataset(out, _records("a"), _info("a"))
    # overwrite replaces it
    write_prepared_dataset(out, _records("b"), _info("b"), overwrite=True)
    assert read_manifest(out)["subject_id"].str.startswith("b_").all()
    # a non-empty foreign folder is never written into
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a medlora data folder"):
        write_prepared_dataset(foreign, _records("a"), _info("a"), overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_merge_adds_a_source_and_recomputes_splits(tmp_path):
    out = write_prepared_dataset(tmp_path / "out", _records("a"), _info("a"))
    merged = write_prepared_dataset(
        out, _records("b", vendors=("Philips", "GE")), _info("b"), merge=True
    )
    df = read_manifest(merged)
    assert len(df) == 24 and set(df["vendor"]) == {"Siemens", "Philips", "GE"}
    info = json.loads((merged / "dataset.json").read_text())
    assert [s["name"] for s in info["sources"]] == ["a", "b"]
    # splits equal a fresh assignment over the merged table
    fresh = assign_splits(df.drop(columns="split"), 0.2, 0.2, seed=0)
    assert (
        fresh.set_index("subject_id")["split"] == df.set_index("subject_id")["split"]
    ).all()
    with pytest.raises(DataError, match="already in it"):
        write_prepared_dataset(out, _records("c"), _info("a"), merge=True)
    with pytest.raises(DataError, match="different preprocessing"):
        write_prepared_dataset(
            out, _records("c", size=(4, 4, 2)), _info("c", size=(4, 4, 2)), merge=True
        )


def test_read_manifest_validation(tmp_path):
    out = write_prepared_dataset(tmp_path / "out", _records("a"), _info("a"))
    df = read_manifest(out)
    (out / df["path"][0]).unlink()
    with pytest.raises(DataError, match=r"does not match its manifest.*a_"):
        read_manifest(out)
    bad = df.copy()
    bad.loc[0, "vendor"] = "Hitachi"
    bad.to_csv(out / "manifest.csv", index=False)
    with pytest.raises(DataError, match="Hitachi"):
        read_manifest(out, check_files=False)
    df.drop(columns="centre").to_csv(out / "manifest.csv", index=False)
    with pytest.raises(DataError, match="expected exactly"):
        read_manifest(out)
    with pytest.raises(DataError, match="no manifest.csv"):
        read_manifest(tmp_path / "nothing")
