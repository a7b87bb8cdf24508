"""Tests of the ACDC / M&Ms / M&Ms-2 raw-layout writers for synthetic cases."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medlora_lib.data import raw_writers
from medlora_lib.data import synthetic as syn
from medlora_lib.data.mnms2 import scan_mnms2
from medlora_lib.errors import ConfigError, DataError


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


@pytest.fixture(scope="module")
def mnms2_cases(cfg):
    return list(syn.generate_cohort(cfg, parts=("mnms2",)))


def test_mnms2_layout(tmp_path, mnms2_cases):
    cases = mnms2_cases
    # subjects_per_vendor reaches the M&Ms-2 part too; Canon has none
    assert [c.vendor for c in cases] == ["Siemens"] * 3 + ["Philips"] + ["GE"] * 2
    assert all(f"_{c.vendor.lower()}_mnms2_" in c.subject_id for c in cases)
    raw_writers.write_mnms2_layout(cases, tmp_path)
    root = tmp_path / "MnM2"
    csv = root / raw_writers.MNMS2_CSV_NAME  # beside dataset/, as in the download
    assert sorted(p.name for p in root.iterdir()) == ["dataset", csv.name]
    header = csv.read_text().splitlines()[0]
    assert header == "SUBJECT_CODE,DISEASE,VENDOR,SCANNER,FIELD"
    df = pd.read_csv(csv)
    assert df["SUBJECT_CODE"].tolist() == [1, 2, 3, 4, 5, 6]
    siemens, philips, ge = "SIEMENS", "Philips Medical Systems", "GE MEDICAL SYSTEMS"
    assert df["VENDOR"].tolist() == [siemens] * 3 + [philips] + [ge] * 2
    assert df["DISEASE"].tolist() == [c.pathology for c in cases]
    assert set(df["DISEASE"]) <= {"NOR", "LV", "RV", "HCM", "ARR", "FALL", "CIA", "TRI"}
    assert df["SCANNER"].tolist()[0] == "Avanto" and (df["FIELD"] == 1.5).all()
    folders = sorted(p.name for p in (root / "dataset").iterdir())
    assert folders == ["001", "002", "003", "004", "005", "006"]
    case, folder = cases[0], root / "dataset" / "001"
    assert {p.name for p in folder.iterdir()} == {
        "001_SA_CINE.nii.gz", "001_SA_ED.nii.gz", "001_SA_ED_gt.nii.gz",
        "001_SA_ES.nii.gz", "001_SA_ES_gt.nii.gz",
    }  # fmt: skip
    cine = nib.load(folder / "001_SA_CINE.nii.gz")
    assert cine.shape == case.cine.shape and cine.shape[3] == 6
    assert np.array_equal(np.asarray(cine.dataobj), case.cine.astype(np.int16))
    for phase, index, seg in (
        ("ED", case.ed_index, case.seg_ed),
        ("ES", case.es_index, case.seg_es),
    ):
        img = nib.load(folder / f"001_SA_{phase}.nii.gz")
        assert np.allclose(img.header.get_zooms(), case.spacing, atol=1e-4)
        assert np.allclose(img.affine, case.affine, atol=1e-3)
        frame = case.cine[..., index].astype(np.int16)
        assert np.array_equal(np.asarray(img.dataobj), frame)
        gt = np.asarray(nib.load(folder / f"001_SA_{phase}_gt.nii.gz").dataobj)
        assert np.array_equal(gt, seg)  # LV 1, MYO 2, RV 3: the medlora map
    # the loader reads it back: vendors, diseases, ground truth
    subjects = scan_mnms2(tmp_path)
    assert [s.vendor for s in subjects] == [c.vendor for c in cases]
    assert [s.pathology for s in subjects] == [c.pathology for c in cases]
    assert all(s.has_gt for s in subjects)
    frames, _, labels = subjects[0].load()
    assert np.array_equal(frames[1], case.cine[..., case.es_index])
    assert np.array_equal(labels[0], case.seg_ed)
    # refused without overwrite, replaced with it
    with pytest.raises(DataError, match="overwrite"):
        raw_writers.write_mnms2_layout(cases, tmp_path)
    raw_writers.write_mnms2_layout(cases[:2], tmp_path, overwrite=True)
    assert len(pd.read_csv(csv)) == 2 and len(list((root / "dataset").iterdir())) == 2


def test_mnms2_layout_refuses_canon_and_codes_without_a_counterpart(tmp_path, cfg):
    def case(vendor, pathology, part="mnms"):
        return syn.generate_case(cfg, vendor, 0, pathology, part, with_cine=True)

    siemens = case("Siemens", "NOR", "mnms2")
    for bad, match in ((case("Canon", "NOR"), "Canon"), (case("GE", "HHD"), "HHD")):
        with pytest.raises(DataError, match=match):
            raw_writers.write_mnms2_layout([siemens, bad], tmp_path)
        assert list(tmp_path.iterdir()) == []  # atomic: nothing left behind
    with pytest.raises(ConfigError, match="M&Ms-2 has Siemens, Philips, GE"):
        syn.generate_case(cfg, "Canon", 0, "NOR", "mnms2")
    # M&Ms-1 / ACDC codes with an M&Ms-2 counterpart are translated
    cases = [case("GE", "DCM"), case("Philips", "ARV"), case("Siemens", "RV", "acdc")]
    raw_writers.write_mnms2_layout(cases, tmp_path)
    df = pd.read_csv(tmp_path / "MnM2" / raw_writers.MNMS2_CSV_NAME)
    assert df["DISEASE"].tolist() == ["LV", "RV", "RV"]


def test_mnms2_part_is_other_subjects(cfg):
    """The M&Ms-2 part adds people: it leaves the data set's plan unchanged and its
    subjects come from other seed streams than the M&Ms-1 part's."""
    plan = syn.cohort_plan(cfg)
    full = syn.cohort_plan(cfg, ("acdc", "mnms", "mnms2"))
    assert full[: len(plan)] == plan
    assert {s.part for s in full[len(plan) :]} == {"mnms2"}
    assert syn.cohort_plan(cfg, ("mnms2",)) == full[len(plan) :]
    one = syn.generate_case(cfg, "Philips", 0, "NOR", "mnms", with_cine=False)
    two = syn.generate_case(cfg, "Philips", 0, "NOR", "mnms2", with_cine=False)
    assert one.subject_id != two.subject_id
    assert one.metadata["lv_edv_ml"] != two.metadata["lv_edv_ml"]
    assert two.centre == "unknown" and two.ed_index == 0
    with pytest.raises(ConfigError, match="unknown part"):
        syn.cohort_plan(cfg, ("mnms3",))
    sizes = syn.mnms2_sizes(syn.SynthConfig.for_profile("smoke"))
    assert sizes == {"Siemens": 7, "Philips": 7, "GE": 7}  # round(0.06 * 120)
