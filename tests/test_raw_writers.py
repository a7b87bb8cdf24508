"""Tests of the ACDC / M&Ms raw-layout writers for synthetic cases."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medlora_lib.data import raw_writers
from medlora_lib.data import synthetic as syn
from medlora_lib.errors import DataError


@pytest.fixture(scope="module")
def cfg() -> syn.SynthConfig:
    return syn.SynthConfig.for_profile(
        "smoke",
        cine_frames=6,
        subjects_per_vendor={"Siemens": 3, "Philips": 1, "GE": 2, "Canon": 1},
    )


@pytest.fixture(scope="module")
def acdc_cases(cfg):
    return list(syn.generate_cohort(cfg, parts=("acdc",)))


def test_acdc_layout(tmp_path, acdc_cases, monkeypatch):
    monkeypatch.setattr(raw_writers, "_ACDC_TRAINING", 1)  # 1 training, rest testing
    assert len(acdc_cases) == 2
    raw_writers.write_acdc_layout(acdc_cases, tmp_path)
    db = tmp_path / "database"
    assert sorted(p.name for p in (db / "training").iterdir()) == ["patient001"]
    assert sorted(p.name for p in (db / "testing").iterdir()) == ["patient002"]
    case, folder = acdc_cases[0], db / "training" / "patient001"
    info = dict(
        line.split(": ", 1) for line in (folder / "Info.cfg").read_text().splitlines()
    )
    assert list(info) == ["ED", "ES", "Group", "Height", "NbFrame", "Weight"]
    assert int(info["ED"]) == case.ed_index + 1 and int(info["ES"]) == case.es_index + 1
    assert info["Group"] == case.pathology and int(info["NbFrame"]) == 6
    ed = int(info["ED"])
    names = {p.name for p in folder.iterdir()}
    assert {
        "patient001_4d.nii.gz",
        f"patient001_frame{ed:02d}.nii.gz",
        f"patient001_frame{ed:02d}_gt.nii.gz",
        f"patient001_frame{int(info['ES']):02d}_gt.nii.gz",
    } <= names
    img4d = nib.load(folder / "patient001_4d.nii.gz")
    assert img4d.shape == case.cine.shape and img4d.shape[3] == 6
    assert np.allclose(img4d.header.get_zooms()[:3], case.spacing, atol=1e-4)
    assert np.allclose(img4d.affine, case.affine, atol=1e-3)
    assert np.array_equal(np.asarray(img4d.dataobj), case.cine.astype(np.int16))
    gt = np.asarray(nib.load(folder / f"patient001_frame{ed:02d}_gt.nii.gz").dataobj)
    # ACDC label map: RV 1, MYO 2, LV 3
    assert np.array_equal(gt == 3, case.seg_ed == 1)
    assert np.array_equal(gt == 1, case.seg_ed == 3)
    assert np.array_equal(gt == 2, case.seg_ed == 2)
    frame = np.asarray(nib.load(folder / f"patient001_frame{ed:02d}.nii.gz").dataobj)
    assert np.array_equal(frame, case.cine[..., case.ed_index].astype(np.int16))
    with pytest.raises(DataError, match="overwrite"):
        raw_writers.write_acdc_layout(acdc_cases, tmp_path)
    # needs a cine
    no_cine = syn.generate_case(syn.SynthConfig(), "Siemens", 0, "NOR", part="acdc")
    with pytest.raises(DataError, match="cine"):
        raw_writers.write_acdc_layout([no_cine], tmp_path / "x")
    assert not (tmp_path / "x" / "database").exists()  # atomic: nothing left behind


def test_mnms_layout(tmp_path, cfg):
    cases = list(syn.generate_cohort(cfg, parts=("mnms",)))
    assert [c.vendor for c in cases] == ["Siemens", "Philips", "GE", "GE", "Canon"]
    syn.make_synthetic(tmp_path, cfg, layout="mnms")
    root = tmp_path / "OpenDataset"
    csv = root / raw_writers.MNMS_CSV_NAME
    header = csv.read_text().splitlines()[0].split(",")
    assert header == [""] + list(raw_writers.MNMS_CSV_COLUMNS)
    df = pd.read_csv(csv, index_col=0)
    assert len(df) == 5 and df["External code"].str.fullmatch(r"[A-Z0-9]{6}").all()
    assert df["Vendor"].tolist() == ["A", "B", "C", "C", "D"]
    assert df["Centre"].tolist()[0] == 1 and df["Centre"].tolist()[2:] == [4, 4, 5]
    assert (df["ED"] == [c.ed_index for c in cases]).all()  # 0-based
    assert (df["ES"] == [c.es_index for c in cases]).all()
    folders = {p.parent.name: p.parent.parent for p in root.rglob("*_sa.nii.gz")}
    ge_first = df["External code"].iloc[2]
    assert folders[ge_first].relative_to(root).as_posix() == "Training/Unlabeled"
    assert not (folders[ge_first] / ge_first / f"{ge_first}_sa_gt.nii.gz").exists()
    code, case = df["External code"].iloc[0], cases[0]
    sub = folders[code] / code
    sa = nib.load(sub / f"{code}_sa.nii.gz")
    gt = np.asarray(nib.load(sub / f"{code}_sa_gt.nii.gz").dataobj)
    assert sa.shape == case.cine.shape and gt.shape == case.cine.shape
    assert np.allclose(sa.header.get_zooms()[:3], case.spacing, atol=1e-4)
    labelled = [t for t in range(gt.shape[3]) if gt[..., t].any()]
    assert labelled == sorted({case.ed_index, case.es_index})
    assert np.array_equal(gt[..., case.ed_index], case.seg_ed)  # M&Ms map = medlora map
    assert {p.name for p in root.iterdir() if p.is_dir()} <= {
        "Training", "Validation", "Testing"
    }  # fmt: skip


def test_make_synthetic_acdc_layout_only_acdc_part(tmp_path, cfg):
    syn.make_synthetic(tmp_path, cfg, layout="acdc")
    patients = sorted(p.name for p in (tmp_path / "database" / "training").iterdir())
    assert patients == ["patient001", "patient002"]
    assert not (tmp_path / "OpenDataset").exists()
