"""Write synthetic cases in the official ACDC, M&Ms-1 and M&Ms-2 download layouts.

With these, the real-data loaders (:mod:`medlora_lib.data.acdc`,
:mod:`medlora_lib.data.mnms`, :mod:`medlora_lib.data.mnms2`) and ``medlora prepare`` can
be exercised end to end without downloading anything. The layouts follow
``../shared/reference/datasets.md``:

* **ACDC**: ``database/{training,testing}/patientXXX/`` with ``Info.cfg`` (1-based
  ``ED`` / ``ES`` frame numbers), ``patientXXX_4d.nii.gz`` (x, y, z, t) and
  ``patientXXX_frameYY[_gt].nii.gz`` at ED and ES; ground truth in the ACDC label map
  (RV 1, MYO 2, LV 3). The first 100 cases go to ``training``, the rest to ``testing``.
* **M&Ms-1**: ``OpenDataset/{Training/Labeled, Training/Unlabeled, Validation,
  Testing}/<CODE>/<CODE>_sa.nii.gz`` (4D cine) and ``<CODE>_sa_gt.nii.gz`` (4D, labels at
  ED and ES only, M&Ms map LV 1, MYO 2, RV 3), plus the metadata CSV with 0-based ``ED`` /
  ``ES``. Cases are distributed over the folders per vendor in the proportions of the
  real open set (Siemens 75/5/15, Philips 75/10/40, GE 25/10/40 with its training cases
  unlabelled, Canon 0/10/40 for training/validation/testing).
* **M&Ms-2**: ``MnM2/dataset/NNN/NNN_SA_{ED,ES}.nii.gz`` (3D frames),
  ``NNN_SA_{ED,ES}_gt.nii.gz`` (M&Ms map LV 1, MYO 2, RV 3, as the loader assumes) and
  ``NNN_SA_CINE.nii.gz`` (the whole cine), numbered 001, 002, ... in the order the cases
  come, plus ``MnM2/dataset_information.csv`` (``SUBJECT_CODE, DISEASE, VENDOR, SCANNER,
  FIELD``) with the real file's vendor strings (``SIEMENS``, ``Philips Medical
  Systems``, ``GE MEDICAL SYSTEMS``) and M&Ms-2 disease codes
  (:data:`MNMS2_DISEASE_FROM`). The long-axis (``LA``) files of the real download are
  not written (no loader reads them).

All three writers stream (one case in memory at a time) and are atomic: the layout is
written into a hidden temporary folder and renamed at the end. Explained in
``book/synthetic_data.md``.
"""

from __future__ import annotations

import itertools
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
import pandas as pd

from medlora_lib.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from medlora_lib.data.synthetic import RawCase

__all__ = [
    "ACDC_FROM_MEDLORA",
    "MNMS_CSV_NAME",
    "MNMS_CSV_COLUMNS",
    "MNMS_FOLDER_SHARES",
    "MNMS2_CSV_NAME",
    "MNMS2_CSV_COLUMNS",
    "MNMS2_VENDOR_NAMES",
    "MNMS2_SCANNERS",
    "MNMS2_DISEASE_FROM",
    "write_acdc_layout",
    "write_mnms_layout",
    "write_mnms2_layout",
]

#: medlora label (index) -> ACDC label: LV 1 -> 3, MYO 2 -> 2, RV 3 -> 1.
ACDC_FROM_MEDLORA = np.array([0, 3, 2, 1], dtype=np.uint8)
MNMS_CSV_NAME = "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv"
MNMS_CSV_COLUMNS = (
    "External code", "VendorName", "Vendor", "Centre", "ED", "ES",
    "Age", "Pathology", "Sex", "Height", "Weight",
)  # fmt: skip
#: Training / Validation / Testing shares per vendor in the real open M&Ms-1 set.
MNMS_FOLDER_SHARES = {
    "Siemens": (75, 5, 15),
    "Philips": (75, 10, 40),
    "GE": (25, 10, 40),
    "Canon": (0, 10, 40),
}
_VENDOR_LETTER = {"Siemens": "A", "Philips": "B", "GE": "C", "Canon": "D"}
MNMS2_CSV_NAME = "dataset_information.csv"
MNMS2_CSV_COLUMNS = ("SUBJECT_CODE", "DISEASE", "VENDOR", "SCANNER", "FIELD")
#: medlora vendor -> the VENDOR string of the real M&Ms-2 CSV (M&Ms-2 has no Canon).
MNMS2_VENDOR_NAMES = {
    "Siemens": "SIEMENS",
    "Philips": "Philips Medical Systems",
    "GE": "GE MEDICAL SYSTEMS",
}
#: (SCANNER, FIELD in T) written per vendor: plausible 1.5 T models of these vendors,
#: not taken from the real file (the synthetic appearance does not depend on them).
MNMS2_SCANNERS = {
    "Siemens": ("Avanto", 1.5),
    "Philips": ("Achieva", 1.5),
    "GE": ("Signa HDxt", 1.5),
}
#: Case pathology -> M&Ms-2 ``DISEASE`` code. M&Ms-2 codes pass unchanged; the ACDC /
#: M&Ms-1 codes with an M&Ms-2 counterpart are translated (DCM -> LV dilated LV, ARV
#: and ACDC's RV -> RV dilated RV). The others (MINF, IHD, HHD, AHS, LVNC, Other) have
#: none and are refused rather than relabelled.
MNMS2_DISEASE_FROM = {
    **{c: c for c in ("NOR", "LV", "RV", "HCM", "ARR", "FALL", "CIA", "TRI")},
    "DCM": "LV",
    "ARV": "RV",
}
_ACDC_TRAINING = 100
_FRAME_MS = 35.0  # nominal temporal resolution written in pixdim[4]


def _nifti(data: np.ndarray, case: RawCase, dtype, time_axis: bool) -> nib.Nifti1Image:
    img = nib.Nifti1Image(np.asarray(data).astype(dtype), case.affine)
    spacing = tuple(float(s) for s in case.spacing)
    img.header.set_zooms(spacing + ((_FRAME_MS,) if time_axis else ()))
    img.header.set_xyzt_units("mm", "msec")
    img.header.set_qform(case.affine, code=1)
    img.header.set_sform(case.affine, code=1)
    return img


def _require_cine(case: RawCase) -> None:
    if not case.has_cine:
        raise DataError(
            f"case {case.subject_id} has no cine (only ED/ES frames); raw layouts need "
            "the whole cine: generate with with_cine=True."
        )


@contextmanager
def _staged(raw_dir: Path, top: str, overwrite: bool) -> Iterator[Path]:
    """A hidden staging folder beside ``raw_dir/top``: renamed to it when the block
    ends, removed (nothing left behind) when it raises.

    Raises:
        DataError: ``raw_dir/top`` exists and ``overwrite`` is False.
    """
    raw_dir = Path(raw_dir).absolute()
    final = raw_dir / top
    if final.exists() and not overwrite:
        raise DataError(
            f"`{final}` already exists; pass overwrite=True (--overwrite) to replace it, "
            "or choose another folder."
        )
    raw_dir.mkdir(parents=True, exist_ok=True)
    tmp = raw_dir / f".{top}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def write_acdc_layout(
    cases: Iterable[RawCase], raw_dir: str | Path, overwrite: bool = False
) -> Path:
    """Write ACDC-like cases in the official ACDC layout under ``raw_dir/database``.

    Args:
        cases: cases with a whole cine, in order (numbered patient001, patient002, ...).
        raw_dir: the folder that will hold ``database/``.
        overwrite: replace an existing ``raw_dir/database``.

    Returns:
        ``raw_dir`` as a Path.

    Raises:
        DataError: a case has no cine, or ``database/`` exists and ``overwrite`` is False.
    """
    raw_dir = Path(raw_dir)
    with _staged(raw_dir, "database", overwrite) as tmp:
        for number, case in enumerate(cases, start=1):
            _require_cine(case)
            split = "training" if number <= _ACDC_TRAINING else "testing"
            name = f"patient{number:03d}"
            folder = tmp / split / name
            folder.mkdir(parents=True)
            meta = case.metadata
            n_frames = case.cine.shape[-1]
            (folder / "Info.cfg").write_text(
                f"ED: {case.ed_index + 1}\n"
                f"ES: {case.es_index + 1}\n"
                f"Group: {case.pathology}\n"
                f"Height: {meta.get('height_cm', 170.0):.1f}\n"
                f"NbFrame: {n_frames}\n"
                f"Weight: {meta.get('weight_kg', 75.0):.1f}\n"
            )
            nib.save(
                _nifti(case.cine, case, np.int16, True), folder / f"{name}_4d.nii.gz"
            )
            for index, seg in (
                (case.ed_index, case.seg_ed),
                (case.es_index, case.seg_es),
            ):
                stem = folder / f"{name}_frame{index + 1:02d}"
                frame = case.cine[..., index]
                nib.save(_nifti(frame, case, np.int16, False), f"{stem}.nii.gz")
                gt = ACDC_FROM_MEDLORA[seg]
                nib.save(_nifti(gt, case, np.uint8, False), f"{stem}_gt.nii.gz")
    return raw_dir


def _mnms_folder(vendor: str, position: int, n: int) -> str:
    train, val, test = MNMS_FOLDER_SHARES[vendor]
    f = (position + 0.5) / max(n, 1)
    total = train + val + test
    if f < train / total:
        return "Training/Unlabeled" if vendor == "GE" else "Training/Labeled"
    if f < (train + val) / total:
        return "Validation"
    return "Testing"


def write_mnms_layout(
    cases: Iterable[RawCase], raw_dir: str | Path, overwrite: bool = False
) -> Path:
    """Write M&Ms-like cases in the official M&Ms-1 layout under ``raw_dir/OpenDataset``.

    Each vendor's cases are distributed over Training / Validation / Testing in the
    proportions of :data:`MNMS_FOLDER_SHARES` (in the order they come); GE training cases
    go to ``Training/Unlabeled`` without a ``_gt`` file (their diagnosis stays in the
    CSV). Codes are the cases' 6-character ``mnms_code`` (made unique if they collide).

    Args:
        cases: cases with a whole cine.
        raw_dir: the folder that will hold ``OpenDataset/``.
        overwrite: replace an existing ``raw_dir/OpenDataset``.

    Returns:
        ``raw_dir`` as a Path.

    Raises:
        DataError: a case has no cine, or ``OpenDataset/`` exists and ``overwrite`` is
            False.
    """
    raw_dir = Path(raw_dir)
    cases = iter(cases)
    first = next(cases, None)
    head = [] if first is None else [first]
    if first is not None and "part_size" in first.metadata:
        # cases from generate_cohort know their place: stream them one at a time
        stream = itertools.chain(head, cases)
        sizes = None
    else:  # count per vendor first (keeps the cases in memory)
        stream = head + list(cases)
        sizes = {}
        for case in stream:
            sizes[case.vendor] = sizes.get(case.vendor, 0) + 1
    rows, seen, position = [], set(), {}
    with _staged(raw_dir, "OpenDataset", overwrite) as tmp:
        for case in stream:
            _require_cine(case)
            code = str(case.metadata.get("mnms_code") or case.subject_id[-6:]).upper()
            while code in seen:  # deterministic de-duplication
                code = code[:-1] + str(
                    (int(code[-1]) + 1) % 10 if code[-1].isdigit() else 0
                )
            seen.add(code)
            if sizes is None:
                index, n = case.metadata["part_index"], case.metadata["part_size"]
            else:
                index, n = position.get(case.vendor, 0), sizes[case.vendor]
                position[case.vendor] = index + 1
            sub = _mnms_folder(case.vendor, index, n)
            folder = tmp / sub / code
            folder.mkdir(parents=True)
            nib.save(
                _nifti(case.cine, case, np.int16, True), folder / f"{code}_sa.nii.gz"
            )
            if sub != "Training/Unlabeled":
                gt = np.zeros(case.cine.shape, dtype=np.uint8)
                gt[..., case.ed_index] = case.seg_ed
                gt[..., case.es_index] = case.seg_es
                nib.save(
                    _nifti(gt, case, np.uint8, True), folder / f"{code}_sa_gt.nii.gz"
                )
            meta = case.metadata
            rows.append(
                {
                    "External code": code,
                    "VendorName": case.vendor,
                    "Vendor": _VENDOR_LETTER[case.vendor],
                    "Centre": int(case.centre),
                    "ED": case.ed_index,
                    "ES": case.es_index,
                    "Age": meta.get("age", ""),
                    "Pathology": case.pathology,
                    "Sex": meta.get("sex", ""),
                    "Height": round(float(meta.get("height_cm", 170.0)), 1),
                    "Weight": round(float(meta.get("weight_kg", 75.0)), 1),
                }
            )
        df = pd.DataFrame(rows, columns=list(MNMS_CSV_COLUMNS))
        df.to_csv(tmp / MNMS_CSV_NAME, index=True)
    return raw_dir


def _mnms2_disease(case: RawCase) -> str:
    if case.vendor not in MNMS2_VENDOR_NAMES:
        raise DataError(
            f"case {case.subject_id} is a {case.vendor} subject, but M&Ms-2 has no "
            f"{case.vendor} scanners (its vendors: {', '.join(MNMS2_VENDOR_NAMES)}); "
            "write it with write_mnms_layout, or generate the M&Ms-2 part with "
            "generate_cohort(config, parts=('mnms2',))."
        )
    code = MNMS2_DISEASE_FROM.get(case.pathology)
    if code is None:
        raise DataError(
            f"case {case.subject_id} has pathology {case.pathology!r}, which has no "
            f"M&Ms-2 code (accepted: {', '.join(MNMS2_DISEASE_FROM)}); generate the "
            "M&Ms-2 part with generate_cohort(config, parts=('mnms2',))."
        )
    return code


def write_mnms2_layout(
    cases: Iterable[RawCase], raw_dir: str | Path, overwrite: bool = False
) -> Path:
    """Write M&Ms-2-like cases in the official M&Ms-2 layout under ``raw_dir/MnM2``.

    Cases are numbered ``001``, ``002``, ... in the order they come; each folder
    ``MnM2/dataset/NNN/`` holds the ED and ES frames, their ground truth and the whole
    cine; ``MnM2/dataset_information.csv`` (where the download keeps it, beside
    ``dataset/``) lists ``SUBJECT_CODE`` (the number), ``DISEASE``
    (:data:`MNMS2_DISEASE_FROM`), ``VENDOR`` (:data:`MNMS2_VENDOR_NAMES`), ``SCANNER``
    and ``FIELD`` (:data:`MNMS2_SCANNERS`).

    Args:
        cases: cases with a whole cine, of the M&Ms-2 vendors (Siemens, Philips, GE).
        raw_dir: the folder that will hold ``MnM2/``.
        overwrite: replace an existing ``raw_dir/MnM2``.

    Returns:
        ``raw_dir`` as a Path.

    Raises:
        DataError: a case has no cine, is a Canon case (M&Ms-2 has no Canon: refused,
            not skipped, so that a wrong cohort is noticed), has a pathology without an
            M&Ms-2 code, or ``MnM2/`` exists and ``overwrite`` is False. Nothing is
            left behind.
    """
    raw_dir = Path(raw_dir)
    rows = []
    with _staged(raw_dir, "MnM2", overwrite) as tmp:
        for number, case in enumerate(cases, start=1):
            _require_cine(case)
            disease = _mnms2_disease(case)
            code = f"{number:03d}"
            folder = tmp / "dataset" / code
            folder.mkdir(parents=True)
            nib.save(
                _nifti(case.cine, case, np.int16, True),
                folder / f"{code}_SA_CINE.nii.gz",
            )
            for phase, index, seg in (
                ("ED", case.ed_index, case.seg_ed),
                ("ES", case.es_index, case.seg_es),
            ):
                stem = folder / f"{code}_SA_{phase}"
                frame = case.cine[..., index]
                nib.save(_nifti(frame, case, np.int16, False), f"{stem}.nii.gz")
                # M&Ms map (LV 1, MYO 2, RV 3) = the medlora map: no remapping
                nib.save(_nifti(seg, case, np.uint8, False), f"{stem}_gt.nii.gz")
            scanner, field = MNMS2_SCANNERS[case.vendor]
            rows.append(
                {
                    "SUBJECT_CODE": number,
                    "DISEASE": disease,
                    "VENDOR": MNMS2_VENDOR_NAMES[case.vendor],
                    "SCANNER": scanner,
                    "FIELD": field,
                }
            )
        df = pd.DataFrame(rows, columns=list(MNMS2_CSV_COLUMNS))
        df.to_csv(tmp / MNMS2_CSV_NAME, index=False)
    return raw_dir
