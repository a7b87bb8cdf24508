"""M&Ms-2 loader (optional "combined M&Ms"): ``MnM2/dataset/NNN/`` to a prepared folder.

Layout (``../shared/reference/datasets.md``): ``MnM2/dataset/NNN/NNN_SA_{ED,ES}.nii.gz``
(+ ``_gt``), metadata ``dataset_information.csv`` with ``SUBJECT_CODE``, ``DISEASE``,
``VENDOR``, ``SCANNER``, ``FIELD`` (vendor strings such as ``SIEMENS``,
``Philips Medical Systems``, ``GE MEDICAL SYSTEMS``). ``DISEASE`` ``NOR`` is label 0,
anything else 1.

**Assumption:** M&Ms-2 ground truth uses the M&Ms-1 map (LV 1, MYO 2, RV 3), i.e. the
medlora map, so no remapping is applied (the public challenge description follows M&Ms-1;
check a few cases visually before trusting segmentation-based crops). The CSV has no
centre column, so ``centre`` is ``"unknown"`` (the scanner model is kept in
``dataset.json`` only as counts). CSV/folder mismatches are handled as for M&Ms-1
(``on_mismatch``). Explained in ``notebooks/01_data_and_vendor_heterogeneity``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medlora_lib.data.manifest import (
    normalise_vendor,
    pathology_to_label,
)
from medlora_lib.data.mnms import OnMismatch, _rename_columns
from medlora_lib.data.nifti import load_nifti, nifti_shape
from medlora_lib.data.preprocess import (
    CropFallback,
    CropMode,
    IntensityMode,
    prepare_subjects,
)
from medlora_lib.errors import DataError

__all__ = ["Mnms2Subject", "scan_mnms2", "prepare_mnms2", "MNMS2_REQUIRED_COLUMNS"]

MNMS2_REQUIRED_COLUMNS = ("SUBJECT_CODE", "DISEASE", "VENDOR")
MNMS2_CSV = "dataset_information.csv"


@dataclass
class Mnms2Subject:
    """One M&Ms-2 subject (``code`` is the 3-digit folder name)."""

    code: str
    folder: Path
    vendor: str
    pathology: str
    scanner: str
    field_strength: str
    has_gt: bool
    dataset: str = "mnms2"
    centre: str = "unknown"

    @property
    def subject_id(self) -> str:
        return f"mnms2_{self.code}"

    @property
    def label(self) -> int:
        return pathology_to_label(self.pathology)

    def file(self, phase: str, gt: bool = False) -> Path:
        return self.folder / f"{self.code}_SA_{phase}{'_gt' if gt else ''}.nii.gz"

    def load(self) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray | None]:
        """ED/ES frames ``(2,X,Y,Z)``, spacing, labels (medlora map) or None."""
        ed, spacing, _ = load_nifti(self.file("ED"), 3)
        es, _, _ = load_nifti(self.file("ES"), 3)
        if ed.shape != es.shape:
            raise DataError(
                f"M&Ms-2 subject {self.code}: ED {ed.shape} and ES {es.shape} differ."
            )
        frames = np.stack([ed, es])
        labels = None
        if self.has_gt:
            gt = np.stack(
                [load_nifti(self.file(p, gt=True), 3)[0] for p in ("ED", "ES")]
            )
            gt = np.rint(gt).astype(np.int64)
            if gt.shape != frames.shape:
                raise DataError(
                    f"M&Ms-2 subject {self.code}: ground truth {gt.shape[1:]} does not "
                    f"match the image grid {frames.shape[1:]}."
                )
            if gt.min() < 0 or gt.max() > 3:
                raise DataError(
                    f"M&Ms-2 subject {self.code}: ground truth holds values "
                    f"{sorted(np.unique(gt))}; expected 0..3 (LV 1, MYO 2, RV 3)."
                )
            labels = gt.astype(np.uint8)
        return frames, spacing, labels


def _resolve(raw_dir: Path) -> tuple[Path, Path]:
    """(folder holding the NNN subject folders, the metadata CSV)."""
    if not raw_dir.is_dir():
        raise DataError(f"M&Ms-2 folder `{raw_dir}` does not exist.")
    for data in (raw_dir / "MnM2" / "dataset", raw_dir / "dataset", raw_dir):
        if data.is_dir() and any(
            p.is_dir() and p.name.isdigit() for p in data.iterdir()
        ):
            break
    else:
        raise DataError(
            f"no M&Ms-2 subject folders (`NNN/`) under `{raw_dir}`; point RAW_DIR at the "
            "folder holding `MnM2/` (or at `MnM2/` / `MnM2/dataset/`)."
        )
    for folder in (data, data.parent, data.parent.parent):
        hits = [p for p in folder.glob("*.csv") if p.name.lower() == MNMS2_CSV]
        if hits:
            return data, hits[0]
    raise DataError(
        f"`{MNMS2_CSV}` not found next to `{data}`; copy it from the download into "
        f"`{data.parent}`."
    )


def scan_mnms2(
    raw_dir: str | Path,
    *,
    on_mismatch: OnMismatch = "error",
    skip_unlisted: bool = False,
) -> list[Mnms2Subject]:
    """Find and validate M&Ms-2 subjects (header-level checks only).

    Raises:
        DataError: missing CSV / columns, unknown vendor, CSV-folder mismatch (unless
            ``on_mismatch="skip"``), missing or wrongly-dimensioned files.
    """
    if skip_unlisted:
        on_mismatch = "skip"
    if on_mismatch not in ("error", "skip"):
        raise DataError(f"on_mismatch={on_mismatch!r}; use 'error' or 'skip'.")
    data, csv = _resolve(Path(raw_dir))
    try:
        df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot parse `{csv}` ({exc}).") from exc
    df = _rename_columns(df, (*MNMS2_REQUIRED_COLUMNS, "SCANNER", "FIELD"))
    missing = [c for c in MNMS2_REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(
            f"`{csv}` has no column(s) {missing}; required: "
            f"{list(MNMS2_REQUIRED_COLUMNS)} (SCANNER, FIELD optional)."
        )
    folders = {
        int(p.name): p for p in data.iterdir() if p.is_dir() and p.name.isdigit()
    }
    rows = {}
    for i, row in df.iterrows():
        raw_code = row["SUBJECT_CODE"].strip()
        if not raw_code:
            continue
        where = f"`{csv.name}` row {i + 2} (SUBJECT_CODE {raw_code})"
        try:
            number = int(float(raw_code))
        except ValueError as exc:
            raise DataError(f"{where}: SUBJECT_CODE is not a number.") from exc
        try:
            vendor = normalise_vendor(row["VENDOR"])
        except DataError as exc:
            raise DataError(f"{where}, column `VENDOR`: {exc}") from exc
        if number in rows:
            raise DataError(f"{where}: subject listed twice.")
        rows[number] = (row, vendor)
    no_folder = sorted(set(rows) - set(folders))
    no_row = sorted(set(folders) - set(rows))
    if no_folder or no_row:
        msg = (
            f"{len(no_folder)} subject(s) in `{csv.name}` without folder (first: "
            f"{no_folder[:10]}); {len(no_row)} folder(s) not in the CSV (first: "
            f"{no_row[:10]})"
        )
        if on_mismatch == "error":
            raise DataError(
                f"the M&Ms-2 CSV and the folders under `{data}` disagree: {msg}. "
                "Complete the download or pass on_mismatch='skip' (CLI `--skip-unlisted`)."
            )
        warnings.warn(f"M&Ms-2: skipping unmatched subjects: {msg}.", stacklevel=2)
    subjects = []
    for number in sorted(set(rows) & set(folders)):
        row, vendor = rows[number]
        folder = folders[number]
        subject = Mnms2Subject(
            code=folder.name,
            folder=folder,
            vendor=vendor,
            pathology=row["DISEASE"].strip(),
            scanner=str(row.get("SCANNER", "")).strip(),
            field_strength=str(row.get("FIELD", "")).strip(),
            has_gt=False,
        )
        if not subject.pathology:
            raise DataError(
                f"`{csv.name}`: subject {folder.name} has an empty DISEASE."
            )
        shapes = {nifti_shape(subject.file(p), 3) for p in ("ED", "ES")}
        gts = [subject.file(p, gt=True) for p in ("ED", "ES")]
        subject.has_gt = all(g.is_file() for g in gts)
        if subject.has_gt:
            for g in gts:
                if nifti_shape(g, 3) not in shapes:
                    raise DataError(f"`{g}` is not on the grid of its image {shapes}.")
        subjects.append(subject)
    return subjects


def prepare_mnms2(
    raw_dir: str | Path,
    out_dir: str | Path,
    *,
    target_spacing: Sequence[float] = (3.0, 3.0, 10.0),
    image_size: Sequence[int] = (48, 48, 8),
    val_fraction: float = 0.15,
    test_fraction: float = 0.25,
    seed: int = 0,
    client_column: str = "vendor",
    crop_fallback: CropFallback = "center",
    crop: CropMode = "lv_centred",
    intensity: IntensityMode = "joint",
    on_mismatch: OnMismatch = "error",
    skip_unlisted: bool = False,
    overwrite: bool = False,
    merge: bool = False,
    progress: bool = True,
) -> Path:
    """Prepare M&Ms-2 (``medlora prepare mnms2 RAW_DIR OUT_DIR``); options as
    :func:`~medlora_lib.data.mnms.prepare_mnms`.

    Returns:
        ``out_dir``.

    Raises:
        DataError: bad raw data or an incompatible ``OUT_DIR``; nothing is half-written.
    """
    subjects = scan_mnms2(raw_dir, on_mismatch=on_mismatch, skip_unlisted=skip_unlisted)
    scanners: dict[str, int] = {}
    for s in subjects:
        scanners[s.scanner] = scanners.get(s.scanner, 0) + 1
    return prepare_subjects(
        subjects,
        out_dir,
        source={
            "name": "mnms2",
            "raw_dir": str(Path(raw_dir).absolute()),
            "n": len(subjects),
            "scanners": scanners,
            "label_map_assumption": "LV 1, MYO 2, RV 3 (as M&Ms-1)",
        },
        target_spacing=target_spacing,
        image_size=image_size,
        crop_fallback=crop_fallback,
        crop=crop,
        intensity=intensity,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        client_column=client_column,
        overwrite=overwrite,
        merge=merge,
        progress=progress,
        desc="M&Ms-2",
    )
