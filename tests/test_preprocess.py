"""preprocess_case and safe NIfTI reading: shapes, ranges, crop, spacing, bad files."""

from __future__ import annotations

import gzip
import time

import nibabel as nib
import numpy as np
import pytest

from medlora_lib.data.nifti import load_nifti
from medlora_lib.data.preprocess import (
    lv_centre,
    preprocess_case,
    preprocessing_params,
    resampled_shape,
)
from medlora_lib.errors import DataError


def _disc_case(
    shape=(100, 90, 10), spacing=(1.5, 1.5, 8.0), centre=(30, 55), r_mm=15.0
):
    """Two frames with a bright LV disc of radius r_mm (ES disc smaller), + labels."""
    xx, yy = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    d2 = ((xx - centre[0]) * spacing[0]) ** 2 + ((yy - centre[1]) * spacing[1]) ** 2
    rng = np.random.default_rng(0)
    frames = rng.normal(0.2, 0.02, size=(2, *shape)).astype(np.float32)
    labels = np.zeros((2, *shape), np.uint8)
    for t, r in enumerate((r_mm, 0.7 * r_mm)):
        disc = d2 <= r**2
        frames[t][disc] += 1.0
        labels[t][disc] = 1
        ring = (d2 > r**2) & (d2 <= (r + 6) ** 2)
        labels[t][ring] = 2
    return frames, spacing, labels


def test_output_shape_dtype_range():
    frames, spacing, labels = _disc_case()
    image, seg = preprocess_case(frames, spacing, labels)
    assert image.shape == (2, 48, 48, 8) and image.dtype == np.float32
    assert seg.shape == (2, 48, 48, 8) and seg.dtype == np.uint8
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert image.max() == pytest.approx(1.0)
    assert set(np.unique(seg)) <= {0, 1, 2, 3}


def test_no_labels_gives_zero_label_array():
    frames, spacing, _ = _disc_case()
    image, seg = preprocess_case(frames, spacing, None, image_size=(32, 32, 8))
    assert seg.shape == (2, 32, 32, 8) and seg.dtype == np.uint8 and not seg.any()
    assert image.shape == (2, 32, 32, 8)


def test_lv_centred_crop():
    # LV far from the image centre: after the crop it must sit at the crop centre
    frames, spacing, labels = _disc_case(centre=(25, 60))
    _, seg = preprocess_case(frames, spacing, labels, image_size=(32, 32, 8))
    xs, ys = np.nonzero((seg[0] == 1).any(axis=2))
    assert abs(xs.mean() - 15.5) <= 1.0 and abs(ys.mean() - 15.5) <= 1.0
    assert lv_centre(seg) == pytest.approx((15.5, 15.5), abs=1.0)


def test_resampling_honours_spacing_disc_area():
    r_mm = 18.0
    for spacing, target in (
        ((1.5, 1.5, 8.0), (3.0, 3.0, 10.0)),
        ((2.5, 2.5, 10.0), (1.0, 1.0, 10.0)),
    ):
        frames, sp, labels = _disc_case(spacing=spacing, r_mm=r_mm)
        _, seg = preprocess_case(
            frames, sp, labels, target_spacing=target, image_size=(96, 96, 8)
        )
        area = (seg[0, :, :, 0] == 1).sum() * target[0] * target[1]
        assert area == pytest.approx(np.pi * r_mm**2, rel=0.1)
    assert resampled_shape((100, 90, 10), (1.5, 1.5, 8.0), (3.0, 3.0, 10.0)) == (
        50,
        45,
        8,
    )


def test_joint_rescale_keeps_relative_contrast():
    frames, spacing, labels = _disc_case()
    frames[1] *= 0.5  # ES half as bright as ED
    image, _ = preprocess_case(frames, spacing, labels)
    assert image[0].max() == pytest.approx(1.0)
    assert image[1].max() < 0.7  # not rescaled separately per frame


def test_slices_padded_at_end_and_cropped_symmetrically():
    frames, spacing, labels = _disc_case(shape=(60, 60, 3), spacing=(3.0, 3.0, 10.0))
    frames[:, :, :, 1] += 0.3  # mark the middle slice
    image, seg = preprocess_case(frames, spacing, labels, image_size=(48, 48, 8))
    assert image[:, :, :, 3:].max() == 0.0 and not seg[:, :, :, 3:].any()
    assert image[:, :, :, :3].max() > 0
    # 12 slices -> keep the central 8 (2..9); mark slice 2 and 9
    frames, spacing, labels = _disc_case(shape=(60, 60, 12), spacing=(3.0, 3.0, 10.0))
    frames[:, :20, :20, :] = 0.0
    frames[:, :20, :20, 2] = 5.0
    frames[:, :20, :20, 9] = 5.0
    image, _ = preprocess_case(  # no labels: centre crop, in-plane grid unchanged
        frames, spacing, None, target_spacing=(3.0, 3.0, 10.0), image_size=(60, 60, 8)
    )
    corner = image[0, :20, :20, :].mean(axis=(0, 1))
    assert corner[0] > 0.5 and corner[7] > 0.5 and corner[1:7].max() < 0.1


def test_motion_fallback_finds_the_moving_disc():
    frames, spacing, _ = _disc_case(centre=(25, 60))
    _, seg_c = preprocess_case(frames, spacing, None, crop_fallback="center")
    image, _ = preprocess_case(frames, spacing, None, crop_fallback="motion")
    # bright disc ends up near the crop centre with the motion heuristic
    xs, ys = np.nonzero(image[0].mean(axis=2) > 0.5)
    assert abs(xs.mean() - 23.5) <= 2 and abs(ys.mean() - 23.5) <= 2
    with pytest.raises(DataError, match="crop_fallback"):
        preprocess_case(frames, spacing, None, crop_fallback="nope")


def test_bad_inputs_raise_data_error():
    frames, spacing, labels = _disc_case()
    with pytest.raises(DataError, match=r"\(2, X, Y, Z\)"):
        preprocess_case(frames[0], spacing, None)
    with pytest.raises(DataError, match="does not match"):
        preprocess_case(frames, spacing, labels[:, :-1])
    with pytest.raises(DataError, match="spacing"):
        preprocess_case(frames, (1.0, 0.0, 8.0), None)


def test_fast_enough():
    frames, spacing, labels = _disc_case(shape=(160, 160, 10))
    preprocess_case(frames, spacing, labels)
    t0 = time.perf_counter()
    for _ in range(5):
        preprocess_case(frames, spacing, labels)
    assert (time.perf_counter() - t0) / 5 < 0.25


def test_preprocessing_params_are_json_friendly():
    p = preprocessing_params((3, 3, 10), (48, 48, 8))
    assert p["target_spacing"] == [3.0, 3.0, 10.0] and p["image_size"] == [48, 48, 8]


# --------------------------------------------------------------------------- nifti


def _save(path, array, spacing=(1.5, 1.5, 8.0)):
    img = nib.Nifti1Image(array, np.diag([*spacing, 1.0]))
    img.header.set_zooms(tuple(spacing) + (1.0,) * (array.ndim - 3))
    nib.save(img, str(path))


def test_load_nifti_reads_array_and_spacing(tmp_path):
    data = np.arange(20 * 20 * 4 * 3, dtype=np.float32).reshape(20, 20, 4, 3)
    _save(tmp_path / "a.nii.gz", data)
    array, spacing, affine = load_nifti(tmp_path / "a.nii.gz", 4)
    np.testing.assert_array_equal(array, data)
    assert spacing == pytest.approx((1.5, 1.5, 8.0)) and affine.shape == (4, 4)
    # a 3D frame stored with a trailing singleton axis is accepted as 3D
    _save(tmp_path / "b.nii.gz", data[..., :1])
    assert load_nifti(tmp_path / "b.nii.gz", 3)[0].shape == (20, 20, 4)


def test_load_nifti_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_nifti(tmp_path / "nope.nii.gz", 3)


def test_load_nifti_wrong_ndim(tmp_path):
    _save(tmp_path / "a.nii.gz", np.zeros((20, 20, 4), np.float32))
    with pytest.raises(DataError, match=r"a\.nii\.gz.*3D.*expected 4D"):
        load_nifti(tmp_path / "a.nii.gz", 4)


def test_load_nifti_truncated_and_corrupt(tmp_path):
    rng = np.random.default_rng(0)
    _save(tmp_path / "a.nii.gz", rng.normal(size=(40, 40, 8, 6)).astype(np.float32))
    raw = (tmp_path / "a.nii.gz").read_bytes()
    (tmp_path / "trunc.nii.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"trunc\.nii\.gz.*re-extract"):
        load_nifti(tmp_path / "trunc.nii.gz", 4)
    (tmp_path / "junk.nii.gz").write_bytes(b"this is not a nifti file at all" * 20)
    with pytest.raises(DataError, match=r"junk\.nii\.gz"):
        load_nifti(tmp_path / "junk.nii.gz", 4)
    # valid gzip stream holding garbage
    (tmp_path / "garbage.nii.gz").write_bytes(gzip.compress(b"\x00" * 500))
    with pytest.raises(DataError, match=r"garbage\.nii\.gz"):
        load_nifti(tmp_path / "garbage.nii.gz", 4)
