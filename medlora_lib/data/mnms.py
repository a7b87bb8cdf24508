"""M&Ms-1 loader: the official ``OpenDataset/`` layout to a prepared data folder.

Layout (``../shared/reference/datasets.md``):
``OpenDataset/{Training/Labeled, Training/Unlabeled, Validation, Testing}/<CODE>/``
holding ``<CODE>_sa.nii.gz`` (4D cine) and ``<CODE>_sa_gt.nii.gz`` (4D labels, filled at ED
and ES). Metadata CSV found by glob (``*M&Ms*Dataset*Info*.csv``, else any ``*.csv`` with
the required columns, matched case-insensitively); its ``ED`` / ``ES`` are **0-based**
indices into the time axis. Labels are already in the medlora map (LV 1, MYO 2, RV 3).
Subjects without ground truth (unlabelled GE training cases) keep their images and use the
no-label crop fallback of :func:`~medlora_lib.data.preprocess.preprocess_case`.

CSV and folders must agree: by default a subject listed in the CSV without a folder, or a
folder not listed in the CSV, is an error listing them; ``on_mismatch="skip"`` warns and
skips them instead. Explained in ``notebooks/01_data_and_vendor_heterogeneity``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from medlora_lib.data.manifest import (
    normalise_vendor,
    pathology_to_label,
)
from medlora_lib.data.nifti import load_nifti_frames, nifti_shape
from medlora_lib.data.preprocess import (
    CropFallback,
    CropMode,
    IntensityMode,
    prepare_subjects,
)
from medlora_lib.errors import DataError

__all__ = [
    "MnmsSubject",
    "scan_mnms",
    "prepare_mnms",
    "find_mnms_csv",
    "read_mnms_csv",
    "MNMS_REQUIRED_COLUMNS",
]

MNMS_REQUIRED_COLUMNS = (
    "External code",
    "VendorName",
    "Vendor",
    "Centre",
    "ED",
    "ES",
    "Pathology",
)
OnMismatch = Literal["error", "skip"]


def _norm(col: object) -> str:
    return " ".join(str(col).strip().lower().split())


def _rename_columns(df: pd.DataFrame, required: Sequence[str]) -> pd.DataFrame:
    lookup = {_norm(c): c for c in df.columns}
    return df.rename(
        columns={lookup[_norm(r)]: r for r in required if _norm(r) in lookup}
    )


def _has_columns(path: Path, required: Sequence[str]) -> bool:
    try:
        head = pd.read_csv(path, nrows=0)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError, ValueError):
        return False
    have = {_norm(c) for c in head.columns}
    return all(_norm(r) in have for r in required)


def find_mnms_csv(root: Path) -> Path:
    """Find the M&Ms metadata CSV in or one level around ``root``.

    Preference: names matching ``*M&Ms*Dataset*Info*`` (case-insensitive) with the
    required columns, newest name first (the files start with a date, ``211230_...``);
    then any CSV with the required columns.

    Raises:
        DataError: no candidate CSV, or candidates lacking required columns.
    """
    candidates: list[Path] = []
    for folder in (root, root.parent):
        candidates += sorted(folder.glob("*.csv"))
    candidates += sorted(root.glob("*/*.csv"))
    candidates = list(dict.fromkeys(candidates))
    if not candidates:
        raise DataError(
            f"no M&Ms metadata CSV found in `{root}` (expected e.g. "
            "`211230_M&Ms_Dataset_information_diagnosis_opendataset.csv`); copy it "
            "next to `OpenDataset/` or pass csv_path=."
        )

    def named(p: Path) -> bool:
        n = p.name.lower()
        return all(k in n for k in ("m&ms", "dataset", "info"))

    good = [p for p in candidates if _has_columns(p, MNMS_REQUIRED_COLUMNS)]
    preferred = sorted(
        (p for p in good if named(p)), key=lambda p: p.name, reverse=True
    )
    if preferred:
        return preferred[0]
    if good:
        return good[0]
    named_bad = [p for p in candidates if named(p)] or candidates
    head = pd.read_csv(named_bad[0], nrows=0)
    missing = [
        r
        for r in MNMS_REQUIRED_COLUMNS
        if _norm(r) not in {_norm(c) for c in head.columns}
    ]
    raise DataError(
        f"the M&Ms metadata CSV `{named_bad[0]}` has no column(s) {missing}; required "
        f"columns: {list(MNMS_REQUIRED_COLUMNS)} (matched case-insensitively). Use the "
        "official CSV from the download."
    )


def read_mnms_csv(path: Path) -> pd.DataFrame:
    """Read the metadata CSV with canonical column names and checked values.

    Returns one row per subject with columns ``code, vendor, centre, ed, es, pathology``
    (``vendor`` normalised; ``ed`` / ``es`` 0-based ints).

    Raises:
        DataError: missing columns, unknown vendor, non-integer ED/ES, empty pathology,
            duplicate codes.
    """
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot parse the M&Ms CSV `{path}` ({exc}).") from exc
    df = _rename_columns(df, MNMS_REQUIRED_COLUMNS)
    missing = [c for c in MNMS_REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(
            f"the M&Ms metadata CSV `{path}` has no column(s) {missing}; required: "
            f"{list(MNMS_REQUIRED_COLUMNS)}."
        )
    rows = []
    for i, row in df.iterrows():
        code = row["External code"].strip()
        if not code:
            continue
        where = f"`{path.name}` row {i + 2} ({code})"
        name = row["VendorName"].strip() or row["Vendor"].strip()
        try:
            vendor = normalise_vendor(name)
        except DataError as exc:
            raise DataError(f"{where}, column `VendorName`: {exc}") from exc
        ed_es = {}
        for key in ("ED", "ES"):
            try:
                ed_es[key] = int(float(row[key]))
            except ValueError as exc:
                raise DataError(
                    f"{where}: `{key}` = {row[key]!r} is not a frame index (0-based)."
                ) from exc
        pathology = row["Pathology"].strip()
        if not pathology:
            raise DataError(f"{where}: `Pathology` is empty; expected e.g. NOR, DCM.")
        rows.append(
            {
                "code": code,
                "vendor": vendor,
                "centre": row["Centre"].strip(),
                "ed": ed_es["ED"],
                "es": ed_es["ES"],
                "pathology": pathology,
            }
        )
    out = pd.DataFrame(
        rows, columns=["code", "vendor", "centre", "ed", "es", "pathology"]
    )
    dups = sorted(out.loc[out["code"].duplicated(), "code"])
    if dups:
        raise DataError(f"`{path}` lists code(s) {dups[:5]} more than once.")
    return out


@dataclass
class MnmsSubject:
    """One M&Ms-1 subject (``ed`` / ``es`` are 0-based, as in the CSV)."""

    code: str
    folder: Path
    vendor: str
    centre: str
    pathology: str
    ed: int
    es: int
    n_frames: int
    has_gt: bool
    official_split: str
    dataset: str = "mnms"

    @property
    def subject_id(self) -> str:
        return f"mnms_{self.code}"

    @property
    def label(self) -> int:
        return pathology_to_label(self.pathology)

    @property
    def image_file(self) -> Path:
        return self.folder / f"{self.code}_sa.nii.gz"

    @property
    def gt_file(self) -> Path:
        return self.folder / f"{self.code}_sa_gt.nii.gz"

    def load(self) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray | None]:
        """ED/ES frames ``(2,X,Y,Z)``, spacing, labels (medlora map) or None."""
        n_t = nifti_shape(self.image_file, 4)[3]
        _check_frames(self.code, self.ed, self.es, n_t, self.image_file)
        frames, spacing, _ = load_nifti_frames(self.image_file, (self.ed, self.es))
        labels = None
        if self.has_gt:
            n_t = nifti_shape(self.gt_file, 4)[3]
            _check_frames(self.code, self.ed, self.es, n_t, self.gt_file)
            gt, _, _ = load_nifti_frames(self.gt_file, (self.ed, self.es))
            gt = np.rint(gt).astype(np.int64)
            if gt.shape != frames.shape:
                raise DataError(
                    f"`{self.gt_file}` grid {gt.shape[1:]} does not match the image "
                    f"{frames.shape[1:]}."
                )
            if gt.min() < 0 or gt.max() > 3:
                raise DataError(
                    f"`{self.gt_file}` holds values {sorted(np.unique(gt))}; M&Ms labels "
                    "are 0 background, 1 LV, 2 MYO, 3 RV."
                )
            labels = gt.astype(np.uint8)
            if not labels.any():
                labels = None  # an empty gt is the same as none: use the crop fallback
        return frames, spacing, labels


def _check_frames(code: str, ed: int, es: int, n_t: int, path: Path) -> None:
    for key, value in (("ED", ed), ("ES", es)):
        if not 0 <= value < n_t:
            raise DataError(
                f"M&Ms subject {code}: {key} = {value} (CSV, 0-based) is outside the 4D "
                f"volume `{path.name}` with {n_t} frames (valid 0..{n_t - 1})."
            )


def _resolve_root(raw_dir: Path) -> Path:
    if not raw_dir.is_dir():
        raise DataError(f"M&Ms folder `{raw_dir}` does not exist.")
    if (raw_dir / "OpenDataset").is_dir():
        return raw_dir / "OpenDataset"
    return raw_dir


_SPLIT_NAMES = {
    "labeled": "train",
    "unlabeled": "train",
    "training": "train",
    "validation": "val",
    "testing": "test",
}


def scan_mnms(
    raw_dir: str | Path,
    *,
    csv_path: str | Path | None = None,
    on_mismatch: OnMismatch = "error",
    skip_unlisted: bool = False,
) -> list[MnmsSubject]:
    """Find and validate M&Ms-1 subjects (header-level checks; no voxel data read).

    Args:
        raw_dir: the folder holding ``OpenDataset/`` or ``OpenDataset/`` itself.
        csv_path: the metadata CSV; found by glob when None.
        on_mismatch: ``"error"`` (default) if the CSV and the folders disagree, or
            ``"skip"`` to warn and skip subjects without folder / without CSV row.
        skip_unlisted: same as ``on_mismatch="skip"`` (the CLI's ``--skip-unlisted``).

    Raises:
        DataError: CSV missing / bad, unknown vendor, CSV-folder mismatch, ED/ES outside
            the 4D volume, unreadable or wrongly-dimensioned files.
    """
    if skip_unlisted:
        on_mismatch = "skip"
    if on_mismatch not in ("error", "skip"):
        raise DataError(f"on_mismatch={on_mismatch!r}; use 'error' or 'skip'.")
    root = _resolve_root(Path(raw_dir))
    csv = Path(csv_path) if csv_path is not None else find_mnms_csv(root)
    meta = read_mnms_csv(csv)
    folders: dict[str, Path] = {}
    for image in sorted(root.rglob("*_sa.nii.gz")):
        if image.name.startswith("."):  # macOS `._*` resource forks
            continue
        code = image.name[: -len("_sa.nii.gz")]
        if code in folders:
            raise DataError(
                f"M&Ms code {code} appears twice: `{folders[code]}` and `{image.parent}`."
            )
        folders[code] = image.parent
    if not folders:
        raise DataError(
            f"no M&Ms images (`<CODE>/<CODE>_sa.nii.gz`) under `{root}`; point RAW_DIR at "
            "the unpacked download (the folder holding `OpenDataset/`)."
        )
    in_csv = set(meta["code"])
    no_folder = sorted(in_csv - set(folders))
    no_row = sorted(set(folders) - in_csv)
    problems = []
    if no_folder:
        problems.append(
            f"{len(no_folder)} subject(s) listed in `{csv.name}` have no folder "
            f"(first: {no_folder[:10]})"
        )
    if no_row:
        problems.append(
            f"{len(no_row)} folder(s) are not listed in `{csv.name}` (first: "
            f"{no_row[:10]})"
        )
    if problems:
        msg = "; ".join(problems)
        if on_mismatch == "error":
            raise DataError(
                f"the M&Ms CSV and the folders under `{root}` disagree: {msg}. Complete "
                "the download, or pass on_mismatch='skip' (CLI `--skip-unlisted`) to "
                "prepare only the subjects found in both."
            )
        warnings.warn(f"M&Ms: skipping unmatched subjects: {msg}.", stacklevel=2)

    subjects = []
    for row in meta.itertuples(index=False):
        if row.code not in folders:
            continue
        folder = folders[row.code]
        image = folder / f"{row.code}_sa.nii.gz"
        n_t = nifti_shape(image, 4)[3]
        _check_frames(row.code, row.ed, row.es, n_t, image)
        gt = folder / f"{row.code}_sa_gt.nii.gz"
        has_gt = gt.is_file()
        if has_gt:
            gt_shape = nifti_shape(gt, 4)
            _check_frames(row.code, row.ed, row.es, gt_shape[3], gt)
        parts = [p.lower() for p in folder.relative_to(root).parts[:-1]]
        split = next(
            (_SPLIT_NAMES[p] for p in reversed(parts) if p in _SPLIT_NAMES), ""
        )
        subjects.append(
            MnmsSubject(
                code=row.code,
                folder=folder,
                vendor=row.vendor,
                centre=row.centre,
                pathology=row.pathology,
                ed=row.ed,
                es=row.es,
                n_frames=n_t,
                has_gt=has_gt,
                official_split=split,
            )
        )
    subjects.sort(key=lambda s: s.code)
    return subjects


def prepare_mnms(
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
    csv_path: str | Path | None = None,
    on_mismatch: OnMismatch = "error",
    skip_unlisted: bool = False,
    overwrite: bool = False,
    merge: bool = False,
    progress: bool = True,
) -> Path:
    """Prepare M&Ms-1 (``medlora prepare mnms RAW_DIR OUT_DIR``).

    Scans and validates everything first, then preprocesses each subject and writes
    ``OUT_DIR`` atomically; prints a vendor x split summary. Options as in
    :func:`~medlora_lib.data.acdc.prepare_acdc`, plus ``csv_path``, ``on_mismatch`` and
    its alias ``skip_unlisted`` (see :func:`scan_mnms`).

    Returns:
        ``out_dir``.

    Raises:
        DataError: bad raw data or an incompatible ``OUT_DIR``; nothing is half-written.
    """
    subjects = scan_mnms(
        raw_dir, csv_path=csv_path, on_mismatch=on_mismatch, skip_unlisted=skip_unlisted
    )
    return prepare_subjects(
        subjects,
        out_dir,
        source={
            "name": "mnms",
            "raw_dir": str(Path(raw_dir).absolute()),
            "n": len(subjects),
            "n_without_gt": sum(not s.has_gt for s in subjects),
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
        desc="M&Ms",
    )
