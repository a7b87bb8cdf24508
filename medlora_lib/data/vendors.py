"""Scanner vendors: client sizes, label prevalence, acquisition grids and image appearance.

This module is the *feature shift* and *label shift* of the federated benchmark: what makes
a Siemens client look and behave differently from a Canon client. Explained in
``book/synthetic_data.md`` and ``notebooks/01_data_and_vendor_heterogeneity``.

Client sizes and prevalence follow the openly available data (see
``../shared/reference/datasets.md``): ACDC (Bernard et al. 2018, IEEE TMI 37:2514; 150
Siemens subjects, 30 per group) and the open part of M&Ms-1 (Campello et al. 2021, IEEE
TMI 40:3543; Siemens 95 with 22 NOR, Philips 125 with 65 NOR, GE 75 with 21 NOR, Canon 50
with 14 NOR). The disease mix of each M&Ms part (:data:`MNMS_DISEASE_MIX`) is an
*approximation* of the open M&Ms metadata (HCM and DCM dominate; HHD, ARV, IHD, AHS, LVNC
and "Other" are minorities); exact per-centre counts are not reproduced.

Appearance parameters (:data:`VENDOR_APPEARANCE`) are plausible, not measured: in-plane
resolution, field of view, slice spacing and frame counts lie in the published ranges of
the two data sets (in-plane 0.98-1.9 mm, slices 5-10 mm, 12-35 frames); contrast, SNR,
bias-field strength, blur and intensity scale are chosen so that the vendors differ
visibly and measurably. Each knob interpolates between the across-vendor mean (0) and
the vendor's own value (1): ``appearance_for(vendor, level)`` every numeric appearance
parameter (the feature shift, ``data.appearance_shift``), ``healthy_fraction`` /
``disease_mix`` the prevalence and disease mix (the label shift, ``data.label_shift``);
``data.heterogeneity`` sets both at once unless they are given (chapter 07 sweeps each).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

__all__ = [
    "VENDORS",
    "VENDOR_CODES",
    "VendorAppearance",
    "VENDOR_APPEARANCE",
    "CLIENT_PARTS",
    "ACDC_GROUPS",
    "MNMS_DISEASE_MIX",
    "MNMS_CENTRES",
    "MNMS2_VENDORS",
    "MNMS2_SUBJECTS",
    "MNMS2_HEALTHY_SHARE",
    "MNMS2_DISEASE_MIX",
    "appearance_for",
    "healthy_fraction",
    "disease_mix",
    "apply_appearance",
    "bias_field",
]

VENDORS = ("Siemens", "Philips", "GE", "Canon")
#: M&Ms vendor letters.
VENDOR_CODES = {"Siemens": "A", "Philips": "B", "GE": "C", "Canon": "D"}
#: M&Ms centres per vendor (Siemens 1, Philips 2 and 3, GE 4, Canon 5).
MNMS_CENTRES = {"Siemens": (1,), "Philips": (2, 3), "GE": (4,), "Canon": (5,)}
ACDC_GROUPS = ("DCM", "HCM", "MINF", "RV")


@dataclass(frozen=True)
class VendorAppearance:
    """How one vendor's scanners acquire and render a short-axis cine stack.

    Attributes:
        inplane_mm: in-plane voxel size (mm).
        fov_mm: field of view (mm) along X and Y.
        slice_spacing_mm: distance between short-axis slices (mm).
        psf_sigma_mm: in-plane blur (Gaussian point-spread sd, mm).
        snr: blood signal / noise sd (before the Rician magnitude).
        gamma: contrast curve exponent applied to the relative tissue signal.
        myo_to_blood: myocardium signal relative to blood (bSSFP contrast).
        bias_amplitude: strength of the smooth multiplicative coil bias field (log).
        intensity_scale: stored value of blood (scanner units).
        frames: (min, max) number of cine frames.
    """

    inplane_mm: float
    fov_mm: tuple[float, float]
    slice_spacing_mm: float
    psf_sigma_mm: float
    snr: float
    gamma: float
    myo_to_blood: float
    bias_amplitude: float
    intensity_scale: float
    frames: tuple[float, float]


VENDOR_APPEARANCE: dict[str, VendorAppearance] = {
    "Siemens": VendorAppearance(
        inplane_mm=1.40,
        fov_mm=(340.0, 300.0),
        slice_spacing_mm=10.0,
        psf_sigma_mm=0.6,
        snr=28.0,
        gamma=1.0,
        myo_to_blood=0.22,
        bias_amplitude=0.15,
        intensity_scale=450.0,
        frames=(20, 25),
    ),
    "Philips": VendorAppearance(
        inplane_mm=1.25,
        fov_mm=(320.0, 320.0),
        slice_spacing_mm=9.0,
        psf_sigma_mm=0.5,
        snr=32.0,
        gamma=0.8,
        myo_to_blood=0.30,
        bias_amplitude=0.30,
        intensity_scale=2600.0,
        frames=(22, 30),
    ),
    "GE": VendorAppearance(
        inplane_mm=1.55,
        fov_mm=(360.0, 360.0),
        slice_spacing_mm=8.0,
        psf_sigma_mm=1.0,
        snr=16.0,
        gamma=1.3,
        myo_to_blood=0.34,
        bias_amplitude=0.45,
        intensity_scale=1400.0,
        frames=(18, 25),
    ),
    "Canon": VendorAppearance(
        inplane_mm=1.85,
        fov_mm=(380.0, 330.0),
        slice_spacing_mm=7.0,
        psf_sigma_mm=1.2,
        snr=12.0,
        gamma=0.9,
        myo_to_blood=0.27,
        bias_amplitude=0.25,
        intensity_scale=300.0,
        frames=(16, 22),
    ),
}

#: (vendor, part) -> (open subjects, of which NOR). Part "acdc" = ACDC (Siemens only),
#: "mnms" = the open M&Ms-1 subjects of that vendor.
CLIENT_PARTS: dict[tuple[str, str], tuple[int, int]] = {
    ("Siemens", "acdc"): (150, 30),
    ("Siemens", "mnms"): (95, 22),
    ("Philips", "mnms"): (125, 65),
    ("GE", "mnms"): (75, 21),
    ("Canon", "mnms"): (50, 14),
}

#: Approximate disease mix among the *diseased* subjects of each M&Ms part (sums to 1).
MNMS_DISEASE_MIX: dict[str, dict[str, float]] = {
    "Siemens": {"HCM": .33, "DCM": .26, "HHD": .10, "ARV": .10, "IHD": .07,
                "AHS": .05, "LVNC": .03, "Other": .06},
    "Philips": {"HCM": .36, "DCM": .22, "HHD": .16, "ARV": .06, "IHD": .04,
                "AHS": .08, "LVNC": .03, "Other": .05},
    "GE": {"HCM": .40, "DCM": .25, "HHD": .08, "ARV": .08, "IHD": .06,
           "AHS": .04, "LVNC": .05, "Other": .04},
    "Canon": {"HCM": .28, "DCM": .30, "HHD": .10, "ARV": .10, "IHD": .10,
              "AHS": .04, "LVNC": .04, "Other": .04},
}  # fmt: skip

#: The vendors of M&Ms-2 (Martin-Isla et al. 2023): no Canon.
MNMS2_VENDORS = ("Siemens", "Philips", "GE")
#: Subjects per vendor of the synthetic M&Ms-2 part at ``scale=1``. M&Ms-2 has 360
#: subjects from these three vendors; the reference material does not give the split,
#: so it is taken as even (an assumption, not the real counts).
MNMS2_SUBJECTS = {"Siemens": 120, "Philips": 120, "GE": 120}
#: Share of ``NOR`` subjects in every vendor's M&Ms-2 part (a design value: the real
#: per-vendor prevalence is not in the reference material).
MNMS2_HEALTHY_SHARE = 0.25
#: M&Ms-2 disease codes and their shares among the diseased (equal: a design value).
#: ``LV`` dilated LV, ``RV`` dilated RV, ``HCM``, ``ARR`` (arrhythmogenic), ``FALL``
#: (tetralogy of Fallot), ``CIA`` (inter-atrial communication), ``TRI`` (tricuspid
#: regurgitation); their phantom phenotypes are in ``phantom.PATHOLOGY_TO_PHENOTYPE``.
MNMS2_DISEASE_MIX: dict[str, float] = {
    c: 1 / 7 for c in ("LV", "RV", "HCM", "ARR", "FALL", "CIA", "TRI")
}


def _mean_appearance() -> VendorAppearance:
    values = {}
    for f in dataclasses.fields(VendorAppearance):
        items = [
            np.asarray(getattr(VENDOR_APPEARANCE[v], f.name), float) for v in VENDORS
        ]
        mean = np.mean(items, axis=0)
        values[f.name] = tuple(mean.tolist()) if mean.ndim else float(mean)
    return VendorAppearance(**values)


def appearance_for(vendor: str, heterogeneity: float) -> VendorAppearance:
    """The vendor's appearance at a heterogeneity level.

    Args:
        vendor: one of :data:`VENDORS`.
        heterogeneity: 0 = the across-vendor mean for every vendor, 1 = the vendor's own
            parameters, linear in between.

    Returns:
        The interpolated :class:`VendorAppearance`.
    """
    mean, own = _mean_appearance(), VENDOR_APPEARANCE[vendor]
    h = float(heterogeneity)
    values = {}
    for f in dataclasses.fields(VendorAppearance):
        m = np.asarray(getattr(mean, f.name), float)
        o = np.asarray(getattr(own, f.name), float)
        v = m + h * (o - m)
        values[f.name] = tuple(v.tolist()) if v.ndim else float(v)
    return VendorAppearance(**values)


def _overall_healthy_fraction() -> float:
    total = sum(n for n, _ in CLIENT_PARTS.values())
    return sum(h for _, h in CLIENT_PARTS.values()) / total


def healthy_fraction(vendor: str, part: str, heterogeneity: float) -> float:
    """Share of NOR subjects in a client part: overall share (h=0) to the real one (h=1)."""
    n, healthy = CLIENT_PARTS[(vendor, part)]
    overall = _overall_healthy_fraction()
    return overall + float(heterogeneity) * (healthy / n - overall)


def disease_mix(vendor: str, part: str, heterogeneity: float) -> dict[str, float]:
    """Disease codes and their shares among diseased subjects of a client part.

    The ACDC part keeps its design (four groups of equal size, ACDC group codes). The
    M&Ms parts interpolate between the pooled M&Ms mix (h=0) and their own (h=1).
    """
    if part == "acdc":
        return {g: 1 / len(ACDC_GROUPS) for g in ACDC_GROUPS}
    weights = {
        v: CLIENT_PARTS[(v, "mnms")][0] - CLIENT_PARTS[(v, "mnms")][1] for v in VENDORS
    }
    codes = list(MNMS_DISEASE_MIX["Siemens"])
    pooled = {
        c: sum(weights[v] * MNMS_DISEASE_MIX[v][c] for v in VENDORS)
        / sum(weights.values())
        for c in codes
    }
    own = MNMS_DISEASE_MIX[vendor]
    h = float(heterogeneity)
    return {c: pooled[c] + h * (own[c] - pooled[c]) for c in codes}


def bias_field(
    rng: np.random.Generator, shape: tuple[int, int, int], amplitude: float
) -> np.ndarray:
    """A smooth multiplicative coil bias field ``exp(amplitude * f)``, ``|f| <= 1``.

    ``f`` is a random quadratic polynomial in normalised coordinates (a receive-coil
    sensitivity that varies slowly across the field of view and a little along slices).
    """
    x = np.linspace(-1, 1, shape[0], dtype=np.float32)[:, None, None]
    y = np.linspace(-1, 1, shape[1], dtype=np.float32)[None, :, None]
    z = np.linspace(-1, 1, shape[2], dtype=np.float32)[None, None, :]
    c = rng.normal(size=7).astype(np.float32)
    f = c[0] * x + c[1] * y + c[2] * x * y + c[3] * x**2 + c[4] * y**2 + 0.3 * c[5] * z
    f = f + 0.3 * c[6] * x * z
    f = f / max(float(np.abs(f).max()), 1e-6)
    return np.exp(amplitude * f).astype(np.float32)


def apply_appearance(
    signal: np.ndarray,
    spacing: tuple[float, float, float],
    appearance: VendorAppearance,
    bias: np.ndarray,
    scale: float,
    snr: float,
    noise_rng: np.random.Generator,
) -> np.ndarray:
    """Turn a contrast-mapped signal frame into a vendor image (float32, scanner units).

    The contrast curve (``relative signal ** gamma``) is applied by the caller to the
    tissue values (cheaper than per voxel); here follow the in-plane point-spread blur,
    the coil bias field, the intensity scale, Rician noise (magnitude of complex
    Gaussian noise) and rounding to integers as stored by scanners.

    Args:
        signal: ``(X, Y, Z)`` signal after the contrast curve (blood = 1).
        spacing: voxel size (mm).
        appearance: the vendor's parameters (for the blur).
        bias: multiplicative field, same shape as ``signal``.
        scale, snr: the subject's intensity scale and SNR (vendor value with a small
            per-subject jitter).
        noise_rng: generator for the noise of this frame.

    Returns:
        The frame, float32 ``(X, Y, Z)``, non-negative integers.
    """
    sigma = (
        appearance.psf_sigma_mm / spacing[0],
        appearance.psf_sigma_mm / spacing[1],
        0.0,
    )
    img = gaussian_filter(
        signal.astype(np.float32, copy=False), sigma=sigma, mode="nearest"
    )
    img *= bias
    img *= np.float32(scale)
    noise_sd = np.float32(scale / snr)
    real = noise_rng.standard_normal(img.shape, dtype=np.float32)
    real *= noise_sd
    real += img
    imag = noise_rng.standard_normal(img.shape, dtype=np.float32)
    imag *= noise_sd
    np.multiply(real, real, out=real)
    np.multiply(imag, imag, out=imag)
    real += imag
    np.sqrt(real, out=real)
    return np.rint(real, out=real)
