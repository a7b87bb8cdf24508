"""CineMA-style preprocessing of one cine case (ED + ES) into the model's input format.

Steps (``preprocess_case``), following CineMA's public recipe (its
``cinema/data/sitk.py`` and ``cinema/data/{acdc,mnms}/preprocess.py``), explained in
``notebooks/01_data_and_vendor_heterogeneity`` and, for what differs from CineMA and by
how much, in ``book/real_data.md``. Two choices are options (``crop``, ``intensity``;
config fields ``data.crop`` and ``data.intensity``): the ``paper`` profile does what
CineMA does, the ``cpu`` / ``smoke`` profiles keep this project's first recipe.

1. **Resample** both frames to ``target_spacing`` (mm) with MONAI ``Resize`` at the size
   ``round(shape * spacing / target_spacing)``. Images: axes that shrink are resampled
   with ``mode="area"`` (a box filter, i.e. anti-aliased averaging, as cheap as it gets),
   then axes that grow with ``trilinear`` (the two passes are needed only when some axes
   shrink and others grow). Labels: ``nearest-exact``.
2. **Crop in-plane** to ``image_size[:2]`` around the LV centre: the centre of the LV
   (label 1) bounding box at ED, else at ES. When there is no LV label (unlabelled case,
   ``labels=None``) a documented fallback is used, chosen by ``crop_fallback``:

   * ``"center"`` (default): the centre of the image. Short-axis cine stacks are planned
     with the heart near the middle of the field of view, so this is predictable and safe.
   * ``"motion"``: the in-plane peak of the smoothed ED-ES absolute difference (the LV
     blood pool changes most between ED and ES). Falls back to the centre when the peak
     is not clearly above the background (peak < 2x the median of the map).

   Where the window lies, chosen by ``crop``:

   * ``"shift_inside"`` (CineMA, ``get_center_crop_size_from_1d_bbox``): the window
     starts at ``ceil(c - size / 2)`` for the centre ``c`` and is then shifted back
     inside the image where it would leave it, so it holds image everywhere. Only an
     axis shorter than the window is padded, with zeros at its end (CineMA crops
     nothing there and MONAI's ``SpatialPadd(method="end")`` pads when loading).
   * ``"lv_centred"``: the window stays centred on ``c`` (same rounding) and is
     zero-padded where it leaves the image (bands of zeros beside the image).
3. **Clip** intensities to the 0.95th-99.5th percentiles and **rescale to [0, 1]**,
   chosen by ``intensity``:

   * ``"per_frame"`` (CineMA, ``clip_and_normalise_intensity_3d``): ED and ES each on
     their own: percentiles of the frame's cropped volume (all its slices, before any
     padding), clip, then min-max rescale of the clipped frame to [0, 1].
   * ``"joint"``: one pair of percentiles over both frames' cropped region (before zero
     padding), so ED and ES keep their relative contrast.
4. **Slices**: zero-padded at the end to ``image_size[2]``; when there are more slices,
   the central ``image_size[2]`` slices are kept (symmetric crop, the extra odd slice is
   dropped at the end). CineMA keeps them all (never more than 16 at 10 mm in ACDC or
   M&Ms, so this does not arise at the ``paper`` profile).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from scipy.ndimage import gaussian_filter

from medlora_lib.errors import DataError

__all__ = [
    "preprocess_case",
    "preprocessing_params",
    "iter_prepared_records",
    "summarise_prepared",
    "resampled_shape",
    "lv_centre",
    "cinema_crop_start",
    "normalise_preprocessing",
    "CLIP_PERCENTILES",
    "CROP_MODES",
    "INTENSITY_MODES",
    "PREPROCESSING_VERSION",
]

CLIP_PERCENTILES = (0.95, 99.5)
# Bump when the numerical recipe changes: a data folder written by another version is
# then refused by ``write_prepared_dataset(merge=True)``.
PREPROCESSING_VERSION = 1

CropFallback = Literal["center", "motion"]
CropMode = Literal["lv_centred", "shift_inside"]
IntensityMode = Literal["joint", "per_frame"]
CROP_MODES: tuple[str, ...] = ("lv_centred", "shift_inside")
INTENSITY_MODES: tuple[str, ...] = ("joint", "per_frame")
# what folders written before ``crop`` / ``intensity`` were options recorded
_OLD_CROP = {"lv_bbox_centre_at_ED": "lv_centred"}


def preprocessing_params(
    target_spacing: Sequence[float] = (3.0, 3.0, 10.0),
    image_size: Sequence[int] = (48, 48, 8),
    crop_fallback: CropFallback = "center",
    crop: CropMode = "lv_centred",
    intensity: IntensityMode = "joint",
) -> dict:
    """The preprocessing parameters as stored in ``dataset.json`` (``"preprocessing"``).

    Two data folders can be merged only when these dictionaries are equal (after
    :func:`normalise_preprocessing`).
    """
    return {
        "version": PREPROCESSING_VERSION,
        "target_spacing": [float(s) for s in target_spacing],
        "image_size": [int(s) for s in image_size],
        "clip_percentiles": list(CLIP_PERCENTILES),
        "crop": crop,
        "crop_centre": "lv_bbox_centre_at_ED_else_ES",
        "crop_fallback": crop_fallback,
        "intensity": intensity,
        "slices": "pad_end_or_centre_crop",
        "image_interp": "area_down_trilinear_up",
        "label_interp": "nearest",
    }


def normalise_preprocessing(params: dict) -> dict:
    """``params`` (a ``dataset.json`` ``"preprocessing"`` entry) in today's spelling.

    Folders written before ``crop`` and ``intensity`` were options recorded
    ``crop="lv_bbox_centre_at_ED"`` and no ``intensity``: they were prepared with
    ``lv_centred`` and ``joint``, and compare equal to a folder prepared so today.
    """
    out = dict(params)
    if "crop" in out:
        if out["crop"] in _OLD_CROP:
            out["crop"] = _OLD_CROP[out["crop"]]
            out.setdefault("crop_centre", "lv_bbox_centre_at_ED_else_ES")
        out.setdefault("intensity", "joint")
    return out


def resampled_shape(
    shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]
) -> tuple[int, int, int]:
    """Grid size after resampling ``shape`` at ``spacing`` to ``target_spacing`` (>= 1)."""
    return tuple(
        max(1, int(round(n * s / t)))
        for n, s, t in zip(shape, spacing, target_spacing, strict=True)
    )  # type: ignore[return-value]


def lv_centre(labels: np.ndarray, lv_label: int = 1) -> tuple[float, float] | None:
    """In-plane centre of the LV bounding box at ED (frame 0), else ES; None if absent.

    Args:
        labels: ``(2, X, Y, Z)`` segmentation in the medlora label map.
    """
    for frame in labels:
        xs, ys = np.nonzero((frame == lv_label).any(axis=2))
        if xs.size:
            return (xs.min() + xs.max()) / 2.0, (ys.min() + ys.max()) / 2.0
    return None


def _motion_centre(frames: np.ndarray, sigma: float) -> tuple[float, float] | None:
    diff = np.abs(frames[0] - frames[1]).mean(axis=2)
    scale = np.percentile(np.abs(frames), 99.5)
    if scale <= 0:
        return None
    smooth = gaussian_filter(diff / scale, sigma=sigma, mode="constant")
    peak = smooth.max()
    if peak <= 0 or peak < 2.0 * np.median(smooth):
        return None
    x, y = np.unravel_index(int(np.argmax(smooth)), smooth.shape)
    return float(x), float(y)


def _window(centre: float, size: int, n: int) -> tuple[int, int, int, int]:
    """Source [a, b) and destination offset for a window of ``size`` centred at centre."""
    start = int(np.floor(centre + 0.5 - size / 2.0))
    a, b = max(start, 0), min(start + size, n)
    if (
        b <= a
    ):  # window entirely outside: keep nothing (cannot happen for valid centres)
        return 0, 0, 0, 0
    return a, b, a - start, a - start + (b - a)


def cinema_crop_start(centre: float, size: int, n: int) -> int:
    """First index of CineMA's crop window of ``size`` on an axis of ``n`` voxels.

    CineMA's ``get_center_crop_size_from_1d_bbox`` with the bounding box's centre
    ``centre = (bbox_min + bbox_max_inclusive) / 2``: start at ``ceil(centre - size/2)``,
    then shift the window right if it starts before 0 and left if it ends after ``n``.
    When ``n <= size`` nothing is cropped (0).
    """
    if n <= size:
        return 0
    start = int(np.ceil(centre - size / 2.0))
    end = start + size
    start = max(start, 0)
    if end > n:
        start -= end - n
    return start


def _shift_inside_window(centre: float, size: int, n: int) -> tuple[int, int, int, int]:
    """Like :func:`_window` for CineMA's crop: inside the image, padded at the end."""
    a = cinema_crop_start(centre, size, n)
    b = min(a + size, n)
    return a, b, 0, b - a


def _clip_rescale(region: np.ndarray) -> np.ndarray:
    """Clip to :data:`CLIP_PERCENTILES` of ``region``, then min-max rescale to [0, 1]."""
    lo, hi = np.percentile(region, CLIP_PERCENTILES)
    clipped = np.clip(region, lo, hi)
    # CineMA: sitk.Clamp, Normalize, RescaleIntensity(0, 1), i.e. a min-max rescale of
    # the clipped frame (Normalize is affine, so it changes nothing but rounding)
    mn, mx = clipped.min(), clipped.max()
    if mx > mn:
        return ((clipped - mn) / (mx - mn)).astype(np.float32)
    return np.zeros_like(region)


def _resize(
    array: np.ndarray, size: tuple[int, int, int], *, label: bool
) -> np.ndarray:
    if tuple(array.shape[1:]) == size:
        return array
    # imported here: `import monai` loads all of MONAI (~10 s), which the processes
    # that only read prepared arrays (Flower's actors, SuperNodes) never need
    from monai.transforms import Resize

    tensor = torch.as_tensor(array, dtype=torch.float32)
    if label:
        return _numpy(Resize(size, mode="nearest-exact")(tensor))
    shrunk = tuple(min(n, m) for n, m in zip(size, array.shape[1:], strict=True))
    if shrunk != tuple(array.shape[1:]):
        tensor = Resize(shrunk, mode="area")(tensor)
    if shrunk != tuple(size):
        tensor = Resize(size, mode="trilinear", align_corners=False)(tensor)
    return _numpy(tensor)


def _numpy(tensor) -> np.ndarray:
    if hasattr(tensor, "as_tensor"):  # MONAI MetaTensor
        tensor = tensor.as_tensor()
    return tensor.detach().cpu().numpy()


def preprocess_case(
    frames: np.ndarray,
    spacing: Sequence[float],
    labels: np.ndarray | None = None,
    target_spacing: Sequence[float] = (3.0, 3.0, 10.0),
    image_size: Sequence[int] = (48, 48, 8),
    crop_fallback: CropFallback = "center",
    crop: CropMode = "lv_centred",
    intensity: IntensityMode = "joint",
) -> tuple[np.ndarray, np.ndarray]:
    """Turn an ED/ES pair into CineMA's input format (see the module docstring).

    Args:
        frames: ``(2, X, Y, Z)`` intensities, channel 0 = ED, 1 = ES.
        spacing: voxel size (mm) of ``frames`` along X, Y, Z.
        labels: ``(2, X, Y, Z)`` segmentation in the medlora label map (1 LV, 2 MYO,
            3 RV), or None for an unlabelled case.
        target_spacing: output voxel size in mm.
        image_size: output ``(H, W, D)``.
        crop_fallback: in-plane crop centre when no LV label exists (``"center"`` or
            ``"motion"``).
        crop: ``"shift_inside"`` (CineMA: the window is shifted back inside the image)
            or ``"lv_centred"`` (the window stays centred, zero-padded outside).
        intensity: ``"per_frame"`` (CineMA: ED and ES clipped and rescaled each on
            their own) or ``"joint"`` (one clip range and rescale for both).

    Returns:
        ``(image, label)``: float32 ``(2, H, W, D)`` in [0, 1] and uint8 ``(2, H, W, D)``
        (all zeros when ``labels`` is None).

    Raises:
        DataError: shapes or spacing are invalid.
    """
    frames = np.asarray(frames, dtype=np.float32)
    if frames.ndim != 4 or frames.shape[0] != 2:
        raise DataError(
            f"preprocess_case expects frames of shape (2, X, Y, Z) (ED, ES), got "
            f"{frames.shape}."
        )
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != frames.shape:
            raise DataError(
                f"labels shape {labels.shape} does not match frames shape {frames.shape};"
                " the segmentation must be on the same grid as the image."
            )
    if len(spacing) != 3 or any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise DataError(f"spacing must be three positive numbers (mm), got {spacing}.")
    if crop_fallback not in ("center", "motion"):
        raise DataError(
            f"crop_fallback={crop_fallback!r} is unknown; use 'center' or 'motion'."
        )
    if crop not in CROP_MODES:
        raise DataError(f"crop={crop!r} is unknown; use one of {CROP_MODES}.")
    if intensity not in INTENSITY_MODES:
        raise DataError(
            f"intensity={intensity!r} is unknown; use one of {INTENSITY_MODES}."
        )
    height, width, depth = (int(s) for s in image_size)
    if not np.all(np.isfinite(frames)):
        frames = np.nan_to_num(frames, nan=0.0, posinf=0.0, neginf=0.0)

    # 1. resample
    size = resampled_shape(frames.shape[1:], spacing, target_spacing)
    image = _resize(frames, size, label=False)
    seg = None
    if labels is not None:
        seg = np.rint(_resize(labels.astype(np.float32), size, label=True)).astype(
            np.uint8
        )

    # 2. in-plane crop centre
    centre = lv_centre(seg) if seg is not None else None
    if centre is None and crop_fallback == "motion":
        sigma = 10.0 / float(target_spacing[0])  # ~1 cm smoothing
        centre = _motion_centre(image, sigma=sigma)
    if centre is None:
        centre = ((size[0] - 1) / 2.0, (size[1] - 1) / 2.0)
    window = _shift_inside_window if crop == "shift_inside" else _window
    xa, xb, xo0, xo1 = window(centre[0], height, size[0])
    ya, yb, yo0, yo1 = window(centre[1], width, size[1])
    # slices: keep all if they fit (pad at the end), else the central `depth`
    if size[2] <= depth:
        za, zb = 0, size[2]
    else:
        za = (size[2] - depth) // 2
        zb = za + depth

    # 3. clip + rescale to [0, 1]
    out_image = np.zeros((2, height, width, depth), dtype=np.float32)
    if intensity == "per_frame":
        # CineMA's order: crop in-plane, clip + rescale each frame over all its slices
        region = image[:, xa:xb, ya:yb, :]
        if region.size:
            region = np.stack([_clip_rescale(frame) for frame in region])
        region = region[..., za:zb]
    else:
        region = image[:, xa:xb, ya:yb, za:zb]
    if region.size:
        if intensity == "joint":
            lo, hi = np.percentile(region, CLIP_PERCENTILES)
            if hi > lo:
                region = (np.clip(region, lo, hi) - lo) / (hi - lo)
            else:
                region = np.zeros_like(region)
        out_image[:, xo0:xo1, yo0:yo1, : zb - za] = region
    out_label = np.zeros((2, height, width, depth), dtype=np.uint8)
    if seg is not None and region.size:
        out_label[:, xo0:xo1, yo0:yo1, : zb - za] = seg[:, xa:xb, ya:yb, za:zb]
    return out_image, out_label


# ------------------------------------------------------------- shared by the loaders


def iter_prepared_records(
    subjects: Sequence,
    *,
    target_spacing: Sequence[float],
    image_size: Sequence[int],
    crop_fallback: CropFallback = "center",
    crop: CropMode = "lv_centred",
    intensity: IntensityMode = "joint",
    progress: bool = True,
    desc: str = "preprocess",
):
    """Load and preprocess subjects lazily, yielding ``PreparedRecord`` objects.

    Each subject must have ``subject_id, dataset, vendor, centre, pathology, label`` and
    a ``load() -> (frames (2,X,Y,Z), spacing, labels | None)`` method (the raw loaders'
    subject classes do). Used by ``prepare_acdc`` / ``prepare_mnms`` / ``prepare_mnms2``.
    """
    from tqdm.auto import tqdm

    from medlora_lib.data.manifest import PreparedRecord

    for subject in tqdm(subjects, desc=desc, disable=not progress, unit="subject"):
        frames, spacing, labels = subject.load()
        try:
            image, seg = preprocess_case(
                frames,
                spacing,
                labels,
                target_spacing=target_spacing,
                image_size=image_size,
                crop_fallback=crop_fallback,
                crop=crop,
                intensity=intensity,
            )
        except DataError as exc:
            raise DataError(f"subject {subject.subject_id}: {exc}") from exc
        yield PreparedRecord(
            subject_id=subject.subject_id,
            dataset=subject.dataset,
            vendor=subject.vendor,
            centre=str(subject.centre),
            pathology=str(subject.pathology),
            label=int(subject.label),
            image=image,
            seg=seg,
        )


def summarise_prepared(out_dir, *, print_summary: bool = True) -> pd.DataFrame:
    """Counts per vendor x split (and healthy counts) of a prepared folder; printed."""

    from medlora_lib.data.manifest import read_manifest

    df = read_manifest(out_dir)
    table = pd.crosstab(df["vendor"], df["split"], margins=True, margins_name="total")
    table["healthy"] = df.groupby("vendor")["label"].apply(
        lambda s: int((s == 0).sum())
    )
    table.loc["total", "healthy"] = int((df["label"] == 0).sum())
    table["healthy"] = table["healthy"].astype(int)
    if print_summary:
        print(f"wrote {len(df)} subjects to {out_dir}")
        print(table.to_string())
    return table


def prepare_subjects(
    subjects: Sequence,
    out_dir,
    *,
    source: dict,
    target_spacing: Sequence[float],
    image_size: Sequence[int],
    crop_fallback: CropFallback = "center",
    crop: CropMode = "lv_centred",
    intensity: IntensityMode = "joint",
    val_fraction: float = 0.15,
    test_fraction: float = 0.25,
    seed: int = 0,
    client_column: str = "vendor",
    overwrite: bool = False,
    merge: bool = False,
    progress: bool = True,
    desc: str = "preprocess",
):
    """Preprocess scanned subjects and write a prepared folder (shared by the loaders).

    Args:
        subjects: scanned subjects (see :func:`iter_prepared_records`).
        out_dir: the prepared folder to write (atomically).
        source: the ``dataset.json`` source entry; must hold ``name`` (``acdc``, ...).
        Other arguments: as ``prepare_acdc``.

    Returns:
        ``out_dir`` as a Path.
    """
    from medlora_lib.data.manifest import write_prepared_dataset

    info = {
        "name": source["name"],
        "image_size": [int(s) for s in image_size],
        "spacing": [float(s) for s in target_spacing],
        "preprocessing": preprocessing_params(
            target_spacing, image_size, crop_fallback, crop, intensity
        ),
        "sources": [source],
        "split": {
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "seed": seed,
            "client_column": client_column,
        },
    }
    records = iter_prepared_records(
        subjects,
        target_spacing=target_spacing,
        image_size=image_size,
        crop_fallback=crop_fallback,
        crop=crop,
        intensity=intensity,
        progress=progress,
        desc=desc,
    )
    out = write_prepared_dataset(
        out_dir,
        records,
        info,
        overwrite=overwrite,
        merge=merge,
        subject_ids=[str(s.subject_id) for s in subjects],
    )
    if progress:
        summarise_prepared(out)
    return out
