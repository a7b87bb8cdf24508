"""M&Ms-1 and M&Ms-2 loaders on tiny hand-made NIfTI fixtures."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medlora_lib.data.manifest import read_manifest
from medlora_lib.data.mnms import prepare_mnms, scan_mnms
from medlora_lib.data.mnms2 import prepare_mnms2, scan_mnms2
from medlora_lib.errors import DataError

SHAPE = (20, 20, 4)
SPACING = (2.0, 2.0, 10.0)
N_T = 6
CSV_NAME = "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv"


def _save(path, array, spacing=SPACING):
    img = nib.Nifti1Image(array, np.diag([*spacing, 1.0]))
    img.header.set_zooms(tuple(spacing) + (1.0,) * (array.ndim - 3))
    nib.save(img, str(path))


def _gt(t: int) -> np.ndarray:
    """medlora / M&Ms map: LV 1 disc at (12, 9), MYO 2 ring, RV 3 block."""
    xx, yy = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    d = np.hypot(xx - 12, yy - 9)
    r = 4.0 - 0.3 * t
    gt = np.zeros(SHAPE, np.uint8)
    gt[(d > r) & (d <= r + 1.5)] = 2
    gt[d <= r] = 1
    gt[(xx <= 4) & (yy >= 5) & (yy <= 12)] = 3
    return gt


def _frame(t: int) -> np.ndarray:
    return (10.0 * t + 100.0 * (_gt(t) == 1)).astype(np.float32)


# (code, folder, VendorName, Vendor, Centre, ED, ES, Pathology, with_gt)
DEFAULT_SUBJECTS = [
    ("A0S9V9", "Training/Labeled", "Siemens", "A", 1, 0, 3, "NOR", True),
    ("A1D0Q7", "Training/Labeled", "Siemens", "A", 1, 1, 4, "DCM", True),
    ("B2C3D4", "Validation", "Philips", "B", 2, 2, 5, "HCM", True),
    ("C5E6F7", "Training/Unlabeled", "GE", "C", 4, 0, 2, "NOR", False),
]


def make_mnms(root, subjects=DEFAULT_SUBJECTS, csv_name=CSV_NAME, drop_column=None):
    base = root / "OpenDataset"
    rows = []
    for code, where, vname, vcode, centre, ed, es, path, with_gt in subjects:
        folder = base / where / code
        folder.mkdir(parents=True)
        _save(
            folder / f"{code}_sa.nii.gz", np.stack([_frame(t) for t in range(N_T)], -1)
        )
        if with_gt:
            gt = np.zeros((*SHAPE, N_T), np.uint8)
            gt[..., ed], gt[..., es] = _gt(ed), _gt(es)
            _save(folder / f"{code}_sa_gt.nii.gz", gt)
        rows.append(
            {
                "External code": code,
                "VendorName": vname,
                "Vendor": vcode,
                "Centre": centre,
                "ED": ed,
                "ES": es,
                "Age": 50,
                "Pathology": path,
                "Sex": "M",
                "Height": "",
                "Weight": "",
            }
        )
    df = pd.DataFrame(rows)
    if drop_column:
        df = df.drop(columns=drop_column)
    df.to_csv(base / csv_name)  # first column: an unnamed index, as in the release
    return root


def test_scan_and_zero_based_frames(tmp_path):
    make_mnms(tmp_path)
    subjects = {s.code: s for s in scan_mnms(tmp_path)}
    assert set(subjects) == {"A0S9V9", "A1D0Q7", "B2C3D4", "C5E6F7"}
    s = subjects["A1D0Q7"]
    assert (s.subject_id, s.vendor, s.label, s.centre) == (
        "mnms_A1D0Q7",
        "Siemens",
        1,
        "1",
    )
    frames, spacing, labels = s.load()
    # ED = 1 (0-based) -> background 10; ES = 4 -> background 40
    assert frames[0, 0, 0, 0] == 10.0 and frames[1, 0, 0, 0] == 40.0
    # labels are taken at the same indices and not remapped
    np.testing.assert_array_equal(labels[0], _gt(1))
    np.testing.assert_array_equal(labels[1], _gt(4))
    assert subjects["B2C3D4"].vendor == "Philips"
    assert subjects["C5E6F7"].has_gt is False
    assert subjects["C5E6F7"].load()[2] is None
    assert subjects["A0S9V9"].official_split == "train"


def test_older_csv_name_and_raw_dir_forms(tmp_path):
    make_mnms(tmp_path, csv_name="201014_M&Ms_Dataset_Information_-_opendataset.csv")
    assert len(scan_mnms(tmp_path / "OpenDataset")) == 4
    assert len(scan_mnms(tmp_path)) == 4


def test_csv_missing_column(tmp_path):
    make_mnms(tmp_path, drop_column="ES")
    with pytest.raises(DataError, match=r"no column\(s\) \['ES'\]"):
        scan_mnms(tmp_path)


def test_csv_unknown_vendor(tmp_path):
    subjects = list(DEFAULT_SUBJECTS)
    subjects[2] = ("B2C3D4", "Validation", "Hitachi", "E", 2, 2, 5, "HCM", True)
    make_mnms(tmp_path, subjects=subjects)
    with pytest.raises(DataError, match=r"B2C3D4.*VendorName.*'Hitachi'.*Siemens"):
        scan_mnms(tmp_path)


def test_ed_es_outside_cine(tmp_path):
    subjects = list(DEFAULT_SUBJECTS)
    subjects[0] = ("A0S9V9", "Training/Labeled", "Siemens", "A", 1, 0, 6, "NOR", False)
    make_mnms(tmp_path, subjects=subjects)
    with pytest.raises(DataError, match=r"A0S9V9: ES = 6 .*0-based.*valid 0\.\.5"):
        scan_mnms(tmp_path)


def test_csv_folder_mismatch_error_or_skip(tmp_path):
    make_mnms(tmp_path)
    csv = tmp_path / "OpenDataset" / CSV_NAME
    df = pd.read_csv(csv, index_col=0)
    extra = df.iloc[[0]].copy()
    extra["External code"] = "Z9Z9Z9"
    pd.concat([df.iloc[1:], extra]).to_csv(
        csv
    )  # A0S9V9 folder not in CSV; Z9Z9Z9 no folder
    with pytest.raises(
        DataError, match=r"no folder \(first: \['Z9Z9Z9'\]\).*\['A0S9V9'\].*skip"
    ):
        scan_mnms(tmp_path)
    with pytest.warns(UserWarning, match="Z9Z9Z9"):
        subjects = scan_mnms(tmp_path, on_mismatch="skip")
    assert {s.code for s in subjects} == {"A1D0Q7", "B2C3D4", "C5E6F7"}


def test_corrupt_cine_leaves_nothing(tmp_path):
    make_mnms(tmp_path / "raw", subjects=DEFAULT_SUBJECTS[:3])
    cine = tmp_path / "raw/OpenDataset/Validation/B2C3D4/B2C3D4_sa.nii.gz"
    cine.write_bytes(b"\x1f\x8b" + b"broken" * 50)
    with pytest.raises(DataError, match=r"B2C3D4_sa\.nii\.gz"):
        prepare_mnms(tmp_path / "raw", tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def _many_subjects():
    out = []
    for i in range(8):
        out.append(
            (
                f"A{i:05d}",
                "Training/Labeled",
                "Siemens",
                "A",
                1,
                0,
                3,
                "NOR" if i < 3 else "DCM",
                True,
            )
        )
        out.append(
            (
                f"D{i:05d}",
                "Testing",
                "Canon",
                "D",
                5,
                1,
                4,
                "NOR" if i < 3 else "HCM",
                i % 2 == 0,
            )
        )
    return out


def test_prepare_mnms_end_to_end(tmp_path):
    make_mnms(tmp_path / "raw", subjects=_many_subjects())
    out = prepare_mnms(
        tmp_path / "raw",
        tmp_path / "out",
        target_spacing=(2.0, 2.0, 10.0),
        image_size=(16, 16, 4),
        val_fraction=0.25,
        test_fraction=0.25,
        progress=False,
    )
    df = read_manifest(out)
    assert len(df) == 16 and set(df["vendor"]) == {"Siemens", "Canon"}
    assert set(df["dataset"]) == {"mnms"}
    for _, sub in df.groupby("vendor"):
        assert set(sub["split"]) == {"train", "val", "test"}
    with np.load(out / "arrays/mnms_A00000.npz") as z:
        label = z["label"]
    xs, ys = np.nonzero((label[0] == 1).any(axis=2))
    assert abs(xs.mean() - 7.5) <= 1 and abs(ys.mean() - 7.5) <= 1
    with np.load(out / "arrays/mnms_D00001.npz") as z:  # no gt: zero labels
        assert not z["label"].any() and z["image"].max() == pytest.approx(1.0)
    info = json.loads((out / "dataset.json").read_text())
    assert info["sources"][0]["n_without_gt"] == 4


# ----------------------------------------------------------------------------- M&Ms-2


def make_mnms2(root, rows=None):
    rows = rows or [
        (1, "NOR", "SIEMENS"),
        (2, "LV", "SIEMENS"),
        (3, "NOR", "Philips Medical Systems"),
        (4, "HCM", "Philips Medical Systems"),
        (5, "NOR", "GE MEDICAL SYSTEMS"),
        (6, "ARR", "GE MEDICAL SYSTEMS"),
    ]
    data = root / "MnM2" / "dataset"
    for code, _, _ in rows:
        folder = data / f"{code:03d}"
        folder.mkdir(parents=True)
        for phase, t in (("ED", 0), ("ES", 3)):
            _save(folder / f"{code:03d}_SA_{phase}.nii.gz", _frame(t))
            _save(folder / f"{code:03d}_SA_{phase}_gt.nii.gz", _gt(t))
    pd.DataFrame(
        [
            {"SUBJECT_CODE": c, "DISEASE": d, "VENDOR": v, "SCANNER": "X", "FIELD": 1.5}
            for c, d, v in rows
        ]
    ).to_csv(root / "MnM2" / "dataset_information.csv", index=False)
    return root


def test_scan_mnms2(tmp_path):
    make_mnms2(tmp_path)
    subjects = scan_mnms2(tmp_path)
    assert [s.subject_id for s in subjects][:2] == ["mnms2_001", "mnms2_002"]
    assert [s.vendor for s in subjects] == [
        "Siemens",
        "Siemens",
        "Philips",
        "Philips",
        "GE",
        "GE",
    ]
    assert [s.label for s in subjects] == [0, 1, 0, 1, 0, 1]
    frames, _, labels = subjects[0].load()
    assert frames[0, 0, 0, 0] == 0.0 and frames[1, 0, 0, 0] == 30.0
    np.testing.assert_array_equal(labels[0], _gt(0))  # no remapping


def test_mnms2_unknown_vendor_and_missing_folder(tmp_path):
    make_mnms2(tmp_path)
    csv = tmp_path / "MnM2" / "dataset_information.csv"
    df = pd.read_csv(csv)
    df.loc[1, "VENDOR"] = "Hitachi"
    df.to_csv(csv, index=False)
    with pytest.raises(DataError, match="Hitachi"):
        scan_mnms2(tmp_path)
    df.loc[1, "VENDOR"] = "SIEMENS"
    df.loc[len(df)] = [99, "NOR", "SIEMENS", "X", 1.5]
    df.to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"without folder.*\[99\]"):
        scan_mnms2(tmp_path)


def test_prepare_mnms2_then_merge_into_mnms(tmp_path):
    make_mnms(tmp_path / "raw1", subjects=_many_subjects())
    make_mnms2(tmp_path / "raw2")
    kw = dict(
        target_spacing=(2.0, 2.0, 10.0),
        image_size=(16, 16, 4),
        progress=False,
        val_fraction=0.2,
        test_fraction=0.2,
    )
    out = prepare_mnms(tmp_path / "raw1", tmp_path / "out", **kw)
    # M&Ms-2 has single-sample-per-class GE/Philips clients here, merged is fine
    with pytest.raises(DataError, match="different data set"):
        prepare_mnms2(tmp_path / "raw2", out, **kw)
    prepare_mnms2(tmp_path / "raw2", out, merge=True, **kw)
    df = read_manifest(out)
    assert len(df) == 22 and set(df["dataset"]) == {"mnms", "mnms2"}
    assert set(df["vendor"]) == {"Siemens", "Philips", "GE", "Canon"}


def test_prepare_mnms_with_a_vendor_of_diseased_subjects_only(tmp_path, capsys):
    """The real download can have a vendor with one class: prepare writes and warns;
    the federation decides (fed.allow_single_class), also after --merge."""
    from medlora_lib.cli import main

    subjects = _many_subjects() + [
        (f"C{i:05d}", "Validation", "GE", "C", 4, 0, 3, "HCM", True) for i in range(3)
    ]
    make_mnms(tmp_path / "raw", subjects=subjects)
    args = ["--image-size", "16", "16", "4", "--spacing", "2", "2", "10"]
    out = tmp_path / "out"
    assert main(["prepare", "mnms", str(tmp_path / "raw"), str(out), *args]) == 0
    err = capsys.readouterr().err
    assert "warning: client 'GE' (vendor) has a single class" in err
    assert "0 healthy (label 0) and 3 diseased" in err
    assert "fed.allow_single_class=true" in err and "Traceback" not in err
    df = read_manifest(out)
    assert (df["vendor"] == "GE").sum() == 3
    # --merge (M&Ms into an ACDC folder) is not refused either
    from test_loaders_acdc import make_acdc

    make_acdc(tmp_path / "acdc", patients=[(i, "NOR" if i < 3 else "DCM", 1, 4)
                                           for i in range(1, 7)])  # fmt: skip
    merged = tmp_path / "merged"
    assert main(["prepare", "acdc", str(tmp_path / "acdc"), str(merged), *args]) == 0
    cmd = ["prepare", "mnms", str(tmp_path / "raw"), str(merged), *args, "--merge"]
    assert main(cmd) == 0
    assert "'GE' (vendor) has a single class" in capsys.readouterr().err
    assert set(read_manifest(merged)["dataset"]) == {"acdc", "mnms"}
