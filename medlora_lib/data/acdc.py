"""ACDC loader: the official ``database/`` layout to a prepared data folder.

Layout (``../shared/reference/datasets.md``): ``database/{training,testing}/patientXXX/``
with ``Info.cfg`` (``ED``, ``ES`` **1-based** frame numbers, ``Group``, ``Height``,
``NbFrame``, ``Weight``), ``patientXXX_frameYY.nii.gz`` (+ ``_gt``) at ED and ES, and
``patientXXX_4d.nii.gz``. ACDC labels (RV 1, MYO 2, LV 3) are remapped to the medlora map
(LV 1, MYO 2, RV 3). Every subject is Siemens, centre ``Dijon``. The official
training/testing division is ignored: splits come from :func:`assign_splits` (the current
release gives ``Group`` for the testing subjects too). Explained in
``notebooks/01_data_and_vendor_heterogeneity``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medlora_lib.data.manifest import pathology_to_label
from medlora_lib.data.nifti import load_nifti, load_nifti_frames, nifti_shape
from medlora_lib.data.preprocess import (
    CropFallback,
    CropMode,
    IntensityMode,
    prepare_subjects,
)
from medlora_lib.errors import DataError

__all__ = [
    "AcdcSubject",
    "scan_acdc",
    "prepare_acdc",
    "read_info_cfg",
    "ACDC_TO_MEDLORA",
]

# ACDC: 1 RV, 2 MYO, 3 LV  ->  medlora: 1 LV, 2 MYO, 3 RV
ACDC_TO_MEDLORA = np.array([0, 3, 2, 1], dtype=np.uint8)
ACDC_GROUPS = ("NOR", "MINF", "DCM", "HCM", "RV")
_PATIENT_RE = re.compile(r"^patient\d{3}$")


def read_info_cfg(path: Path) -> dict[str, str]:
    """Parse ``Info.cfg`` (``key: value`` lines) into a dict; errors name the patient.

    Raises:
        DataError: missing file, or a missing / non-integer ``ED``, ``ES`` or missing
            ``Group``.
    """
    patient = path.parent.name
    if not path.is_file():
        raise DataError(
            f"`Info.cfg` is missing in {patient} (`{path.parent}`); every ACDC patient "
            "folder needs it (lines `ED: <frame>`, `ES: <frame>`, `Group: <NOR|MINF|"
            "DCM|HCM|RV>`). Re-extract it from the official download."
        )
    values: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        if ":" in line:
            key, _, value = line.partition(":")
            values[key.strip()] = value.strip()
    for key, hint in (("ED", "<frame number>"), ("ES", "<frame number>")):
        if key not in values:
            raise DataError(
                f"`Info.cfg` in {patient} has no `{key}` line; expected `{key}: {hint}`."
            )
        try:
            int(float(values[key]))
        except ValueError as exc:
            raise DataError(
                f"`Info.cfg` in {patient}: `{key}: {values[key]}` is not a frame number;"
                f" expected `{key}: {hint}` (1-based)."
            ) from exc
    if not values.get("Group"):
        raise DataError(
            f"`Info.cfg` in {patient} has no `Group` line; expected "
            f"`Group: <{'|'.join(ACDC_GROUPS)}>`."
        )
    return values


@dataclass
class AcdcSubject:
    """One ACDC patient found by :func:`scan_acdc` (ED/ES are 1-based, as in Info.cfg)."""

    patient: str
    folder: Path
    ed: int
    es: int
    group: str
    nb_frames: int | None
    official_split: str
    info: dict[str, str] = field(default_factory=dict)
    dataset: str = "acdc"
    vendor: str = "Siemens"
    centre: str = "Dijon"

    @property
    def subject_id(self) -> str:
        return f"acdc_{self.patient}"

    @property
    def pathology(self) -> str:
        return self.group

    @property
    def label(self) -> int:
        return pathology_to_label(self.group)

    def frame_file(self, frame: int, gt: bool = False) -> Path:
        suffix = "_gt" if gt else ""
        return self.folder / f"{self.patient}_frame{frame:02d}{suffix}.nii.gz"

    @property
    def cine_file(self) -> Path:
        return self.folder / f"{self.patient}_4d.nii.gz"

    def check(self) -> None:
        """Header-level checks (no voxel data read): files, ranks, ED/ES in range."""
        frames = [self.frame_file(self.ed), self.frame_file(self.es)]
        if all(f.is_file() for f in frames):
            shapes = {nifti_shape(f, 3) for f in frames}
            for f in frames:
                g = f.with_name(f.name.replace(".nii.gz", "_gt.nii.gz"))
                if g.is_file() and nifti_shape(g, 3) not in shapes:
                    raise DataError(
                        f"`{g}` has shape {nifti_shape(g, 3)}, its image {shapes}; "
                        "labels must be on the image grid."
                    )
        elif self.cine_file.is_file():
            n_t = nifti_shape(self.cine_file, 4)[3]
            for key, value in (("ED", self.ed), ("ES", self.es)):
                if not 1 <= value <= n_t:
                    raise DataError(
                        f"`Info.cfg` in {self.patient}: {key} = {value} is outside the "
                        f"4D volume `{self.cine_file.name}` ({n_t} frames; ACDC frame "
                        "numbers are 1-based)."
                    )
        else:
            missing = [f.name for f in frames if not f.is_file()]
            raise DataError(
                f"{self.patient}: frame file(s) {missing} and the cine "
                f"`{self.cine_file.name}` are missing in `{self.folder}`; re-extract the "
                "patient folder from the official download."
            )

    def load(self) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray | None]:
        """ED/ES frames ``(2,X,Y,Z)``, spacing, labels in the medlora map (or None)."""
        f_ed, f_es = self.frame_file(self.ed), self.frame_file(self.es)
        if f_ed.is_file() and f_es.is_file():
            ed, spacing, _ = load_nifti(f_ed, 3)
            es, _, _ = load_nifti(f_es, 3)
            if ed.shape != es.shape:
                raise DataError(
                    f"{self.patient}: ED frame {ed.shape} and ES frame {es.shape} have "
                    "different shapes."
                )
            frames = np.stack([ed, es])
        else:
            n_t = nifti_shape(self.cine_file, 4)[3]
            for key, value in (("ED", self.ed), ("ES", self.es)):
                if not 1 <= value <= n_t:
                    raise DataError(
                        f"`Info.cfg` in {self.patient}: {key} = {value} is outside the "
                        f"4D volume ({n_t} frames; 1-based)."
                    )
            # ACDC frame numbers are 1-based; the time axis is 0-based
            frames, spacing, _ = load_nifti_frames(
                self.cine_file, (self.ed - 1, self.es - 1)
            )
        gts = [self.frame_file(self.ed, gt=True), self.frame_file(self.es, gt=True)]
        present = [g.is_file() for g in gts]
        labels = None
        if all(present):
            raw = np.stack([load_nifti(g, 3)[0] for g in gts])
            raw = np.rint(raw).astype(np.int64)
            if raw.shape != frames.shape:
                raise DataError(
                    f"{self.patient}: ground truth {raw.shape[1:]} does not match the "
                    f"image grid {frames.shape[1:]}."
                )
            if raw.min() < 0 or raw.max() > 3:
                raise DataError(
                    f"{self.patient}: ground truth holds values {sorted(np.unique(raw))};"
                    " ACDC labels are 0 (background), 1 RV, 2 MYO, 3 LV."
                )
            labels = ACDC_TO_MEDLORA[raw]
        elif any(present):
            missing = [g.name for g, p in zip(gts, present, strict=True) if not p]
            raise DataError(
                f"{self.patient}: ground truth {missing} is missing while the other "
                "frame has one; re-extract the patient folder."
            )
        return frames, spacing, labels


def _find_patient_dirs(raw_dir: Path) -> list[tuple[Path, str]]:
    """Patient folders with their official split, for the accepted raw_dir forms."""
    if not raw_dir.is_dir():
        raise DataError(f"ACDC folder `{raw_dir}` does not exist.")
    roots: list[tuple[Path, str]] = []
    for candidate in (raw_dir / "database", raw_dir):
        subs = [(candidate / s, s) for s in ("training", "testing")]
        if any(p.is_dir() for p, _ in subs):
            roots = [(p, s) for p, s in subs if p.is_dir()]
            break
    if not roots:  # raw_dir is `training` / `testing` itself (or holds patientXXX)
        roots = [
            (raw_dir, raw_dir.name if raw_dir.name in ("training", "testing") else "")
        ]
    found = [
        (d, split)
        for root, split in roots
        for d in sorted(root.iterdir())
        if d.is_dir() and _PATIENT_RE.match(d.name)
    ]
    if not found:
        raise DataError(
            f"no ACDC patient folders (`patientXXX`) under `{raw_dir}`; point RAW_DIR at"
            " the unpacked download (the folder holding `database/`, `database/` itself,"
            " or `database/training`)."
        )
    return found


def scan_acdc(raw_dir: str | Path) -> list[AcdcSubject]:
    """Find and validate the ACDC patients under ``raw_dir`` (header-level checks only).

    ``raw_dir`` may be the folder holding ``database/``, ``database/`` itself, or the
    ``training`` / ``testing`` folder.

    Raises:
        DataError: no patients, a missing / incomplete ``Info.cfg``, ED/ES outside
            ``1..NbFrame`` (or the 4D volume), missing or unreadable image files.
    """
    subjects = []
    seen: set[str] = set()
    for folder, split in _find_patient_dirs(Path(raw_dir)):
        info = read_info_cfg(folder / "Info.cfg")
        ed, es = int(float(info["ED"])), int(float(info["ES"]))
        nb = info.get("NbFrame")
        nb_frames = int(float(nb)) if nb not in (None, "") else None
        for key, value in (("ED", ed), ("ES", es)):
            if value < 1 or (nb_frames is not None and value > nb_frames):
                raise DataError(
                    f"`Info.cfg` in {folder.name}: {key} = {value} is outside the cine "
                    f"(NbFrame = {nb_frames}); ACDC frame numbers are 1-based, "
                    f"1..{nb_frames}."
                )
        if folder.name in seen:
            raise DataError(f"{folder.name} appears twice under `{raw_dir}`.")
        seen.add(folder.name)
        subject = AcdcSubject(
            patient=folder.name,
            folder=folder,
            ed=ed,
            es=es,
            group=info["Group"],
            nb_frames=nb_frames,
            official_split=split,
            info=info,
        )
        subject.check()
        subjects.append(subject)
    return subjects


def prepare_acdc(
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
    overwrite: bool = False,
    merge: bool = False,
    progress: bool = True,
) -> Path:
    """Prepare ACDC (``medlora prepare acdc RAW_DIR OUT_DIR``).

    Scans and validates everything first, then preprocesses each subject
    (:func:`~medlora_lib.data.preprocess.preprocess_case`) and writes ``OUT_DIR``
    atomically (:func:`~medlora_lib.data.manifest.write_prepared_dataset`); prints a
    vendor x split summary.

    ``crop`` and ``intensity`` (config fields ``data.crop`` / ``data.intensity``) choose
    CineMA's crop and per-frame intensities (``"shift_inside"``, ``"per_frame"``: the
    ``paper`` profile) or this project's first recipe (the defaults); see
    :func:`~medlora_lib.data.preprocess.preprocess_case`. A vendor with one class only
    is written with a warning (a federation refuses it unless
    ``fed.allow_single_class``).

    Returns:
        ``out_dir``.

    Raises:
        DataError: bad raw data or an incompatible ``OUT_DIR``; nothing is half-written.
    """
    subjects = scan_acdc(raw_dir)
    return prepare_subjects(
        subjects,
        out_dir,
        source={
            "name": "acdc",
            "raw_dir": str(Path(raw_dir).absolute()),
            "n": len(subjects),
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
        desc="ACDC",
    )
