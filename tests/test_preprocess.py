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


# ------------------------------------------------- CineMA's crop and intensities
# The expected values below come from an independent transcription of CineMA's own
# code (mathpluscode/CineMA, cinema/data/sitk.py), not from medlora_lib.


def _cinema_bbox(mask):
    """CineMA's get_valid_binary_mask_bounding_box (min inclusive, max exclusive)."""
    from itertools import combinations

    ndim = mask.ndim
    bbox_min, bbox_max = [], []
    for axes in combinations(reversed(range(ndim)), ndim - 1):
        reduced = np.amax(mask, axis=axes)
        bbox_min.append(np.argmax(reduced))
        bbox_max.append(reduced.shape[0] - np.argmax(np.flip(reduced)))
    return np.stack(bbox_min), np.stack(bbox_max)


def _cinema_crop_1d(bbox_min, bbox_max, current_length, target_length):
    """CineMA's get_center_crop_size_from_1d_bbox, line by line."""
    if current_length <= target_length:
        return 0, 0
    label_center = (bbox_max - 1 + bbox_min) / 2.0
    bbox_lower = int(np.ceil(label_center - target_length / 2.0))
    bbox_upper = bbox_lower + target_length
    bbox_lower = max(bbox_lower, 0)
    if bbox_upper > current_length:
        bbox_lower -= bbox_upper - current_length
    crop_lower = bbox_lower
    crop_upper = current_length - target_length - crop_lower
    return crop_lower, crop_upper


def _cinema_clip_normalise(frame):
    """clip_and_normalise_intensity_3d: Clamp, Normalize (z-score), RescaleIntensity."""
    lo, hi = np.percentile(frame, 0.95), np.percentile(frame, 99.5)
    x = np.clip(frame.astype(np.float64), lo, hi)
    x = (x - x.mean()) / x.std()
    return (x - x.min()) / (x.max() - x.min())


def _cinema_input(frames, labels, size):
    """CineMA's ACDC / M&Ms preprocessing on an already resampled grid + its loader's
    SpatialPadd(method="end") (the uint8 storage left out)."""
    bmin, bmax = _cinema_bbox(labels[0] == 1)  # LV at ED
    lower, upper = [], []
    target = (*size[:2], frames.shape[3])  # z: CineMA's target is n_slices
    for i, (n, t) in enumerate(zip(frames.shape[1:], target, strict=True)):
        lo, up = _cinema_crop_1d(bmin[i], bmax[i], n, t)
        lower.append(lo)
        upper.append(up)
    x = frames[
        :,
        lower[0] : frames.shape[1] - upper[0],
        lower[1] : frames.shape[2] - upper[1],
        lower[2] : frames.shape[3] - upper[2],
    ]
    x = np.stack([_cinema_clip_normalise(f) for f in x])
    out = np.zeros((2, *size))
    out[:, : x.shape[1], : x.shape[2], : x.shape[3]] = x
    return out


def _border_case(shape=(70, 64, 5), lv=((2, 12), (50, 62)), seed=0):
    rng = np.random.default_rng(seed)
    frames = rng.gamma(2.0, 60.0, size=(2, *shape)).astype(np.float32)
    frames[1] *= 0.5
    labels = np.zeros((2, *shape), np.uint8)
    (x0, x1), (y0, y1) = lv
    labels[:, x0:x1, y0:y1, 1:4] = 1
    frames[:, x0:x1, y0:y1, 1:4] += 400.0
    return frames, labels


CINEMA = dict(crop="shift_inside", intensity="per_frame")
SAME_GRID = dict(target_spacing=(1.0, 1.0, 10.0))


@pytest.mark.parametrize(
    "shape, lv",
    [
        ((70, 64, 5), ((2, 12), (50, 62))),  # LV at the low x / high y border
        ((70, 64, 5), ((58, 69), (0, 9))),  # high x / low y
        ((70, 64, 5), ((30, 41), (25, 36))),  # central: no shift needed
        ((40, 64, 5), ((2, 12), (50, 62))),  # x shorter than the window: pad at end
    ],
)
def test_shift_inside_crop_equals_cinema(shape, lv):
    frames, labels = _border_case(shape, lv)
    size = (48, 48, 8)
    image, seg = preprocess_case(
        frames, (1.0, 1.0, 10.0), labels, image_size=size, **SAME_GRID, **CINEMA
    )
    expected = _cinema_input(frames, labels, size)
    np.testing.assert_allclose(image, expected, atol=2e-6)
    # the label is cropped with the same window
    assert seg[0].sum() == labels[0].sum() and seg[0, ..., 5:].sum() == 0
    # no zero band where the image is at least as large as the window
    frame = image[0, :, :, 2]
    if shape[0] >= size[0]:
        assert frame.any(axis=1).all() and frame.any(axis=0).all()
    else:  # padded at the end of x only, as CineMA's loader (SpatialPadd "end") does
        assert frame[: shape[0]].any(axis=1).all() and not frame[shape[0] :].any()


def test_lv_centred_crop_keeps_zero_bands_at_the_border():
    frames, labels = _border_case()
    image, _ = preprocess_case(
        frames, (1.0, 1.0, 10.0), labels, image_size=(48, 48, 8), **SAME_GRID
    )
    frame = image[0, :, :, 2]
    # LV x centre 6.5 -> window starts at -17: 17 rows of zeros before the image
    assert not frame[:17].any() and frame[17:].any(axis=1).all()


def test_cinema_crop_start_matches_cinema_formula():
    from medlora_lib.data.preprocess import cinema_crop_start

    rng = np.random.default_rng(1)
    for _ in range(500):
        n = int(rng.integers(5, 300))
        size = int(rng.integers(1, 200))
        a = int(rng.integers(0, n))
        b = int(rng.integers(a + 1, n + 1))  # exclusive
        centre = (a + b - 1) / 2.0
        assert cinema_crop_start(centre, size, n) == _cinema_crop_1d(a, b, n, size)[0]


def test_per_frame_vs_joint_intensity():
    frames, labels = _border_case(lv=((30, 41), (25, 36)))
    frames[1] = 0.5 * frames[0]  # ES half as bright as ED
    kw = dict(image_size=(48, 48, 8), **SAME_GRID)
    joint, _ = preprocess_case(frames, (1.0, 1.0, 10.0), labels, **kw)
    per, _ = preprocess_case(
        frames, (1.0, 1.0, 10.0), labels, intensity="per_frame", **kw
    )
    assert joint[0].max() == pytest.approx(1.0) and joint[1].max() < 0.85
    # per frame: each frame spans [0, 1]; ES = 0.5 * ED, so rescaled alike
    for t in (0, 1):
        assert per[t].min() == 0.0 and per[t].max() == pytest.approx(1.0)
    np.testing.assert_allclose(per[1], per[0], atol=1e-5)
    # percentiles per frame over the cropped volume, before padding
    crop = frames[0, 11:59, 6:54, :]
    lo, hi = np.percentile(crop, (0.95, 99.5))
    want = (np.clip(crop, lo, hi) - lo) / (hi - lo)
    np.testing.assert_allclose(per[0, :, :, :5], want, atol=2e-6)


def test_unknown_crop_or_intensity_is_refused():
    frames, labels = _border_case()
    with pytest.raises(DataError, match="crop='middle'"):
        preprocess_case(frames, (1.0, 1.0, 10.0), labels, crop="middle")
    with pytest.raises(DataError, match="intensity='none'"):
        preprocess_case(frames, (1.0, 1.0, 10.0), labels, intensity="none")


def test_cpu_recipe_unchanged_bit_for_bit():
    """Digests of the first recipe, computed with the code before crop / intensity
    became options (the book's cached results rest on it)."""
    import hashlib

    rng = np.random.default_rng(42)
    frames = rng.gamma(2.0, 50.0, size=(2, 40, 36, 5)).astype(np.float32)
    frames[1] *= 0.6
    labels = np.zeros((2, 40, 36, 5), np.uint8)
    labels[:, 3:9, 28:34, 1:4] = 1
    grid = dict(target_spacing=(2.0, 2.0, 10.0))
    for kw in ({}, {"crop": "lv_centred", "intensity": "joint"}):
        im, seg = preprocess_case(
            frames, (2.0, 2.0, 10.0), labels, image_size=(24, 24, 8), **grid, **kw
        )
        digest = hashlib.sha256(im.tobytes() + seg.tobytes()).hexdigest()[:16]
        assert digest == "2d1db13645fb4238"
    im, seg = preprocess_case(
        frames, (2.0, 2.0, 10.0), None, image_size=(48, 24, 4), **grid
    )
    assert hashlib.sha256(im.tobytes() + seg.tobytes()).hexdigest()[:16] == (
        "c70d606dec0a42e5"
    )


def test_profiles_choose_the_recipe():
    from medlora_lib.config import get_config
    from medlora_lib.data.synthetic import SynthConfig
    from medlora_lib.pipeline import synthetic_config

    for profile, crop, intensity in (
        ("smoke", "lv_centred", "joint"),
        ("cpu", "lv_centred", "joint"),
        ("paper", "shift_inside", "per_frame"),
    ):
        cfg = get_config(profile)
        assert (cfg.data.crop, cfg.data.intensity) == (crop, intensity)
        scfg = synthetic_config(cfg)
        assert (scfg.crop, scfg.intensity) == (crop, intensity)
        sp = SynthConfig.for_profile(profile)
        assert (sp.crop, sp.intensity) == (crop, intensity)


def test_preprocessing_params_record_the_recipe_and_read_old_folders():
    from medlora_lib.data.preprocess import normalise_preprocessing

    new = preprocessing_params((1, 1, 10), (192, 192, 16), crop="shift_inside",
                               intensity="per_frame")  # fmt: skip
    assert new["crop"] == "shift_inside" and new["intensity"] == "per_frame"
    # a folder written before the options existed: lv_centred + joint
    old = dict(preprocessing_params((3, 3, 10), (48, 48, 8)))
    old["crop"] = "lv_bbox_centre_at_ED"
    del old["intensity"], old["crop_centre"]
    assert normalise_preprocessing(old) == preprocessing_params((3, 3, 10), (48, 48, 8))
