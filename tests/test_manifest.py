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


# ----------------------------------------------- same data set = same content


def _ids(prefix, vendors=("Siemens", "Philips"), n=6):
    return [f"{prefix}_{v}_{i}" for v in vendors for i in range(n)]


def test_a_different_data_set_of_the_same_source_is_refused(tmp_path):
    out = write_prepared_dataset(tmp_path / "out", _records("a"), _info("a"))
    before = read_manifest(out)["subject_id"].tolist()
    # fewer subjects of the same source: refused before any record is made
    made = []

    def fewer():
        for rec in _records("a", n=4):
            made.append(rec.subject_id)
            yield rec

    with pytest.raises(DataError) as err:
        write_prepared_dataset(out, fewer(), _info("a"), subject_ids=_ids("a", n=4))
    text = str(err.value)
    assert str(out) in text and "--overwrite" in text
    assert "subjects: 12 there, 8 here" in text and "4 only there" in text
    assert made == []  # nothing was preprocessed
    # the same without the ids up front: found once the records are written
    with pytest.raises(DataError, match=r"subjects: 12 there, 8 here"):
        write_prepared_dataset(out, _records("a", n=4), _info("a"))
    assert read_manifest(out)["subject_id"].tolist() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    # another split seed: another data set
    info = _info("a")
    info["split"]["seed"] = 1
    with pytest.raises(DataError, match=r"split\.seed 0 there, 1 here"):
        write_prepared_dataset(out, _records("a"), info, subject_ids=_ids("a"))
    # other preprocessing (e.g. CineMA's crop)
    info = _info("a")
    info["preprocessing"] = preprocessing_params(
        (3.0, 3.0, 10.0), (8, 8, 2), crop="shift_inside"
    )
    with pytest.raises(DataError, match=r"preprocessing\.crop 'lv_centred' there"):
        write_prepared_dataset(out, _records("a"), info)
    # the identical data set again: fine, rebuilt in place
    write_prepared_dataset(out, _records("a"), _info("a"), subject_ids=_ids("a"))
    assert read_manifest(out)["subject_id"].tolist() == before
    # and --overwrite replaces it
    write_prepared_dataset(out, _records("a", n=4), _info("a"), overwrite=True)
    assert len(read_manifest(out)) == 8


def test_source_content_compared_not_its_location(tmp_path):
    src = {"name": "acdc", "raw_dir": "/data/ACDC", "n": 12}
    out = write_prepared_dataset(tmp_path / "out", _records("a"), _info(src))
    moved = dict(src, raw_dir="/mnt/elsewhere/ACDC")  # same download, moved
    write_prepared_dataset(out, _records("a"), _info(moved))
    with pytest.raises(DataError, match=r"sources\[acdc\]\.n 12 there, 9 here"):
        write_prepared_dataset(out, _records("a"), _info(dict(src, n=9)))


def test_folder_of_the_old_format_is_the_same_data_set(tmp_path):
    out = write_prepared_dataset(tmp_path / "out", _records("a"), _info("a"))
    info = json.loads((out / "dataset.json").read_text())
    info["preprocessing"]["crop"] = "lv_bbox_centre_at_ED"  # before crop was an option
    del info["preprocessing"]["intensity"], info["preprocessing"]["crop_centre"]
    (out / "dataset.json").write_text(json.dumps(info))
    write_prepared_dataset(out, _records("a"), _info("a"))  # not refused


def test_single_class_vendor_is_written_with_a_warning(tmp_path):
    from medlora_lib.errors import DataWarning

    def ge_diseased():
        yield from _records("a")
        for rec in _records("g", vendors=("GE",), n=3):
            rec.label, rec.pathology = 1, "DCM"
            yield rec

    with pytest.warns(DataWarning, match=r"'GE'.*0 healthy.*3 diseased.*allow_single"):
        out = write_prepared_dataset(tmp_path / "out", ge_diseased(), _info("a"))
    df = read_manifest(out)
    assert (df.loc[df.vendor == "GE", "label"] == 1).all() and len(df) == 15


# ----------------------------------------------- what a killed writer leaves


def test_stale_work_folders_of_a_killed_writer_are_cleaned(tmp_path, capsys):
    import os
    import subprocess

    from medlora_lib.data import manifest as m

    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that is gone
    out = write_prepared_dataset(tmp_path / "out", _records("a"), _info("a"))
    stale = tmp_path / f".out.tmp-{m._HOST}-{dead.pid}-0123abcd"
    (stale / "arrays").mkdir(parents=True)
    live = tmp_path / f".out.tmp-{m._HOST}-{os.getpid()}-89abcdef"  # still running
    live.mkdir()
    other_host = tmp_path / f".out.tmp-otherhost-{dead.pid}-0123abcd"
    other_host.mkdir()
    unrelated = tmp_path / f".other.tmp-{m._HOST}-{dead.pid}-0123abcd"
    unrelated.mkdir()
    write_prepared_dataset(out, _records("a"), _info("a"))
    assert not stale.exists() and live.exists() and other_host.exists()
    assert unrelated.exists()
    err = capsys.readouterr().err
    assert f"removed `{stale}`" in err and f"process {dead.pid} is gone" in err
    # killed between moving the old folder aside and moving the new one in
    backup = tmp_path / f".out.old-{m._HOST}-{dead.pid}-0123abcd"
    os.replace(out, backup)
    assert m.clean_stale_work_dirs(out) == []
    assert read_manifest(out)["subject_id"].str.startswith("a_").all()
    assert "put back" in capsys.readouterr().err


def test_work_folder_names_its_owner(tmp_path, monkeypatch):
    import os

    from medlora_lib.data import manifest as m

    seen = []
    real = m._work_dir

    def spy(out_dir, kind):
        path = real(out_dir, kind)
        seen.append(path.name)
        return path

    monkeypatch.setattr(m, "_work_dir", spy)
    write_prepared_dataset(tmp_path / "out", _records("a"), _info("a"))
    assert seen[0].startswith(f".out.tmp-{m._HOST}-{os.getpid()}-")
