"""The synthetic multi-vendor cine-CMR data set: the book's embedded default data.

Every subject is a beating-heart phantom (:mod:`medlora_lib.data.phantom`) whose
phenotype follows the ACDC diagnostic criteria (Bernard et al. 2018, IEEE TMI) and the
M&Ms pathologies (Campello et al. 2021, IEEE TMI), with normal ranges from Kawel-Boehm et
al. 2020 (JCMR). It is imaged on its vendor's native acquisition grid with the vendor's
contrast, noise, bias field and blur (:mod:`medlora_lib.data.vendors`), so that the
shared preprocessing (:func:`medlora_lib.data.preprocess.preprocess_case`) resamples it
exactly as it resamples real data. Client sizes and prevalence follow the open ACDC +
M&Ms numbers. Explained in ``book/synthetic_data.md`` and
``notebooks/01_data_and_vendor_heterogeneity``.

Reproducibility: every subject draws from its own generator seeded by
``SeedSequence(seed, spawn_key=(vendor, part, index))``, so a subject does not depend on
the generation order nor on the other vendors' sizes. Same config => identical bytes.

Parts: ``"acdc"`` (the ACDC-like Siemens subjects) and ``"mnms"`` (the M&Ms-1-like
subjects of every vendor) make up the data set (the preprocessed layout). The optional
``"mnms2"`` part holds *other* people: M&Ms-2-like Siemens, Philips and GE subjects
(:func:`mnms2_sizes`, M&Ms-2 disease codes), drawn from their own streams (part key 2,
which no other subject uses), so that ``prepare mnms`` + ``prepare mnms2 --merge`` never
holds a synthetic patient twice; adding it changes no other subject.

Typical use::

    cfg = SynthConfig.for_profile("cpu")
    make_synthetic("data/synthetic_cpu", cfg)                 # ready to train on
    make_synthetic("raw/acdc", cfg, layout="acdc")            # official ACDC layout
    make_synthetic("raw/mnms", cfg, layout="mnms")            # official M&Ms layout
    make_synthetic("raw/mnms2", cfg, layout="mnms2")          # M&Ms-2 (other subjects)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medlora_lib.data.phantom import (
    PATHOLOGY_TO_PHENOTYPE,
    Pose,
    build_geometry,
    cycle_fraction,
    render_body,
    render_heart,
    sample_phenotype,
)
from medlora_lib.data.raw_writers import (
    write_acdc_layout,
    write_mnms2_layout,
    write_mnms_layout,
)
from medlora_lib.data.vendors import (
    ACDC_GROUPS,
    CLIENT_PARTS,
    MNMS2_DISEASE_MIX,
    MNMS2_HEALTHY_SHARE,
    MNMS2_SUBJECTS,
    MNMS2_VENDORS,
    MNMS_CENTRES,
    VENDORS,
    appearance_for,
    apply_appearance,
    bias_field,
    disease_mix,
    healthy_fraction,
)
from medlora_lib.errors import ConfigError

__all__ = [
    "VENDORS",
    "SynthConfig",
    "RawCase",
    "SubjectSpec",
    "vendor_sizes",
    "mnms2_sizes",
    "cohort_plan",
    "generate_case",
    "generate_cohort",
    "make_synthetic",
    "prepared_records",
    "measure_phenotype",
    "pretraining_pool",
    "write_acdc_layout",
    "write_mnms_layout",
    "write_mnms2_layout",
]

Layout = Literal["preprocessed", "acdc", "mnms", "mnms2"]
_PARTS = ("acdc", "mnms")  # the data set (the preprocessed layout)
_ALL_PARTS = (*_PARTS, "mnms2")  # the index of a part is its seed key
_MNMS2_MIN_PER_VENDOR = 2  # one of each class; the part joins its vendor's site

# Profile values from docs/dev/CONVENTIONS.md (the paper profile uses real data; its
# synthetic variant keeps the paper's input format).
_PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {"scale": 0.06, "min_per_vendor": 12, "image_size": (32, 32, 8),
              "spacing": (4.5, 4.5, 10.0)},
    "cpu": {"scale": 1.0, "min_per_vendor": 12, "image_size": (48, 48, 8),
            "spacing": (3.0, 3.0, 10.0)},
    "paper": {"scale": 1.0, "min_per_vendor": 12, "image_size": (192, 192, 16),
              "spacing": (1.0, 1.0, 10.0), "crop": "shift_inside",
              "intensity": "per_frame"},
}  # fmt: skip


@dataclass
class SynthConfig:
    """Everything that defines a synthetic data set (saved in ``dataset.json``).

    Attributes:
        scale: fraction of the real client sizes (Siemens 245, Philips 125, GE 75,
            Canon 50).
        min_per_vendor: minimum subjects per vendor after scaling.
        heterogeneity: 0 = all vendors look alike and share the overall prevalence,
            1 = realistic vendor shift; linear in between. It sets both shifts below
            unless they are given.
        appearance_shift: the *feature shift* alone (contrast, noise, bias field,
            blur, intensity scale, acquisition grid and frame count;
            :func:`~medlora_lib.data.vendors.appearance_for`): 0 = every vendor has
            the across-vendor mean appearance, 1 = its own. None = ``heterogeneity``.
        label_shift: the *label shift* alone (share of healthy subjects and disease
            mix per client part; :func:`~medlora_lib.data.vendors.healthy_fraction`,
            :func:`~medlora_lib.data.vendors.disease_mix`): 0 = the pooled prevalence
            and mix for every vendor, 1 = its own. None = ``heterogeneity``. The client
            sizes (quantity skew) are those of the real data at every level.
        seed: data seed (same seed => identical data, bit for bit).
        image_size: preprocessed ``(H, W, D)``.
        spacing: preprocessed voxel size (mm).
        cine_frames: None = generate only ED and ES (enough for the preprocessed layout);
            an integer = a whole cine of that many frames for every subject. The raw
            layouts always write a whole cine (the vendor's frame count when None).
        subjects_per_vendor: explicit sizes, overriding ``scale`` (a vendor left out
            gets no subjects); the M&Ms-2 part gets the same number for each of its
            vendors.
        split_seed: seed of the train/val/test split (defaults to ``seed``).
        val_fraction, test_fraction: split shares within each vendor.
        class_overlap: difficulty knob: multiplies every phenotype spread (1 = the
            documented design; see ``phantom.PHENOTYPE_PRIORS``).
        noise_level: difficulty knob: multiplies the image noise (1 = vendor SNR).
        crop, intensity: preprocessing options of the preprocessed layout (config
            fields ``data.crop`` / ``data.intensity``; see
            :func:`~medlora_lib.data.preprocess.preprocess_case`).
    """

    scale: float = 1.0
    min_per_vendor: int = 12
    heterogeneity: float = 1.0
    appearance_shift: float | None = None
    label_shift: float | None = None
    seed: int = 0
    image_size: tuple[int, int, int] = (48, 48, 8)
    spacing: tuple[float, float, float] = (3.0, 3.0, 10.0)
    cine_frames: int | None = None
    subjects_per_vendor: dict[str, int] | None = None
    split_seed: int | None = None
    val_fraction: float = 0.15
    test_fraction: float = 0.25
    class_overlap: float = 1.0
    noise_level: float = 1.0
    crop: str = "lv_centred"
    intensity: str = "joint"

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"SynthConfig field `{name}`: {msg}")

        check(
            isinstance(self.scale, (int, float)) and self.scale > 0,
            "scale",
            f"must be > 0, got {self.scale!r}",
        )
        check(int(self.min_per_vendor) >= 0, "min_per_vendor", "must be >= 0")
        self.min_per_vendor = int(self.min_per_vendor)
        check(
            0.0 <= float(self.heterogeneity) <= 1.0,
            "heterogeneity",
            f"must lie in [0, 1], got {self.heterogeneity!r}",
        )
        self.heterogeneity = float(self.heterogeneity)
        for name in ("appearance_shift", "label_shift"):
            value = getattr(self, name)
            check(
                value is None or 0.0 <= float(value) <= 1.0,
                name,
                f"must be None (= heterogeneity) or lie in [0, 1], got {value!r}",
            )
            if value is not None:
                setattr(self, name, float(value))
        check(
            int(self.seed) == self.seed and self.seed >= 0,
            "seed",
            f"must be a non-negative integer, got {self.seed!r}",
        )
        self.image_size = tuple(int(v) for v in self.image_size)  # type: ignore[assignment]
        check(
            len(self.image_size) == 3 and all(v > 0 for v in self.image_size),
            "image_size",
            f"expected three positive integers (H, W, D), got {self.image_size}",
        )
        self.spacing = tuple(float(v) for v in self.spacing)  # type: ignore[assignment]
        check(
            len(self.spacing) == 3 and all(v > 0 for v in self.spacing),
            "spacing",
            f"expected three positive numbers in mm, got {self.spacing}",
        )
        check(
            self.cine_frames is None or 4 <= int(self.cine_frames) <= 60,
            "cine_frames",
            f"must be None or an integer in [4, 60], got {self.cine_frames!r}",
        )
        if self.subjects_per_vendor is not None:
            bad = [v for v in self.subjects_per_vendor if v not in VENDORS]
            check(
                not bad,
                "subjects_per_vendor",
                f"unknown vendor(s) {bad}; use {VENDORS}",
            )
            check(
                all(int(n) >= 0 for n in self.subjects_per_vendor.values()),
                "subjects_per_vendor",
                "sizes must be >= 0",
            )
        check(0 < self.val_fraction < 1, "val_fraction", "must lie in (0, 1)")
        check(0 < self.test_fraction < 1, "test_fraction", "must lie in (0, 1)")
        check(
            self.val_fraction + self.test_fraction < 1,
            "val_fraction + test_fraction",
            "must be < 1 so that training subjects remain",
        )
        check(self.class_overlap >= 0, "class_overlap", "must be >= 0")
        check(self.noise_level > 0, "noise_level", "must be > 0")
        from medlora_lib.data.preprocess import CROP_MODES, INTENSITY_MODES

        check(self.crop in CROP_MODES, "crop", f"choose one of {CROP_MODES}")
        check(
            self.intensity in INTENSITY_MODES,
            "intensity",
            f"choose one of {INTENSITY_MODES}",
        )

    @classmethod
    def for_profile(cls, name: str, **overrides: Any) -> SynthConfig:
        """The config of a profile (``smoke``, ``cpu``, ``paper``) with overrides.

        Overrides whose value is None are ignored (convenient for command-line options).

        Raises:
            ConfigError: unknown profile or unknown field.
        """
        if name not in _PROFILES:
            raise ConfigError(
                f"unknown profile {name!r} for SynthConfig; use one of {list(_PROFILES)}"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ConfigError(
                f"SynthConfig has no field(s) {unknown}; valid fields: {sorted(fields)}"
            )
        values = dict(_PROFILES[name])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def appearance_level(self) -> float:
        """The feature shift in effect: ``appearance_shift``, else ``heterogeneity``."""
        a = self.appearance_shift
        return self.heterogeneity if a is None else a

    @property
    def label_level(self) -> float:
        """The label shift in effect: ``label_shift``, else ``heterogeneity``."""
        return self.heterogeneity if self.label_shift is None else self.label_shift

    def to_dict(self) -> dict:
        """JSON-friendly dictionary of the config.

        The two shifts are left out while None (they then follow ``heterogeneity``), so
        a data set made before they existed keeps its ``dataset.json`` and cache key.
        """
        out = dataclasses.asdict(self)
        for name in ("appearance_shift", "label_shift"):
            if out[name] is None:
                del out[name]
        out["image_size"] = list(self.image_size)
        out["spacing"] = list(self.spacing)
        return out


@dataclass
class RawCase:
    """One synthetic subject on its native acquisition grid (before preprocessing).

    Attributes:
        subject_id: unique id, e.g. ``synth_siemens_acdc_001``.
        vendor, centre: client and centre (ACDC part: ``Dijon``; M&Ms: ``1``..``5``).
        pathology: ACDC group or M&Ms code (``NOR``, ``DCM``, ``HCM``, ``AHS``, ...).
        label: 0 healthy (``NOR``), 1 disease.
        cine: float32 ``(X, Y, Z, T)`` whole cine, or ``(2, X, Y, Z)`` ED/ES frames when
            no cine was generated.
        seg_ed, seg_es: uint8 ``(X, Y, Z)`` labels (medlora map 1 LV, 2 MYO, 3 RV).
        ed_index, es_index: 0-based frame indices of ED and ES in the cine.
        spacing: voxel size (mm), shape (3,).
        affine: 4x4 voxel-to-world matrix (mm), oblique short-axis orientation.
        metadata: phenotype (EDV, EF, wall thickness, ...), appearance and pose values.
    """

    subject_id: str
    vendor: str
    centre: str
    pathology: str
    label: int
    cine: np.ndarray
    seg_ed: np.ndarray
    seg_es: np.ndarray
    ed_index: int
    es_index: int
    spacing: np.ndarray
    affine: np.ndarray
    metadata: dict = field(default_factory=dict)

    @property
    def has_cine(self) -> bool:
        """True when ``cine`` is a whole ``(X, Y, Z, T)`` cine."""
        return bool(self.metadata.get("cine", False))

    def frames(self) -> np.ndarray:
        """ED and ES as float32 ``(2, X, Y, Z)``."""
        if self.has_cine:
            return np.stack(
                [self.cine[..., self.ed_index], self.cine[..., self.es_index]]
            )
        return self.cine

    def labels(self) -> np.ndarray:
        """ED and ES labels as uint8 ``(2, X, Y, Z)``."""
        return np.stack([self.seg_ed, self.seg_es])


@dataclass(frozen=True)
class SubjectSpec:
    """Who a subject is before it is generated: client part, index and pathology."""

    vendor: str
    part: str  # "acdc" (ACDC-like Siemens), "mnms" (M&Ms-like) or "mnms2" (M&Ms-2-like)
    index: int  # 0-based within (vendor, part)
    pathology: str

    @property
    def subject_id(self) -> str:
        return f"synth_{self.vendor.lower()}_{self.part}_{self.index + 1:03d}"


# ----------------------------------------------------------------------------- cohort


def vendor_sizes(config: SynthConfig) -> dict[str, int]:
    """Subjects per vendor: ``max(min_per_vendor, round(scale * real size))`` or the
    explicit ``subjects_per_vendor``."""
    if config.subjects_per_vendor is not None:
        return {v: int(config.subjects_per_vendor.get(v, 0)) for v in VENDORS}
    real = {
        v: sum(n for (vv, _), (n, _h) in CLIENT_PARTS.items() if vv == v)
        for v in VENDORS
    }
    return {
        v: max(config.min_per_vendor, int(math.floor(config.scale * real[v] + 0.5)))
        for v in VENDORS
    }


def mnms2_sizes(config: SynthConfig) -> dict[str, int]:
    """Subjects per vendor of the M&Ms-2 part (Siemens, Philips, GE; no Canon).

    ``max(2, round(scale * 120))`` (M&Ms-2's 360 subjects split evenly, an assumption:
    :data:`~medlora_lib.data.vendors.MNMS2_SUBJECTS`), or ``subjects_per_vendor`` when
    given. The floor is 2 (one healthy, one diseased), not ``min_per_vendor``: the part
    joins its vendor's site rather than forming one.
    """
    if config.subjects_per_vendor is not None:
        return {v: int(config.subjects_per_vendor.get(v, 0)) for v in MNMS2_VENDORS}
    return {
        v: max(_MNMS2_MIN_PER_VENDOR, int(math.floor(config.scale * n + 0.5)))
        for v, n in MNMS2_SUBJECTS.items()
    }


def _part_sizes(vendor: str, n: int) -> dict[str, int]:
    parts = {
        p: CLIENT_PARTS[(vendor, p)][0] for p in _PARTS if (vendor, p) in CLIENT_PARTS
    }
    if len(parts) == 1:
        return {next(iter(parts)): n}
    n_acdc = int(math.floor(n * parts["acdc"] / sum(parts.values()) + 0.5))
    return {"acdc": n_acdc, "mnms": n - n_acdc}


def _largest_remainder(total: int, shares: dict[str, float]) -> dict[str, int]:
    raw = {k: total * s / sum(shares.values()) for k, s in shares.items()}
    out = {k: int(math.floor(v)) for k, v in raw.items()}
    rest = total - sum(out.values())
    for k in sorted(raw, key=lambda k: (-(raw[k] - out[k]), list(raw).index(k)))[:rest]:
        out[k] += 1
    return out


def _seed_seq(seed: int, *key: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(
        entropy=int(seed), spawn_key=tuple(int(k) for k in key)
    )


def cohort_plan(
    config: SynthConfig, parts: tuple[str, ...] = _PARTS
) -> list[SubjectSpec]:
    """The subjects of the given parts in a stable order (vendor, part, index).

    Per client part, ``round(n * healthy share)`` subjects are ``NOR`` (the share
    interpolated by the label shift, :attr:`SynthConfig.label_level`); the diseased
    ones are split over the part's disease mix by largest remainders. A vendor with at
    least 12 subjects gets at least 3 healthy and 3 diseased (at least 1 of each from 2
    subjects). Pathologies are then shuffled within the part by a generator seeded by
    ``(seed, vendor, part)``.

    The ``"mnms2"`` part (only when asked for) comes after the others, planned the same
    way per vendor with :func:`mnms2_sizes`, one healthy share
    (:data:`~medlora_lib.data.vendors.MNMS2_HEALTHY_SHARE`) and one disease mix
    (:data:`~medlora_lib.data.vendors.MNMS2_DISEASE_MIX`) for every vendor and label
    shift: the reference material has no per-vendor figures to shift towards.

    Raises:
        ConfigError: an unknown part.
    """
    bad = [p for p in parts if p not in _ALL_PARTS]
    if bad:
        raise ConfigError(f"unknown part(s) {bad}; use {list(_ALL_PARTS)}")
    specs = [s for s in _main_plan(config) if s.part in parts]
    if "mnms2" in parts:
        specs += _mnms2_plan(config)
    return specs


def _shuffled(
    config: SynthConfig, vendor: str, part: str, pathologies: list[str]
) -> list[SubjectSpec]:
    rng = np.random.default_rng(
        _seed_seq(config.seed, VENDORS.index(vendor), _ALL_PARTS.index(part), 10**6)
    )
    order = rng.permutation(len(pathologies))
    return [SubjectSpec(vendor, part, i, pathologies[j]) for i, j in enumerate(order)]


def _mnms2_plan(config: SynthConfig) -> list[SubjectSpec]:
    specs: list[SubjectSpec] = []
    for vendor, n in mnms2_sizes(config).items():
        least = 3 if n >= 12 else (1 if n >= 2 else 0)
        healthy = int(math.floor(n * MNMS2_HEALTHY_SHARE + 0.5))
        healthy = min(max(healthy, least), n - least)
        counts = _largest_remainder(n - healthy, MNMS2_DISEASE_MIX)
        pathologies = ["NOR"] * healthy
        for code, k in counts.items():
            pathologies += [code] * k
        specs += _shuffled(config, vendor, "mnms2", pathologies)
    return specs


def _main_plan(config: SynthConfig) -> list[SubjectSpec]:
    specs: list[SubjectSpec] = []
    for vendor in VENDORS:
        n_vendor = vendor_sizes(config)[vendor]
        sizes = _part_sizes(vendor, n_vendor)
        healthy = {
            p: int(
                math.floor(n * healthy_fraction(vendor, p, config.label_level) + 0.5)
            )
            for p, n in sizes.items()
        }
        # guarantee both classes in every split: 3 of each from 12 subjects, else 1
        least = 3 if n_vendor >= 12 else (1 if n_vendor >= 2 else 0)
        big = max(sizes, key=lambda p: sizes[p])
        while sum(healthy.values()) < least:
            healthy[big] += 1
        while n_vendor - sum(healthy.values()) < least:
            healthy[max(healthy, key=lambda p: healthy[p])] -= 1
        for p, n in sizes.items():
            mix = disease_mix(vendor, p, config.label_level)
            counts = _largest_remainder(n - healthy[p], mix)
            pathologies = ["NOR"] * healthy[p]
            for code, k in counts.items():
                pathologies += [code] * k
            specs += _shuffled(config, vendor, p, pathologies)
    return specs


# ----------------------------------------------------------------------------- one case


def _rotation(a: float, b: float, c: float) -> np.ndarray:
    ca, sa, cb, sb, cc, sc = (
        np.cos(a),
        np.sin(a),
        np.cos(b),
        np.sin(b),
        np.cos(c),
        np.sin(c),
    )
    rz = np.array([[ca, -sa, 0], [sa, ca, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cb, -sb], [0, sb, cb]])
    ry = np.array([[cc, 0, sc], [0, 1, 0], [-sc, 0, cc]])
    return rz @ rx @ ry


def _mnms_code(rng: np.random.Generator) -> str:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return "".join(
        letters[rng.integers(26)] if i % 2 == 0 else str(rng.integers(10))
        for i in range(6)
    )


def _generate(
    spec: SubjectSpec,
    config: SynthConfig,
    seq: np.random.SeedSequence,
    with_cine: bool,
) -> RawCase:
    rng_anat, rng_pose, rng_app = (np.random.default_rng(s) for s in seq.spawn(3))
    noise_key = seq.spawn_key + (99,)

    # --- anatomy and timing
    phen = sample_phenotype(
        rng_anat, PATHOLOGY_TO_PHENOTYPE[spec.pathology], overlap=config.class_overlap
    )
    geo = build_geometry(phen, rng_anat)
    app = appearance_for(spec.vendor, config.appearance_level)
    lo, hi = (int(round(f)) for f in app.frames)
    n_frames = int(rng_anat.integers(lo, hi + 1))
    if config.cine_frames is not None:
        n_frames = int(config.cine_frames)
    es_time = int(round(n_frames * rng_anat.uniform(0.33, 0.42)))
    # M&Ms cines do not always start at ED: rotate some of them by a frame or two
    shift = (
        int(rng_anat.integers(1, 3))
        if spec.part == "mnms" and rng_anat.random() < 0.2
        else 0
    )
    ed_index, es_index = shift % n_frames, (es_time + shift) % n_frames
    code = _mnms_code(rng_anat)

    # --- acquisition grid and pose
    inplane = app.inplane_mm * rng_pose.uniform(0.95, 1.05)
    dz = app.slice_spacing_mm
    fov = np.asarray(app.fov_mm) * rng_pose.uniform(0.95, 1.05, size=2)
    nx, ny = (int(round(f / inplane)) for f in fov)
    above = rng_pose.uniform(0.2, 1.0) * dz  # first slice this far above the ED base
    length = float(geo.length[0])
    n_slices = int(np.clip(math.ceil((length + above) / dz) + 1, 8, 14))
    x_mm = ((np.arange(nx) - (nx - 1) / 2) * inplane).astype(np.float32)
    y_mm = ((np.arange(ny) - (ny - 1) / 2) * inplane).astype(np.float32)
    z_mm = (np.arange(n_slices) * dz).astype(np.float32)
    heart_centre = (float(rng_pose.uniform(-20, 20)), float(rng_pose.uniform(-20, 20)))
    pose = Pose(
        centre_mm=heart_centre,
        tilt_mm_per_mm=(
            float(rng_pose.normal(0, 0.08)),
            float(rng_pose.normal(0, 0.08)),
        ),
        rotation_rad=float(np.pi + rng_pose.normal(0, 0.35)),
        apex_z_mm=above + length,
    )
    body = render_body(rng_pose, x_mm, y_mm, z_mm, heart_centre)
    spacing = np.array([inplane, inplane, dz], dtype=np.float64)
    rot = _rotation(*rng_pose.normal([-0.6, 1.0, 0.4], 0.15))
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = -affine[:3, :3] @ (np.array([nx, ny, n_slices]) - 1) / 2

    # --- the subject's appearance (vendor value with a small per-subject jitter)
    gamma = app.gamma * rng_app.uniform(0.93, 1.07)
    scale = app.intensity_scale * rng_app.uniform(0.8, 1.25)
    snr = app.snr * rng_app.uniform(0.8, 1.25) / config.noise_level
    myo = float(np.clip(app.myo_to_blood + rng_app.normal(0, 0.02), 0.1, 0.5))
    bias = bias_field(
        rng_app, (nx, ny, n_slices), app.bias_amplitude * rng_app.uniform(0.7, 1.3)
    )
    # bSSFP contrast curve applied to the tissue values once (not per voxel and frame);
    # signal per heart tissue label: 1 LV blood, 2 MYO, 3 RV blood, 4 RV wall, 5 atria
    body = np.power(body, np.float32(gamma), dtype=np.float32)
    signal_of = np.array([0, 1.0, myo, 1.0, myo, 1.0], dtype=np.float32) ** np.float32(
        gamma
    )

    alphas = cycle_fraction(n_frames, es_time)

    def render(frame: int) -> tuple[np.ndarray, np.ndarray]:
        a = alphas[(frame - shift) % n_frames]
        if a == 0.0 or a == 1.0:  # ED / ES: the exact solved geometry
            tissue = render_heart(geo, int(a), pose, x_mm, y_mm, z_mm)
        else:
            tissue = render_heart(geo.at(a), 0, pose, x_mm, y_mm, z_mm)
        signal = np.where(tissue > 0, signal_of[tissue], body)
        noise_rng = np.random.default_rng(
            np.random.SeedSequence(seq.entropy, spawn_key=noise_key + (frame,))
        )
        img = apply_appearance(signal, tuple(spacing), app, bias, scale, snr, noise_rng)
        seg = np.where(tissue <= 3, tissue, 0).astype(np.uint8)
        return img, seg

    if with_cine:
        frames = [render(t) for t in range(n_frames)]
        cine = np.stack([f[0] for f in frames], axis=-1)
        seg_ed, seg_es = frames[ed_index][1], frames[es_index][1]
    else:
        (img_ed, seg_ed), (img_es, seg_es) = render(ed_index), render(es_index)
        cine = np.stack([img_ed, img_es])

    centre = "Dijon"
    if spec.part == "mnms":
        centres = MNMS_CENTRES[spec.vendor]
        centre = str(centres[spec.index % len(centres)])
    elif spec.part == "mnms2":
        centre = "unknown"  # as the M&Ms-2 loader: its CSV names no centre
    metadata = phen.to_dict()
    metadata.update(
        {
            "part": spec.part,
            "cine": bool(with_cine),
            "n_frames": n_frames,
            "mnms_code": code,
            "geometry_volumes_ml": geo.volumes_ml,
            "appearance": {
                "gamma": gamma, "intensity_scale": scale, "snr": snr,
                "myo_to_blood": myo, "inplane_mm": inplane, "slice_spacing_mm": dz,
                "psf_sigma_mm": app.psf_sigma_mm, "bias_amplitude": app.bias_amplitude,
            },
        }
    )  # fmt: skip
    return RawCase(
        subject_id=spec.subject_id,
        vendor=spec.vendor,
        centre=centre,
        pathology=spec.pathology,
        label=0 if spec.pathology == "NOR" else 1,
        cine=cine.astype(np.float32, copy=False),
        seg_ed=seg_ed,
        seg_es=seg_es,
        ed_index=ed_index,
        es_index=es_index,
        spacing=spacing,
        affine=affine,
        metadata=metadata,
    )


def generate_case(
    config: SynthConfig,
    vendor: str,
    index: int,
    pathology: str,
    part: str = "mnms",
    with_cine: bool | None = None,
) -> RawCase:
    """Generate one subject.

    Args:
        config: the data set config (seed, heterogeneity, difficulty knobs).
        vendor: one of :data:`VENDORS`.
        index: 0-based index within ``(vendor, part)``; with the seed it fixes the
            subject's random stream.
        pathology: ``NOR``, an ACDC group, an M&Ms-1 or an M&Ms-2 code.
        part: ``"acdc"`` (Siemens only), ``"mnms"`` or ``"mnms2"`` (no Canon).
        with_cine: generate the whole cine (default: ``config.cine_frames is not None``).

    Returns:
        The :class:`RawCase`.

    Raises:
        ConfigError: unknown vendor, part or pathology.
    """
    if vendor not in VENDORS:
        raise ConfigError(f"unknown vendor {vendor!r}; use one of {VENDORS}")
    if part == "mnms2" and vendor not in MNMS2_VENDORS:
        has = ", ".join(MNMS2_VENDORS)
        raise ConfigError(f"no part 'mnms2' for vendor {vendor}; M&Ms-2 has {has}")
    if part != "mnms2" and (vendor, part) not in CLIENT_PARTS:
        raise ConfigError(f"no part {part!r} for vendor {vendor}; ACDC is Siemens only")
    if pathology not in PATHOLOGY_TO_PHENOTYPE:
        raise ConfigError(
            f"unknown pathology {pathology!r}; use one of {sorted(PATHOLOGY_TO_PHENOTYPE)}"
        )
    spec = SubjectSpec(vendor, part, int(index), pathology)
    seq = _seed_seq(config.seed, VENDORS.index(vendor), _ALL_PARTS.index(part), index)
    if with_cine is None:
        with_cine = config.cine_frames is not None
    return _generate(spec, config, seq, bool(with_cine))


def generate_cohort(
    config: SynthConfig,
    with_cine: bool | None = None,
    parts: tuple[str, ...] = _PARTS,
) -> Iterator[RawCase]:
    """Generate the subjects of :func:`cohort_plan` lazily, in its stable order.

    An iterator (a whole native-resolution cohort does not fit in memory): wrap it in
    ``list()`` for small configs.

    Args:
        config: the data set config.
        with_cine: generate whole cines (default: ``config.cine_frames is not None``).
        parts: which client parts to generate (``"acdc"``, ``"mnms"``, ``"mnms2"``).
    """
    plan = cohort_plan(config, parts)
    sizes: dict[tuple[str, str], int] = {}
    for spec in plan:
        sizes[(spec.vendor, spec.part)] = sizes.get((spec.vendor, spec.part), 0) + 1
    for spec in plan:
        if spec.part in parts:
            case = generate_case(
                config, spec.vendor, spec.index, spec.pathology, spec.part, with_cine
            )
            case.metadata["part_index"] = spec.index
            case.metadata["part_size"] = sizes[(spec.vendor, spec.part)]
            yield case


# ----------------------------------------------------------------------------- measuring


def measure_phenotype(label: np.ndarray, spacing) -> dict[str, float]:
    """Clinical measurements from an ED/ES segmentation, by voxel counting.

    Args:
        label: uint8 ``(2, H, W, D)`` in the medlora map (channel 0 ED, 1 ES).
        spacing: voxel size (mm) along H, W, D.

    Returns:
        ``lv_edv_ml``, ``lv_esv_ml``, ``lv_ef`` (%), ``rv_edv_ml``, ``rv_esv_ml``,
        ``rv_ef`` (%), ``myo_mass_g`` (1.05 g/mL) and ``wall_max_mm``: the maximal ED wall
        thickness, estimated per slice and 30-degree sector around the LV centroid as
        sector area / mid-wall arc length (sub-voxel accurate), on the slices whose LV
        cavity area is at least 30 % of the largest (the apical cap, cut obliquely,
        would look thick). EF is NaN when the EDV is 0.
    """
    label = np.asarray(label)
    sx, sy, sz = (float(s) for s in spacing)
    voxel_ml = sx * sy * sz / 1000.0
    counts = {k: [(label[p] == k).sum() for p in (0, 1)] for k in (1, 2, 3)}

    def ef(edv: float, esv: float) -> float:
        return float(100.0 * (edv - esv) / edv) if edv > 0 else float("nan")

    lv_edv, lv_esv = (c * voxel_ml for c in counts[1])
    rv_edv, rv_esv = (c * voxel_ml for c in counts[3])
    ed = label[0]
    lv_area = (ed == 1).sum(axis=(0, 1))
    wall = 0.0
    n_sectors = 12
    ii, jj = np.meshgrid(
        np.arange(ed.shape[0]) * sx, np.arange(ed.shape[1]) * sy, indexing="ij"
    )
    for k in np.nonzero(lv_area >= 0.3 * max(lv_area.max(), 1))[0]:
        cav, myo = ed[..., k] == 1, ed[..., k] == 2
        if not cav.any() or not myo.any():
            continue
        cx, cy = ii[cav].mean(), jj[cav].mean()
        dx, dy = ii[myo] - cx, jj[myo] - cy
        r = np.hypot(dx, dy)
        sector = ((np.arctan2(dy, dx) + np.pi) / (2 * np.pi) * n_sectors).astype(int)
        sector = np.minimum(sector, n_sectors - 1)
        area = np.bincount(sector, minlength=n_sectors) * sx * sy
        r_sum = np.bincount(sector, weights=r, minlength=n_sectors)
        n = np.bincount(sector, minlength=n_sectors)
        ok = n > 0
        r_mid = r_sum[ok] / n[ok]
        thick = area[ok] / (2 * np.pi / n_sectors * np.maximum(r_mid, 1e-6))
        wall = max(wall, float(thick.max()))
    return {
        "lv_edv_ml": float(lv_edv),
        "lv_esv_ml": float(lv_esv),
        "lv_ef": ef(lv_edv, lv_esv),
        "rv_edv_ml": float(rv_edv),
        "rv_esv_ml": float(rv_esv),
        "rv_ef": ef(rv_edv, rv_esv),
        "myo_mass_g": float(counts[2][0] * voxel_ml * 1.05),
        "wall_max_mm": wall,
    }


# ----------------------------------------------------------------------------- writing


def _preprocess(case: RawCase, config: SynthConfig) -> tuple[np.ndarray, np.ndarray]:
    from medlora_lib.data.preprocess import preprocess_case

    return preprocess_case(
        case.frames(),
        tuple(float(s) for s in case.spacing),
        labels=case.labels(),
        target_spacing=config.spacing,
        image_size=config.image_size,
        crop=config.crop,  # type: ignore[arg-type]
        intensity=config.intensity,  # type: ignore[arg-type]
    )


def _dataset_info(config: SynthConfig) -> dict:
    from medlora_lib.data.preprocess import preprocessing_params

    return {
        "preprocessing": preprocessing_params(
            config.spacing,
            config.image_size,
            crop=config.crop,  # type: ignore[arg-type]
            intensity=config.intensity,  # type: ignore[arg-type]
        ),
        "sources": [{"name": "synthetic", "generator": "medlora_lib.data.synthetic",
                     "config": config.to_dict()}],
        "split": {
            "val_fraction": config.val_fraction,
            "test_fraction": config.test_fraction,
            "seed": config.seed if config.split_seed is None else config.split_seed,
        },
    }  # fmt: skip


def _prepared_record(spec: SubjectSpec, config: SynthConfig):
    """Generate and preprocess one subject (top level so that worker processes can)."""
    from medlora_lib.data.manifest import PreparedRecord

    case = generate_case(
        config, spec.vendor, spec.index, spec.pathology, spec.part, False
    )
    image, seg = _preprocess(case, config)
    return PreparedRecord(
        subject_id=case.subject_id,
        # "synthetic-acdc" / "synthetic-mnms" (/ "synthetic-mnms2"): which real data
        # set the subject mimics, so that "ACDC as its own client" works on synthetic
        # data too.
        dataset=f"synthetic-{spec.part}",
        vendor=case.vendor,
        centre=case.centre,
        pathology=case.pathology,
        label=case.label,
        image=image,
        seg=seg,
    )


def prepared_records(
    config: SynthConfig, parts: tuple[str, ...] = _PARTS, workers: int = 1
) -> Iterator:
    """The generator's own preprocessed subjects of some parts, in plan order.

    What the preprocessed layout writes (``parts=("acdc", "mnms")``), and the reference
    against which a raw layout that went through ``medlora prepare`` is checked: e.g.
    ``parts=("mnms2",)`` gives the subjects of the ``mnms2`` layout, the k-th being
    ``mnms2_{k:03d}`` there.

    Args:
        config: the data set config.
        parts: client parts (:func:`cohort_plan`).
        workers: processes (as :func:`make_synthetic`; same data for any number).

    Yields:
        :class:`~medlora_lib.data.manifest.PreparedRecord` (``dataset`` is
        ``"synthetic-<part>"``, ``split`` unset).
    """
    plan = cohort_plan(config, parts)
    if workers <= 1:
        for spec in plan:
            yield _prepared_record(spec, config)
        return
    import multiprocessing as mp
    from functools import partial

    # "spawn": safe with torch in the parent; results come back in plan order, and each
    # subject has its own seed, so the data are identical to workers=1.
    with mp.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(
            partial(_prepared_record, config=config), plan, chunksize=4
        )


def make_synthetic(
    out_dir: str | Path,
    config: SynthConfig | None = None,
    layout: Layout = "preprocessed",
    overwrite: bool = False,
    workers: int = 1,
) -> Path:
    """Write the synthetic data set.

    Args:
        out_dir: target folder.
        config: the data set config (default ``SynthConfig()``, the cpu profile).
        layout: ``"preprocessed"`` = the prepared folder (``manifest.csv``, arrays,
            ``dataset.json``), ready to train on; ``"acdc"`` = the ACDC-like Siemens part
            in the official ACDC download layout; ``"mnms"`` = the M&Ms-like part (all
            other subjects) in the official M&Ms-1 layout; ``"mnms2"`` = the M&Ms-2
            part (:func:`mnms2_sizes` Siemens, Philips and GE subjects who are in
            neither of the others, drawn from their own seed streams) in the official
            M&Ms-2 layout: ``prepare mnms2 --merge`` adds them to their vendors' sites.
        overwrite: replace an existing (different) data set / non-empty raw folder.
        workers: processes generating the preprocessed layout in parallel (the data
            are identical for any number of workers). Worker processes are spawned
            (each imports torch, a few seconds): worth it for the cpu profile, not for
            smoke; in a script, call under ``if __name__ == "__main__":``.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ConfigError: unknown layout.
        DataError: ``out_dir`` holds something else and ``overwrite`` is False.
    """
    config = config or SynthConfig()
    out_dir = Path(out_dir)
    if layout == "preprocessed":
        from medlora_lib.data.manifest import write_prepared_dataset

        return write_prepared_dataset(
            out_dir,
            prepared_records(config, workers=int(workers)),
            _dataset_info(config),
            overwrite=overwrite,
            subject_ids=[spec.subject_id for spec in cohort_plan(config)],
        )
    if layout == "acdc":
        cases = generate_cohort(config, with_cine=True, parts=("acdc",))
        return write_acdc_layout(cases, out_dir, overwrite=overwrite)
    if layout == "mnms":
        cases = generate_cohort(config, with_cine=True, parts=("mnms",))
        return write_mnms_layout(cases, out_dir, overwrite=overwrite)
    if layout == "mnms2":
        cases = generate_cohort(config, with_cine=True, parts=("mnms2",))
        return write_mnms2_layout(cases, out_dir, overwrite=overwrite)
    raise ConfigError(
        f"unknown layout {layout!r}; use 'preprocessed', 'acdc', 'mnms' or 'mnms2'"
    )


def pretraining_pool(
    n_subjects: int, config: SynthConfig | None = None, seed_offset: int = 1_000_003
) -> Iterator[np.ndarray]:
    """An unlabelled pool of preprocessed images for MAE pretraining of the small model.

    Disjoint from the fine-tuning subjects: every subject comes from the seed stream
    ``SeedSequence(config.seed + seed_offset, spawn_key=(i,))``. Vendors are drawn in
    proportion to the real client sizes, classes with the overall prevalence and
    disease mix (any M&Ms code or ACDC group).

    Args:
        n_subjects: number of images to yield.
        config: the data set config (image size, spacing, heterogeneity).
        seed_offset: added to ``config.seed`` to derive the pool's seed stream.

    Yields:
        float32 ``(2, H, W, D)`` images in [0, 1] (ED, ES).
    """
    config = config or SynthConfig()
    parts = list(CLIENT_PARTS)
    weights = np.array([n for n, _ in CLIENT_PARTS.values()], float)
    for i in range(int(n_subjects)):
        seq = np.random.SeedSequence(config.seed + seed_offset, spawn_key=(i,))
        pick_seq, case_seq = seq.spawn(2)
        rng = np.random.default_rng(pick_seq)
        vendor, part = parts[rng.choice(len(parts), p=weights / weights.sum())]
        if rng.random() < healthy_fraction(vendor, part, config.label_level):
            pathology = "NOR"
        else:
            mix = disease_mix(vendor, part, config.label_level)
            codes = list(mix) if part == "mnms" else list(ACDC_GROUPS)
            p = np.array([mix[c] for c in codes])
            pathology = codes[rng.choice(len(codes), p=p / p.sum())]
        spec = SubjectSpec(vendor, part, i, pathology)
        case = _generate(spec, config, case_seq, with_cine=False)
        yield _preprocess(case, config)[0]
