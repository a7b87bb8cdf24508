"""A beating-heart phantom for short-axis cine CMR: phenotypes, geometry, rendering.

This module knows anatomy and disease, not scanners (vendor appearance lives in
:mod:`medlora_lib.data.vendors`). Explained in the book chapter ``book/synthetic_data.md``
and used in ``notebooks/01_data_and_vendor_heterogeneity``.

Phenotypes
----------
Each subject gets a *phenotype*: LV end-diastolic volume index (EDVi, mL/m^2), LV
ejection fraction (EF, %), maximal end-diastolic wall thickness (mm), RV EDVi and RV EF,
plus body size (height, weight, BSA by Mosteller). The class distributions below are
drawn from (clipped) normal distributions whose centres follow the published criteria and
whose spreads deliberately cross the diagnostic thresholds, so that some cases are hard:

* **NOR** - normal ranges of Kawel-Boehm et al. 2020 (JCMR 22:87, SSFP, adults):
  LV EDVi about 56-105 mL/m^2, LV EF 57-77 %, RV EDVi 61-121 mL/m^2, RV EF 47-71 %,
  end-diastolic wall thickness <= 11-12 mm.
* ACDC groups (Bernard et al. 2018, IEEE TMI 37:2514, section II-A):
  **DCM** LV EDVi > 100 mL/m^2 and LV EF < 40 %; **HCM** wall thickness > 15 mm in
  diastole with normal EF (> 55 %); **MINF** LV EF < 40 % with abnormal regional
  contraction (here: an akinetic, thinned sector); **RV** RV EDVi > 110 (men) /
  100 (women) mL/m^2 or RV EF < 40 %; **NOR** LV EF > 50 %, normal wall and volumes.
* Extra M&Ms phenotypes (Campello et al. 2021, IEEE TMI 40:3543): **HHD** hypertensive
  heart disease = mild concentric hypertrophy 12-15 mm with preserved EF (hard: overlaps
  normal); **AHS** athlete's heart = dilated LV (and RV) with normal EF, labelled disease
  in M&Ms (hard); **LVNC** LV non-compaction = mildly dilated LV with mildly reduced EF;
  **OTHER** = a broad mixture of mild abnormalities. ``ARV`` maps to ``RV`` and ``IHD``
  to ``MINF``.

The exact means / spreads are in :data:`PHENOTYPE_PRIORS` (explicit, documented
difficulty parameters; they were not tuned to favour any method).

Geometry
--------
The LV is a truncated, thick-walled half-ellipsoid whose long axis is (up to a small tilt)
the slice axis of the short-axis stack: cavity radius ``r_c(theta, u) = R(theta, u)
sqrt(1 - (u / lambda)^2)`` and epicardial radius ``r_o = (R + t(theta, u)) sqrt(1 - u^2)``
for the normalised level ``u`` in [0, 1] (0 = base, 1 = epicardial apex), where
``t(theta, u)`` is the wall-thickness field (septal bulge for HCM, concentric for HHD,
a thinned sector for MINF). The cavity volume is integrated on a polar grid and the radii
are solved to hit the target EDV and ESV exactly (up to voxelisation). At end-systole the
base descends towards the (fixed) apex, the cavity shrinks (an akinetic infarct sector
does not move) and the myocardium thickens by conservation of myocardial volume. The RV
is an ellipse per level, offset towards the septum and cut by the LV epicardium (a
crescent), scaled to its target EDV / ESV. Intermediate cine frames interpolate between
ED and ES along a simple volume curve (ejection, rapid filling, diastasis, atrial kick).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = [
    "PHENOTYPES",
    "PHENOTYPE_PRIORS",
    "PATHOLOGY_TO_PHENOTYPE",
    "TISSUES",
    "Phenotype",
    "HeartGeometry",
    "Pose",
    "sample_phenotype",
    "build_geometry",
    "cycle_fraction",
    "render_heart",
    "render_body",
]

PHENOTYPES = ("NOR", "DCM", "HCM", "MINF", "RV", "HHD", "AHS", "LVNC", "OTHER")

#: Dataset codes (ACDC groups, M&Ms-1 / M&Ms-2 pathologies) -> phantom phenotype.
PATHOLOGY_TO_PHENOTYPE = {
    "NOR": "NOR",
    "DCM": "DCM",
    "HCM": "HCM",
    "MINF": "MINF",
    "RV": "RV",
    "ARV": "RV",
    "IHD": "MINF",
    "HHD": "HHD",
    "AHS": "AHS",
    "LVNC": "LVNC",
    "Other": "OTHER",
    "OTHER": "OTHER",
    # M&Ms-2 codes (NOR, HCM and RV as above). The phantom has no phenotype of its own
    # for the right-heart diseases: the dilated, hypokinetic RV one is the closest.
    "LV": "DCM",  # dilated LV
    "ARR": "RV",  # arrhythmogenic (right-heart involvement, as M&Ms-1 ARV)
    "FALL": "RV",  # repaired tetralogy of Fallot: RV volume overload
    "CIA": "RV",  # inter-atrial communication (atrial septal defect): RV overload
    "TRI": "RV",  # tricuspid regurgitation: RV overload
}

# (mean, sd, low, high) of clipped normals. EDVi in mL/m^2, EF in %, wall in mm.
# `wall_ratio` = remote (lateral) / maximal wall thickness; `sphericity` = LV long axis /
# basal cavity radius. Sources in the module docstring and in book/synthetic_data.md.
PHENOTYPE_PRIORS: dict[str, dict[str, tuple[float, float, float, float]]] = {
    "NOR": {
        "lv_edvi": (78, 12, 52, 108),
        "lv_ef": (63, 6, 48, 78),
        "wall_max": (9.0, 1.4, 6.0, 13.0),
        "wall_ratio": (0.85, 0.06, 0.7, 1.0),
        "rv_edvi": (84, 13, 58, 125),
        "rv_ef": (58, 6, 42, 72),
        "sphericity": (3.3, 0.25, 2.7, 4.0),
    },
    "DCM": {
        "lv_edvi": (130, 22, 88, 220),
        "lv_ef": (29, 8, 10, 48),
        "wall_max": (8.8, 1.4, 6.0, 12.0),
        "wall_ratio": (0.85, 0.06, 0.7, 1.0),
        "rv_edvi": (98, 20, 60, 170),
        "rv_ef": (46, 10, 20, 68),
        "sphericity": (2.6, 0.25, 2.1, 3.3),
    },
    "HCM": {
        "lv_edvi": (72, 13, 45, 105),
        "lv_ef": (68, 7, 50, 85),
        "wall_max": (19.0, 3.5, 13.0, 30.0),
        "wall_ratio": (0.6, 0.1, 0.4, 0.9),
        "rv_edvi": (78, 13, 55, 115),
        "rv_ef": (60, 6, 45, 75),
        "sphericity": (3.4, 0.25, 2.8, 4.0),
    },
    "MINF": {
        "lv_edvi": (104, 20, 68, 170),
        "lv_ef": (35, 8, 15, 53),
        "wall_max": (9.5, 1.4, 6.5, 13.0),
        "wall_ratio": (0.85, 0.06, 0.7, 1.0),
        "rv_edvi": (86, 15, 58, 130),
        "rv_ef": (50, 8, 30, 68),
        "sphericity": (3.0, 0.3, 2.3, 3.8),
    },
    "RV": {
        "lv_edvi": (76, 14, 48, 110),
        "lv_ef": (57, 8, 40, 75),
        "wall_max": (8.8, 1.4, 6.0, 12.5),
        "wall_ratio": (0.85, 0.06, 0.7, 1.0),
        "rv_edvi": (130, 25, 85, 220),
        "rv_ef": (38, 9, 15, 58),
        "sphericity": (3.3, 0.25, 2.7, 4.0),
    },
    "HHD": {
        "lv_edvi": (80, 14, 52, 115),
        "lv_ef": (61, 7, 45, 78),
        "wall_max": (13.5, 1.5, 11.0, 17.5),
        "wall_ratio": (0.9, 0.05, 0.78, 1.0),
        "rv_edvi": (82, 13, 58, 120),
        "rv_ef": (57, 6, 42, 72),
        "sphericity": (3.2, 0.25, 2.6, 3.9),
    },
    "AHS": {
        "lv_edvi": (108, 12, 85, 145),
        "lv_ef": (58, 6, 46, 72),
        "wall_max": (11.0, 1.3, 8.5, 14.0),
        "wall_ratio": (0.9, 0.05, 0.78, 1.0),
        "rv_edvi": (110, 15, 80, 150),
        "rv_ef": (55, 6, 42, 68),
        "sphericity": (3.1, 0.25, 2.6, 3.8),
    },
    "LVNC": {
        "lv_edvi": (100, 20, 65, 160),
        "lv_ef": (44, 10, 22, 64),
        "wall_max": (8.5, 1.3, 6.0, 12.0),
        "wall_ratio": (0.85, 0.06, 0.7, 1.0),
        "rv_edvi": (88, 16, 58, 135),
        "rv_ef": (52, 9, 30, 70),
        "sphericity": (2.9, 0.3, 2.3, 3.7),
    },
    "OTHER": {
        "lv_edvi": (90, 20, 55, 150),
        "lv_ef": (53, 11, 25, 75),
        "wall_max": (10.5, 2.2, 6.5, 17.0),
        "wall_ratio": (0.85, 0.06, 0.7, 1.0),
        "rv_edvi": (95, 20, 58, 160),
        "rv_ef": (50, 9, 28, 70),
        "sphericity": (3.1, 0.3, 2.4, 3.9),
    },
}

#: bSSFP-like relative signal of each tissue before vendor contrast (bright blood, dark
#: myocardium, bright fat, dark lungs). Vendors rescale blood / myocardium / fat.
TISSUES = {
    "air": 0.0,
    "blood": 1.0,
    "myocardium": 0.25,
    "fat": 0.85,
    "muscle": 0.3,
    "lung": 0.04,
    "liver": 0.38,
    "spine": 0.45,
    "organ": 0.55,
}

_N_THETA = 72  # polar grid: 5 degree bins
_N_LEVEL = 48  # normalised levels from base (0) to epicardial apex (1)


def _clipped_normal(rng: np.random.Generator, prior: tuple[float, ...]) -> float:
    mean, sd, low, high = prior
    return float(np.clip(rng.normal(mean, sd), low, high))


@dataclass
class Phenotype:
    """The clinical description of one synthetic subject (units in field names).

    Attributes:
        phenotype: one of :data:`PHENOTYPES`.
        sex: ``"M"`` or ``"F"``.
        height_cm, weight_kg, bsa_m2: body size (BSA by Mosteller).
        lv_edvi, lv_ef: LV end-diastolic volume index (mL/m^2) and ejection fraction (%).
        wall_max_mm: maximal end-diastolic LV wall thickness (mm), ``wall_remote_mm`` the
            thickness away from the hypertrophied / infarcted region.
        rv_edvi, rv_ef: RV volume index (mL/m^2) and ejection fraction (%).
        sphericity: LV cavity long axis / basal radius (lower = rounder, as in DCM).
        infarct: for MINF only, ``(centre_deg, width_deg, level_from, level_to, thinning)``.
        hypertrophy_deg: angular centre of the maximal wall thickness (0 = septum).
    """

    phenotype: str
    sex: str
    height_cm: float
    weight_kg: float
    bsa_m2: float
    age: int
    lv_edvi: float
    lv_ef: float
    wall_max_mm: float
    wall_remote_mm: float
    rv_edvi: float
    rv_ef: float
    sphericity: float
    hypertrophy_deg: float
    infarct: tuple[float, float, float, float, float] | None = None

    @property
    def lv_edv_ml(self) -> float:
        return self.lv_edvi * self.bsa_m2

    @property
    def rv_edv_ml(self) -> float:
        return self.rv_edvi * self.bsa_m2

    def to_dict(self) -> dict:
        out = asdict(self)
        out["lv_edv_ml"] = self.lv_edv_ml
        out["rv_edv_ml"] = self.rv_edv_ml
        out["lv_esv_ml"] = self.lv_edv_ml * (1 - self.lv_ef / 100)
        out["rv_esv_ml"] = self.rv_edv_ml * (1 - self.rv_ef / 100)
        return out


def sample_phenotype(
    rng: np.random.Generator, phenotype: str, overlap: float = 1.0
) -> Phenotype:
    """Draw one subject's phenotype.

    Args:
        rng: the subject's random generator.
        phenotype: one of :data:`PHENOTYPES`.
        overlap: multiplies every spread (sd) in :data:`PHENOTYPE_PRIORS`; 1 = the
            documented design, 0 = every subject at its class centre (easy), > 1 more
            overlap (harder). An explicit difficulty knob of the data set.

    Returns:
        The :class:`Phenotype`.
    """
    if phenotype not in PHENOTYPE_PRIORS:
        raise ValueError(
            f"unknown phenotype {phenotype!r}; expected one of {PHENOTYPES}"
        )
    priors = PHENOTYPE_PRIORS[phenotype]
    draw = {
        k: _clipped_normal(rng, (m, s * overlap, lo, hi))
        for k, (m, s, lo, hi) in priors.items()
    }
    sex = "M" if rng.random() < 0.6 else "F"
    height = rng.normal(176, 7) if sex == "M" else rng.normal(163, 6.5)
    bmi = float(np.clip(rng.normal(26, 4), 18, 40))
    if phenotype == "AHS":
        bmi = float(np.clip(rng.normal(23.5, 2), 19, 30))
    weight = bmi * (height / 100) ** 2
    bsa = float(np.sqrt(height * weight / 3600.0))
    age = int(np.clip(rng.normal(25 if phenotype == "AHS" else 52, 14), 16, 90))
    # where the wall is thickest: septum for HCM (asymmetric septal hypertrophy), random
    # elsewhere (0 deg = septum, the direction of the RV)
    if phenotype == "HCM":
        hyp_deg = float(rng.normal(0, 25))
    else:
        hyp_deg = float(rng.uniform(-180, 180))
    infarct = None
    if phenotype == "MINF":
        # a coronary territory: anterior / lateral / inferior, mid-apical or basal-mid
        centre = float(rng.choice([-90.0, 180.0, 90.0]) + rng.normal(0, 20))
        width = float(rng.uniform(60, 140))
        start = float(rng.uniform(0.0, 0.45))
        stop = min(1.0, start + float(rng.uniform(0.45, 0.8)))
        thinning = float(rng.uniform(0.45, 0.7))  # infarct wall / remote wall
        infarct = (centre, width, start, stop, thinning)
    return Phenotype(
        phenotype=phenotype,
        sex=sex,
        height_cm=float(height),
        weight_kg=float(weight),
        bsa_m2=bsa,
        age=age,
        lv_edvi=draw["lv_edvi"],
        lv_ef=draw["lv_ef"],
        wall_max_mm=draw["wall_max"],
        wall_remote_mm=draw["wall_max"] * draw["wall_ratio"],
        rv_edvi=draw["rv_edvi"],
        rv_ef=draw["rv_ef"],
        sphericity=draw["sphericity"],
        hypertrophy_deg=hyp_deg,
        infarct=infarct,
    )


# ----------------------------------------------------------------------------- geometry


@dataclass
class HeartGeometry:
    """Polar description of the heart at ED (index 0) and ES (index 1).

    ``r_cav`` / ``r_epi`` are ``(2, n_level, n_theta)`` radii in mm on the normalised
    levels ``u`` (0 = base, 1 = epicardial apex) and angles ``theta`` (0 = towards the
    RV). ``length`` is the base-to-epicardial-apex length (mm) per phase; ``rv_scale``
    the RV ellipse scale per phase; the RV ellipse at level u has radial / tangential
    semi-axes ``rv_scale * rv_axes * sqrt(1 - (u / rv_extent)^2)``.
    """

    r_cav: np.ndarray
    r_epi: np.ndarray
    length: np.ndarray
    rv_scale: np.ndarray
    rv_axes: tuple[float, float]
    rv_extent: float
    rv_offset: float
    volumes_ml: dict = field(default_factory=dict)

    def at(self, alpha: float) -> HeartGeometry:
        """The geometry at cycle fraction ``alpha`` (0 = ED, 1 = ES), interpolated."""
        a = float(alpha)

        def mix(x: np.ndarray) -> np.ndarray:
            return (1 - a) * x[0] + a * x[1]

        return HeartGeometry(
            r_cav=np.stack([mix(self.r_cav)] * 2),
            r_epi=np.stack([mix(self.r_epi)] * 2),
            length=np.full(2, mix(self.length)),
            rv_scale=np.full(2, mix(self.rv_scale)),
            rv_axes=self.rv_axes,
            rv_extent=self.rv_extent,
            rv_offset=self.rv_offset,
        )


def _levels() -> np.ndarray:
    return (np.arange(_N_LEVEL) + 0.5) / _N_LEVEL


def _thetas() -> np.ndarray:
    return np.deg2rad(np.arange(_N_THETA) * 360.0 / _N_THETA - 180.0)


def _angular_bump(theta: np.ndarray, centre_deg: float, width_deg: float) -> np.ndarray:
    d = np.angle(np.exp(1j * (theta - np.deg2rad(centre_deg))))
    return np.exp(-0.5 * (d / np.deg2rad(width_deg / 2.355)) ** 2)


def _cavity_volume(r_cav: np.ndarray, length: float) -> float:
    """Volume (mm^3) of a polar cavity field (n_level, n_theta) over ``length`` mm."""
    dtheta = 2 * np.pi / _N_THETA
    return float(0.5 * (r_cav**2).sum() * dtheta * length / _N_LEVEL)


_DISK = None


def _unit_disk_points() -> np.ndarray:
    """A fixed, deterministic set of points filling the unit disk (for RV areas)."""
    global _DISK
    if _DISK is None:
        g = (np.arange(16) + 0.5) / 16 * 2 - 1
        x, y = np.meshgrid(g, g, indexing="ij")
        keep = x**2 + y**2 <= 1
        _DISK = np.stack([x[keep], y[keep]], axis=1)
    return _DISK


def _rv_volume(
    scales: np.ndarray, r_epi: np.ndarray, length: float, axes, extent, offset
) -> np.ndarray:
    """RV cavity volume (mm^3) for each candidate ellipse scale (vectorised).

    The crescent area per level is the ellipse area times the share of a fixed set of
    points in the ellipse that lie outside the LV epicardium ``r_epi(theta)``; every
    second level is used (the areas vary smoothly along the axis).
    """
    step = 2
    levels = _levels()[::step]
    r_epi = r_epi[::step]  # (L, T)
    h = np.sqrt(np.clip(1 - (levels / extent) ** 2, 0, None))  # (L,)
    b = scales[:, None] * axes[0] * h[None, :]  # radial semi-axis (S, L)
    a = scales[:, None] * axes[1] * h[None, :]  # tangential semi-axis
    centre = offset * r_epi.mean(axis=1)  # (L,)
    p = _unit_disk_points()  # (P, 2)
    px = centre[None, :, None] + b[:, :, None] * p[None, None, :, 0]
    py = a[:, :, None] * p[None, None, :, 1]
    t_idx = np.rint((np.arctan2(py, px) + np.pi) / (2 * np.pi) * _N_THETA)
    t_idx = t_idx.astype(np.int64) % _N_THETA
    r_lim = r_epi[np.arange(len(levels))[None, :, None], t_idx]
    outside = (px**2 + py**2) > r_lim**2
    area = np.pi * a * b * outside.mean(axis=2)  # (S, L)
    return area.sum(axis=1) * length * step / _N_LEVEL


def build_geometry(p: Phenotype, rng: np.random.Generator) -> HeartGeometry:
    """Solve the polar heart geometry that realises a phenotype (see module docstring).

    Args:
        p: the subject's phenotype.
        rng: the subject's generator (small shape jitter).

    Returns:
        The :class:`HeartGeometry` at ED and ES, with target volumes in ``volumes_ml``.
    """
    u = _levels()[:, None]  # (L, 1)
    theta = _thetas()[None, :]  # (1, T)
    edv = p.lv_edv_ml * 1000.0
    esv = edv * (1 - p.lv_ef / 100.0)
    lam = 0.93  # cavity apex / epicardial apex level

    # wall thickness field at ED (mm): remote + a bump at the hypertrophy site, tapering
    # towards the apex; concentric phenotypes have wall_remote close to wall_max.
    bump = _angular_bump(
        theta, p.hypertrophy_deg, 150.0 if p.phenotype == "HCM" else 200.0
    )
    level_shape = 1.0 - 0.25 * u  # thinner apex
    if p.phenotype == "HCM":  # mid-septal bulge
        level_shape = level_shape * (1 + 0.12 * np.exp(-(((u - 0.4) / 0.2) ** 2)))
    thick = p.wall_remote_mm + (p.wall_max_mm - p.wall_remote_mm) * bump
    thick = thick * level_shape
    thick *= p.wall_max_mm / thick.max()  # the maximum is exactly wall_max_mm
    akinetic = np.zeros((_N_LEVEL, _N_THETA))
    if p.infarct is not None:
        c, w, u0, u1, thin = p.infarct
        ang = np.clip(1.5 * _angular_bump(theta, c, w), 0, 1)
        lev = ((u >= u0) & (u <= u1)).astype(float)
        akinetic = ang * lev
        thick = thick * (1 - (1 - thin) * akinetic)

    # ED cavity: half-ellipsoid of basal radius R and length lam * Lo, Lo = k R + t_apex.
    profile_cav = np.sqrt(np.clip(1 - (u / lam) ** 2, 0, None))
    profile_epi = np.sqrt(np.clip(1 - u**2, 0, None))
    shape_jitter = 1 + 0.04 * np.sin(theta * 2 + rng.uniform(0, 2 * np.pi))
    radius = 25.0
    for _ in range(30):  # fixed-point: V(R) is monotone, converges in a few steps
        length = p.sphericity * radius / lam
        r_cav_ed = radius * shape_jitter * profile_cav
        v = _cavity_volume(r_cav_ed, length)
        radius *= (edv / v) ** (1 / 3)
    length_ed = p.sphericity * radius / lam
    r_cav_ed = radius * shape_jitter * profile_cav
    r_epi_ed = (radius * shape_jitter + thick) * profile_epi
    r_epi_ed = np.maximum(r_epi_ed, r_cav_ed + 0.5)

    # ES: base descends (long axis shortens with EF), cavity shrinks except akinetic
    # sectors; r = R_ed * ((1 - s) c + s) -> V(c) quadratic in c, solved exactly.
    shortening = 1 - 0.16 * p.lv_ef / 65.0
    length_es = length_ed * shortening
    w = 0.5 * r_cav_ed**2 * (2 * np.pi / _N_THETA) * length_es / _N_LEVEL
    s = akinetic
    qa, qb, qc = (w * (1 - s) ** 2).sum(), (2 * w * (1 - s) * s).sum(), (w * s**2).sum()
    qc -= esv
    c = (-qb + np.sqrt(max(qb**2 - 4 * qa * qc, 0.0))) / (2 * qa)
    c = float(np.clip(c, 0.15, 1.0))
    r_cav_es = r_cav_ed * ((1 - s) * c + s)
    # myocardial volume at a normalised level is conserved while the level spacing
    # shrinks by `shortening`: r_epi^2 - r_cav^2 grows by 1 / shortening.
    r_epi_es = np.sqrt(r_cav_es**2 + (r_epi_ed**2 - r_cav_ed**2) / shortening)

    # RV crescent: ellipse offset to the septal side, cut by the LV epicardium.
    rv_axes = (0.95 * (radius + p.wall_remote_mm), 1.45 * (radius + p.wall_remote_mm))
    rv_extent = float(rng.uniform(0.72, 0.85))
    rv_offset = 0.6
    rv_edv = p.rv_edv_ml * 1000.0
    rv_esv = rv_edv * (1 - p.rv_ef / 100.0)
    rv_short = 1 - 0.12 * p.rv_ef / 58.0
    scales = np.linspace(0.2, 2.5, 20)
    v_ed = _rv_volume(scales, r_epi_ed, length_ed, rv_axes, rv_extent, rv_offset)
    v_es = _rv_volume(
        scales,
        r_epi_es,
        length_es * rv_short / shortening,
        rv_axes,
        rv_extent,
        rv_offset,
    )
    s_ed = float(np.interp(rv_edv, v_ed, scales))
    s_es = float(np.interp(rv_esv, v_es, scales))
    return HeartGeometry(
        r_cav=np.stack([r_cav_ed, r_cav_es]).astype(np.float32),
        r_epi=np.stack([r_epi_ed, r_epi_es]).astype(np.float32),
        length=np.array([length_ed, length_es]),
        rv_scale=np.array([s_ed, s_es]),
        rv_axes=rv_axes,
        rv_extent=rv_extent,
        rv_offset=rv_offset,
        volumes_ml={
            "lv_edv": edv / 1000,
            "lv_esv": _cavity_volume(r_cav_es, length_es) / 1000,
            "rv_edv": rv_edv / 1000,
            "rv_esv": rv_esv / 1000,
            "myo": (
                0.5
                * ((r_epi_ed**2 - r_cav_ed**2).sum())
                * 2
                * np.pi
                / _N_THETA
                * length_ed
                / _N_LEVEL
                / 1000
            ),
        },
    )


def cycle_fraction(n_frames: int, es_index: int) -> np.ndarray:
    """Contraction state ``alpha`` per cine frame (0 = ED at frame 0, 1 = ES).

    Ejection follows a half-cosine up to ES; diastole has rapid filling (70 % of the
    refill in the first 40 % of diastole), diastasis, then the atrial kick.
    """
    t = np.arange(n_frames, dtype=np.float64)
    alpha = np.empty(n_frames)
    sys = t <= es_index
    alpha[sys] = 0.5 - 0.5 * np.cos(np.pi * t[sys] / max(es_index, 1))
    d = (t[~sys] - es_index) / (n_frames - es_index)  # 0..1 over diastole
    rapid = 0.7 * np.clip(d / 0.4, 0, 1) ** 0.8
    kick = 0.3 * np.clip((d - 0.75) / 0.25, 0, 1)
    alpha[~sys] = 1 - rapid - kick
    return np.clip(alpha, 0, 1)


# ----------------------------------------------------------------------------- rendering


@dataclass
class Pose:
    """Where the heart sits on the grid: centre (mm) at the base, axis tilt, rotation."""

    centre_mm: tuple[float, float]
    tilt_mm_per_mm: tuple[float, float]
    rotation_rad: float
    apex_z_mm: float  # z (mm, slice axis) of the epicardial apex; base lies at lower z


def render_heart(
    geo: HeartGeometry,
    phase: int,
    pose: Pose,
    x_mm: np.ndarray,
    y_mm: np.ndarray,
    z_mm: np.ndarray,
) -> np.ndarray:
    """Label map (medlora map: 1 LV, 2 MYO, 3 RV; 4 = RV free wall, 5 = atrial blood)
    of the heart at one phase on a grid.

    Args:
        geo: the geometry (use ``geo.at(alpha)`` for an intermediate frame, phase 0).
        phase: 0 (ED) or 1 (ES).
        pose: heart position and orientation.
        x_mm, y_mm: 1-D in-plane voxel-centre coordinates (mm); z_mm: slice positions.

    Returns:
        uint8 ``(X, Y, Z)`` tissue labels (values 4 and 5 are image-only tissues).
    """
    length = float(geo.length[phase])
    base_z = pose.apex_z_mm - length
    u = (z_mm - base_z) / length  # (Z,) level of each slice at this phase
    zc = z_mm - base_z
    cx = pose.centre_mm[0] + pose.tilt_mm_per_mm[0] * zc
    cy = pose.centre_mm[1] + pose.tilt_mm_per_mm[1] * zc
    full = np.zeros((len(x_mm), len(y_mm), len(z_mm)), dtype=np.uint8)
    # work only inside the heart's bounding box (a fraction of the field of view)
    r_epi_max = float(geo.r_epi[phase].max())
    rv_reach = geo.rv_offset * r_epi_max + float(geo.rv_scale[phase]) * max(geo.rv_axes)
    reach = max(r_epi_max, rv_reach + 3.0) + 3.0
    xs = np.nonzero((x_mm >= cx.min() - reach) & (x_mm <= cx.max() + reach))[0]
    ys = np.nonzero((y_mm >= cy.min() - reach) & (y_mm <= cy.max() + reach))[0]
    if xs.size == 0 or ys.size == 0:
        return full
    box = (slice(xs[0], xs[-1] + 1), slice(ys[0], ys[-1] + 1))
    # in-plane coordinates relative to the LV axis (tilted), rotated so theta=0 -> RV
    dx = x_mm[box[0], None, None] - cx[None, None, :]
    dy = y_mm[None, box[1], None] - cy[None, None, :]
    cos_r, sin_r = np.cos(pose.rotation_rad), np.sin(pose.rotation_rad)
    xr = (dx * cos_r + dy * sin_r).astype(np.float32)  # towards the RV
    yr = (-dx * sin_r + dy * cos_r).astype(np.float32)
    rho2 = xr**2 + yr**2
    theta = np.arctan2(yr, xr)
    t_idx = (
        np.rint((theta + np.pi) / (2 * np.pi) * _N_THETA).astype(np.int64) % _N_THETA
    )
    # radii at each slice's level (linear interpolation over levels), (Z, T)

    def profile(field_: np.ndarray) -> np.ndarray:
        out = np.zeros((len(u), _N_THETA), dtype=np.float32)
        for k, uk in enumerate(u):  # a loop over slices, not voxels
            if 0 <= uk <= 1:
                out[k] = _interp_rows(field_, uk)
        return out

    rc = profile(geo.r_cav[phase])
    ro = profile(geo.r_epi[phase])
    z_idx = np.arange(len(u))[None, None, :]
    rc_v = rc[z_idx, t_idx]
    ro_v = ro[z_idx, t_idx]
    lab = np.zeros(rho2.shape, dtype=np.uint8)
    epi = rho2 < ro_v**2
    # RV ellipse per slice
    rv_u = np.clip(u, 0, None)
    h = np.sqrt(np.clip(1 - (rv_u / geo.rv_extent) ** 2, 0, None)) * (u >= 0)
    r_epi_mean = ro.mean(axis=1)
    b = geo.rv_scale[phase] * geo.rv_axes[0] * h  # radial
    a = geo.rv_scale[phase] * geo.rv_axes[1] * h  # tangential
    centre = geo.rv_offset * r_epi_mean
    with np.errstate(divide="ignore", invalid="ignore"):
        q = ((xr - centre) / np.maximum(b, 1e-3)) ** 2 + (yr / np.maximum(a, 1e-3)) ** 2
        q_wall = ((xr - centre) / np.maximum(b + 3.0, 1e-3)) ** 2 + (
            yr / np.maximum(a + 3.0, 1e-3)
        ) ** 2
    has_rv = (h > 0)[None, None, :]
    lab[(q_wall < 1) & has_rv] = 4
    lab[(q < 1) & has_rv] = 3
    lab[epi] = 2
    lab[rho2 < rc_v**2] = 1
    # above the base: atria / outflow tracts as unlabelled blood (a realistic nuisance)
    above = (u < 0) & (u > -0.3)
    if above.any():
        rad = 0.8 * float(np.asarray(geo.r_cav[phase])[0].mean())
        atrium = (rho2 < rad**2) & above[None, None, :]
        lab[atrium & (lab == 0)] = 5
    full[box] = lab
    return full


def _interp_rows(field_: np.ndarray, uk: float) -> np.ndarray:
    """Linear interpolation of a (L, T) polar field at level ``uk``."""
    pos = uk * _N_LEVEL - 0.5
    i0 = int(np.clip(np.floor(pos), 0, _N_LEVEL - 1))
    i1 = min(i0 + 1, _N_LEVEL - 1)
    f = float(np.clip(pos - i0, 0, 1))
    return (1 - f) * field_[i0] + f * field_[i1]


def render_body(
    rng: np.random.Generator,
    x_mm: np.ndarray,
    y_mm: np.ndarray,
    z_mm: np.ndarray,
    heart_centre: tuple[float, float],
) -> np.ndarray:
    """Relative bSSFP signal of the thorax without the heart (float32 ``(X, Y, Z)``).

    A body ellipse with subcutaneous fat and chest-wall muscle, two lungs, the liver
    (growing towards the apical slices), the spine and descending aorta, and a few random
    organ-like blobs. Coordinates in mm; +y is posterior, -x is the subject's right.
    """
    X, Y = x_mm[:, None], y_mm[None, :]  # 2-D; z-independent masks broadcast over Z
    zn = (z_mm - z_mm.mean()) / max(float(np.ptp(z_mm)), 1.0)  # -0.5 base .. 0.5 apex
    hx, hy = heart_centre
    img = np.zeros((len(x_mm), len(y_mm), len(z_mm)), dtype=np.float32)

    def ellipse(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        return ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 < 1

    # body ellipse centred posterior to the heart: fat, chest-wall muscle, interior
    ax, ay = rng.uniform(150, 185), rng.uniform(105, 130)
    bx, by = hx - rng.uniform(-10, 25), hy + rng.uniform(25, 45)
    fat_mm = rng.uniform(8, 22)
    core = ellipse(bx, by, ax - fat_mm - 10, ay - fat_mm - 10)
    img[ellipse(bx, by, ax, ay)] = TISSUES["fat"]
    img[ellipse(bx, by, ax - fat_mm, ay - fat_mm)] = TISSUES["muscle"]
    img[core] = TISSUES["organ"] * 0.6
    # lungs: left and right of the mediastinum, narrowing towards the apex
    for side in (-1, 1):
        lx = bx + side * rng.uniform(70, 95)
        ly = by - rng.uniform(0, 20)
        lax = rng.uniform(45, 65) * (1 - 0.3 * (zn + 0.5))  # (Z,)
        lay = rng.uniform(60, 80)
        lung = ((X[..., None] - lx) / lax) ** 2 + ((Y[..., None] - ly) / lay) ** 2 < 1
        img[lung & core[..., None]] = TISSUES["lung"]
    # liver: the subject's right, inferior, appearing in the apical slices
    lvx, lvy = hx - rng.uniform(40, 70), hy + rng.uniform(10, 40)
    lr = np.clip(zn + rng.uniform(-0.1, 0.3), 0, None) * rng.uniform(120, 180) + 1e-3
    liver = ((X[..., None] - lvx) / lr) ** 2 + ((Y[..., None] - lvy) / (0.8 * lr)) ** 2
    img[(liver < 1) & core[..., None]] = TISSUES["liver"]
    # spine (vertebral body) and descending aorta (bright blood)
    sx, sy = bx + rng.uniform(-10, 10), by + ay - fat_mm - rng.uniform(30, 40)
    r_spine = rng.uniform(14, 18)
    img[ellipse(sx, sy, r_spine, r_spine)] = TISSUES["spine"]
    axx, axy, r_ao = (
        sx + rng.uniform(20, 32),
        sy - rng.uniform(18, 30),
        rng.uniform(9, 13),
    )
    img[ellipse(axx, axy, r_ao, r_ao)] = TISSUES["blood"]
    # a few random organ-like blobs (stomach, bowel, vessels)
    for _ in range(int(rng.integers(2, 5))):
        ox = bx + rng.uniform(-0.6, 0.6) * ax
        oy = by + rng.uniform(-0.5, 0.6) * ay
        r = rng.uniform(8, 25)
        img[ellipse(ox, oy, r, r) & core] = rng.uniform(0.15, 0.8)
    return img
