"""Safe NIfTI reading: every failure becomes a :class:`DataError` that names the file.

The real downloads (ACDC, M&Ms) are many hundreds of ``.nii.gz`` files; a truncated or
corrupt one typically surfaces only when the *data* is decompressed (the header sits at the
start of the gzip stream), as an ``EOFError``, ``zlib.error`` or ``gzip.BadGzipFile`` deep
inside nibabel. This module turns those into one clear message. Explained in
``notebooks/01_data_and_vendor_heterogeneity``.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from medlora_lib.errors import DataError

__all__ = ["load_nifti", "load_nifti_frames", "read_nifti_header", "nifti_shape"]

_READ_ERRORS = (
    EOFError,
    OSError,
    zlib.error,
    gzip.BadGzipFile,
    ValueError,
    nib.filebasedimages.ImageFileError,
)


def _as_tuple(expected_ndim: int | tuple[int, ...]) -> tuple[int, ...]:
    return (expected_ndim,) if isinstance(expected_ndim, int) else tuple(expected_ndim)


def _fix_fn(path: Path) -> str:
    return (
        f"re-extract `{path.name}` from the official download (the file is corrupt or "
        "was only partly copied)"
    )


def read_nifti_header(path: str | Path) -> nib.Nifti1Image:
    """Open a NIfTI file lazily (header only; the voxel data is not read).

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.

    Returns:
        The nibabel image proxy (``img.shape``, ``img.header`` are available).

    Raises:
        DataError: the file is missing or its header cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"NIfTI file `{path}` does not exist; check the raw data folder."
        )
    try:
        return nib.load(str(path))
    except _READ_ERRORS as exc:
        raise DataError(
            f"cannot read the NIfTI header of `{path}` ({type(exc).__name__}: {exc}); "
            f"{_fix_fn(path)}."
        ) from exc


def _squeeze_to(shape: tuple[int, ...], allowed: tuple[int, ...]) -> tuple[int, ...]:
    """Drop trailing singleton axes until the rank is allowed (e.g. (X,Y,Z,1) -> 3D)."""
    shape = tuple(shape)
    while len(shape) not in allowed and len(shape) > min(allowed) and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def nifti_shape(
    path: str | Path, expected_ndim: int | tuple[int, ...]
) -> tuple[int, ...]:
    """Shape of a NIfTI volume from its header only, with the rank checked.

    Trailing singleton axes are dropped (a 3D frame stored as ``(X, Y, Z, 1)`` is 3D).

    Raises:
        DataError: missing or unreadable file, or a rank not in ``expected_ndim``.
    """
    allowed = _as_tuple(expected_ndim)
    img = read_nifti_header(path)
    shape = _squeeze_to(img.shape, allowed)
    if len(shape) not in allowed:
        want = " or ".join(f"{n}D" for n in allowed)
        raise DataError(
            f"`{path}` is a {len(img.shape)}D volume of shape {tuple(img.shape)}, "
            f"expected {want}; check that the right file sits under this name."
        )
    return shape


def load_nifti(
    path: str | Path, expected_ndim: int | tuple[int, ...]
) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """Read a NIfTI volume with clear errors.

    Args:
        path: a ``.nii`` / ``.nii.gz`` file.
        expected_ndim: allowed rank(s), e.g. ``3`` for one frame or ``4`` for a cine.
            Trailing singleton axes are dropped before the check.

    Returns:
        ``(array, spacing, affine)``: the voxel array in nibabel order (X, Y, Z[, T]) as
        float32 (scaling slope/intercept applied), the spatial voxel size in mm of the
        first three axes, and the 4x4 affine.

    Raises:
        DataError: the file is missing, corrupt or truncated (also when only the voxel
            data, not the header, is damaged), or has the wrong number of dimensions.
    """
    path = Path(path)
    allowed = _as_tuple(expected_ndim)
    shape = nifti_shape(path, allowed)
    img = read_nifti_header(path)
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except _READ_ERRORS as exc:
        raise DataError(
            f"cannot read the voxel data of `{path}` ({type(exc).__name__}: {exc}); "
            f"{_fix_fn(path)}."
        ) from exc
    data = data.reshape(shape)
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    if len(zooms) < 3 or any(not np.isfinite(z) or z <= 0 for z in zooms):
        raise DataError(
            f"`{path}` has an invalid voxel size {zooms} in its header; expected three "
            "positive spacings in mm (pixdim[1:4])."
        )
    return (
        data,
        (zooms[0], zooms[1], zooms[2]),
        np.asarray(img.affine, dtype=np.float64),
    )


def load_nifti_frames(
    path: str | Path, indices: Sequence[int]
) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """Read selected time frames of a 4D NIfTI without converting the whole cine.

    Only the frames asked for are scaled to float32 (a 4D M&Ms cine is ~25 frames; this
    is several times faster than :func:`load_nifti` on it).

    Args:
        path: a 4D ``.nii`` / ``.nii.gz`` file (X, Y, Z, T).
        indices: 0-based time indices.

    Returns:
        ``(frames (len(indices), X, Y, Z) float32, spacing, affine)``.

    Raises:
        DataError: as :func:`load_nifti`, or an index outside ``0..T-1``.
    """
    path = Path(path)
    shape = nifti_shape(path, 4)
    for i in indices:
        if not 0 <= int(i) < shape[3]:
            raise DataError(
                f"frame index {i} is outside `{path}` ({shape[3]} frames, 0-based "
                f"0..{shape[3] - 1})."
            )
    img = read_nifti_header(path)
    try:
        proxy = img.dataobj
        frames = [
            np.asarray(proxy[..., int(i)], dtype=np.float32).reshape(shape[:3])
            for i in indices
        ]
    except _READ_ERRORS as exc:
        raise DataError(
            f"cannot read the voxel data of `{path}` ({type(exc).__name__}: {exc}); "
            f"{_fix_fn(path)}."
        ) from exc
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    if any(not np.isfinite(z) or z <= 0 for z in zooms):
        raise DataError(
            f"`{path}` has an invalid voxel size {zooms} in its header; expected three "
            "positive spacings in mm (pixdim[1:4])."
        )
    affine = np.asarray(img.affine, dtype=np.float64)
    return np.stack(frames), (zooms[0], zooms[1], zooms[2]), affine
