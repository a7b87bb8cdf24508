"""ACDC loader on tiny hand-made NIfTI fixtures (20 x 20 x 4 x 6 cines with a disc LV)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medlora_lib.data.acdc import prepare_acdc, scan_acdc
from medlora_lib.data.manifest import read_manifest
from medlora_lib.errors import DataError

SHAPE = (20, 20, 4)
SPACING = (2.0, 2.0, 10.0)
N_T = 6


def _save(path, array, spacing=SPACING):
    img = nib.Nifti1Image(array, np.diag([*spacing, 1.0]))
    img.header.set_zooms(tuple(spacing) + (1.0,) * (array.ndim - 3))
    nib.save(img, str(path))


def _acdc_gt(t: int) -> np.ndarray:
    """ACDC map: LV 3 disc at (8, 10) (radius shrinking with t), MYO 2 ring, RV 1."""
    xx, yy = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    d = np.hypot(xx - 8, yy - 10)
    r = 4.0 - 0.3 * t
    gt = np.zeros(SHAPE, np.uint8)
    gt[(d > r) & (d <= r + 1.5)] = 2
    gt[d <= r] = 3
    gt[(xx >= 14) & (yy >= 6) & (yy <= 13)] = 1
    return gt


def _frame(t: int) -> np.ndarray:
    """Frame t: background value 10 * t so ED/ES indices are recognisable."""
    return (10.0 * t + 100.0 * (_acdc_gt(t) == 3)).astype(np.float32)


def make_acdc(
    root,
    patients=((1, "NOR", 1, 4), (2, "DCM", 2, 5)),
    split="training",
    frame_files=True,
    gt=True,
    cine=True,
):
    """Write patients (id, group, ED, ES 1-based) in the official layout."""
    for pid, group, ed, es in patients:
        name = f"patient{pid:03d}"
        folder = root / "database" / split / name
        folder.mkdir(parents=True)
        (folder / "Info.cfg").write_text(
            f"ED: {ed}\nES: {es}\nGroup: {group}\nHeight: 170.0\nNbFrame: {N_T}\n"
            "Weight: 70.0\n"
        )
        if cine:
            _save(
                folder / f"{name}_4d.nii.gz",
                np.stack([_frame(t) for t in range(N_T)], -1),
            )
        for f in (ed, es):
            if frame_files:
                _save(folder / f"{name}_frame{f:02d}.nii.gz", _frame(f - 1))
            if gt:
                _save(folder / f"{name}_frame{f:02d}_gt.nii.gz", _acdc_gt(f - 1))
    return root


def test_scan_and_one_based_frames(tmp_path):
    make_acdc(tmp_path)
    subjects = scan_acdc(tmp_path)
    assert [s.subject_id for s in subjects] == ["acdc_patient001", "acdc_patient002"]
    s = subjects[1]
    assert (s.ed, s.es, s.group, s.label, s.vendor, s.centre) == (
        2,
        5,
        "DCM",
        1,
        "Siemens",
        "Dijon",
    )
    frames, spacing, labels = s.load()
    # ED = 2 (1-based) is time index 1: background 10; ES = 5 -> index 4: background 40
    assert frames[0, 0, 0, 0] == 10.0 and frames[1, 0, 0, 0] == 40.0
    assert spacing == pytest.approx(SPACING)
    assert subjects[0].label == 0


def test_four_d_fallback_is_one_based(tmp_path):
    make_acdc(tmp_path, frame_files=False, gt=False)
    s = scan_acdc(tmp_path)[1]
    frames, _, labels = s.load()
    assert frames[0, 0, 0, 0] == 10.0 and frames[1, 0, 0, 0] == 40.0
    assert labels is None


def test_label_remap_acdc_to_medlora(tmp_path):
    make_acdc(tmp_path)
    _, _, labels = scan_acdc(tmp_path)[0].load()
    gt = _acdc_gt(0)
    assert (labels[0][gt == 3] == 1).all()  # LV
    assert (labels[0][gt == 2] == 2).all()  # MYO
    assert (labels[0][gt == 1] == 3).all()  # RV
    assert (labels[0][gt == 0] == 0).all()


@pytest.mark.parametrize("where", ["root", "database", "training"])
def test_accepts_raw_dir_forms(tmp_path, where):
    make_acdc(tmp_path)
    raw = {
        "root": tmp_path,
        "database": tmp_path / "database",
        "training": tmp_path / "database" / "training",
    }[where]
    assert len(scan_acdc(raw)) == 2


def test_missing_info_cfg(tmp_path):
    make_acdc(tmp_path)
    (tmp_path / "database/training/patient002/Info.cfg").unlink()
    with pytest.raises(DataError, match=r"`Info.cfg` is missing in patient002"):
        scan_acdc(tmp_path)


def test_info_cfg_missing_key(tmp_path):
    make_acdc(tmp_path)
    cfg = tmp_path / "database/training/patient002/Info.cfg"
    cfg.write_text("ES: 5\nGroup: DCM\nNbFrame: 6\n")
    with pytest.raises(
        DataError,
        match=r"`Info.cfg` in patient002 has no `ED` line; expected `ED: <frame number>`",
    ):
        scan_acdc(tmp_path)


def test_ed_outside_cine(tmp_path):
    make_acdc(tmp_path, patients=((1, "NOR", 1, 7),))
    with pytest.raises(DataError, match=r"patient001: ES = 7 is outside.*1-based"):
        scan_acdc(tmp_path)
    # without NbFrame, checked against the 4D volume itself
    cfg = tmp_path / "database/training/patient001/Info.cfg"
    cfg.write_text("ED: 1\nES: 7\nGroup: NOR\n")
    for f in cfg.parent.glob("*frame*"):
        f.unlink()
    with pytest.raises(DataError, match=r"ES = 7 is outside the 4D volume.*6 frames"):
        scan_acdc(tmp_path)


def test_corrupt_and_wrong_ndim_files(tmp_path):
    make_acdc(tmp_path)
    out = tmp_path / "out"
    frame = tmp_path / "database/training/patient002/patient002_frame05.nii.gz"
    raw = frame.read_bytes()
    frame.write_bytes(raw[: len(raw) // 2])  # truncated: header ok, data not
    with pytest.raises(DataError, match=r"patient002_frame05\.nii\.gz"):
        prepare_acdc(tmp_path, out, image_size=(16, 16, 4), progress=False)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["database"]
    _save(frame, np.zeros((*SHAPE, 2), np.float32))  # 4D where a 3D frame belongs
    with pytest.raises(
        DataError, match=r"patient002_frame05\.nii\.gz.*4D.*expected 3D"
    ):
        scan_acdc(tmp_path)


def test_prepare_acdc_end_to_end(tmp_path):
    patients = [(i, "NOR" if i <= 4 else "HCM", 1, 4) for i in range(1, 13)]
    make_acdc(tmp_path / "raw", patients=patients)
    out = prepare_acdc(
        tmp_path / "raw",
        tmp_path / "out",
        target_spacing=(2.0, 2.0, 10.0),
        image_size=(16, 16, 4),
        val_fraction=0.25,
        test_fraction=0.25,
        seed=1,
        progress=False,
    )
    df = read_manifest(out)
    assert len(df) == 12 and set(df["vendor"]) == {"Siemens"}
    assert set(df["dataset"]) == {"acdc"} and set(df["centre"]) == {"Dijon"}
    assert (df["label"] == (df["pathology"] != "NOR")).all()
    assert set(df["split"]) == {"train", "val", "test"}
    with np.load(out / "arrays/acdc_patient001.npz") as z:
        image, label = z["image"], z["label"]
    assert image.shape == label.shape == (2, 16, 16, 4)
    # LV (label 1 after remapping) is centred in the crop at ED
    xs, ys = np.nonzero((label[0] == 1).any(axis=2))
    assert abs(xs.mean() - 7.5) <= 1 and abs(ys.mean() - 7.5) <= 1
    info = json.loads((out / "dataset.json").read_text())
    assert info["preprocessing"]["image_size"] == [16, 16, 4]
    assert info["split"] == {
        "val_fraction": 0.25,
        "test_fraction": 0.25,
        "seed": 1,
        "client_column": "vendor",
    }
