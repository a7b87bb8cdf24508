"""Tests of the synthetic multi-vendor cine generator (medlora_lib.data.synthetic)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medlora_lib.data import synthetic as syn
from medlora_lib.data.vendors import (
    VENDOR_APPEARANCE,
    VENDORS,
    appearance_for,
    healthy_fraction,
)
from medlora_lib.errors import ConfigError

TINY = {"Siemens": 2, "Philips": 1, "GE": 1, "Canon": 1}


def _cfg(**kw) -> syn.SynthConfig:
    return syn.SynthConfig.for_profile("smoke", **kw)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "field, value",
    [
        ("heterogeneity", 1.5),
        ("scale", 0.0),
        ("val_fraction", 0.0),
        ("cine_frames", 2),
        ("subjects_per_vendor", {"Toshiba": 3}),
    ],
)
def test_config_validation_names_field(field, value):
    with pytest.raises(ConfigError, match=field):
        syn.SynthConfig(**{field: value})


def test_profiles():
    smoke = syn.SynthConfig.for_profile("smoke", seed=3)
    assert (smoke.scale, smoke.min_per_vendor, smoke.seed) == (0.06, 12, 3)
    assert smoke.image_size == (32, 32, 8) and smoke.spacing == (4.5, 4.5, 10.0)
    assert syn.SynthConfig.for_profile("cpu").image_size == (48, 48, 8)
    assert syn.SynthConfig.for_profile("paper").image_size == (192, 192, 16)
    with pytest.raises(ConfigError, match="profile"):
        syn.SynthConfig.for_profile("huge")
    with pytest.raises(ConfigError, match="no field"):
        syn.SynthConfig.for_profile("cpu", colour="red")


# ----------------------------------------------------------------------------- cohort


def test_cpu_sizes_and_prevalence_follow_open_data():
    plan = pd.DataFrame([s.__dict__ for s in syn.cohort_plan(syn.SynthConfig())])
    sizes = plan.groupby("vendor").size().to_dict()
    assert sizes == {"Siemens": 245, "Philips": 125, "GE": 75, "Canon": 50}
    healthy = plan[plan.pathology == "NOR"].groupby("vendor").size().to_dict()
    assert healthy == {"Siemens": 52, "Philips": 65, "GE": 21, "Canon": 14}
    acdc = plan[plan.part == "acdc"]
    assert len(acdc) == 150
    assert acdc.pathology.value_counts().to_dict() == {
        g: 30 for g in ("NOR", "DCM", "HCM", "MINF", "RV")
    }
    assert set(plan[plan.part == "mnms"].pathology) <= {
        "NOR", "DCM", "HCM", "HHD", "ARV", "IHD", "AHS", "LVNC", "Other"
    }  # fmt: skip
    assert plan.groupby(["vendor", "part", "index"]).size().max() == 1


def test_smoke_sizes_minimum_and_both_classes():
    plan = syn.cohort_plan(_cfg())
    assert syn.vendor_sizes(_cfg()) == {
        "Siemens": 15,
        "Philips": 12,
        "GE": 12,
        "Canon": 12,
    }
    for vendor in VENDORS:
        labels = [s.pathology == "NOR" for s in plan if s.vendor == vendor]
        assert sum(labels) >= 3 and len(labels) - sum(labels) >= 3


def test_heterogeneity_zero_equalises_appearance_and_prevalence():
    ref = appearance_for("Siemens", 0.0)
    for vendor in VENDORS:
        assert appearance_for(vendor, 0.0) == ref
        assert appearance_for(vendor, 1.0) == VENDOR_APPEARANCE[vendor]
    shares = {healthy_fraction(v, "mnms", 0.0) for v in VENDORS}
    shares.add(healthy_fraction("Siemens", "acdc", 0.0))
    assert max(shares) - min(shares) < 1e-12
    plan = pd.DataFrame(
        [s.__dict__ for s in syn.cohort_plan(syn.SynthConfig(heterogeneity=0))]
    )
    prevalence = plan.assign(h=plan.pathology == "NOR").groupby("vendor").h.mean()
    assert prevalence.max() - prevalence.min() < 0.02
    half = appearance_for("Canon", 0.5)
    assert half.snr == pytest.approx((ref.snr + VENDOR_APPEARANCE["Canon"].snr) / 2)


def test_the_two_shifts_move_apart():
    """label_shift moves only prevalence / mix, appearance_shift only the look."""
    default = syn.cohort_plan(syn.SynthConfig())
    pooled = syn.cohort_plan(syn.SynthConfig(label_shift=0))
    looks_alike = syn.cohort_plan(syn.SynthConfig(appearance_shift=0))
    # the appearance knob does not touch who is ill ...
    assert [s.pathology for s in looks_alike] == [s.pathology for s in default]
    # ... the label knob gives the pooled prevalence, with the real client sizes
    plan = pd.DataFrame([s.__dict__ for s in pooled])
    base = pd.DataFrame([s.__dict__ for s in default])
    assert plan.groupby("vendor").size().equals(base.groupby("vendor").size())
    prev = plan.assign(h=plan.pathology == "NOR").groupby("vendor").h.mean()
    prev1 = base.assign(h=base.pathology == "NOR").groupby("vendor").h.mean()
    assert prev.max() - prev.min() < 0.02 < prev1.max() - prev1.min()
    # appearance: vendors still differ under label_shift=0, not under appearance_shift=0
    lab0 = _raw_stats(1.0, label_shift=0.0)
    app0 = _raw_stats(1.0, appearance_shift=0.0)
    assert max(lab0.values()) / min(lab0.values()) > 4
    assert max(app0.values()) / min(app0.values()) < 2
    assert lab0 == _raw_stats(1.0)  # same subjects' look as the default


def test_unset_shifts_are_the_old_knob_bit_for_bit():
    old = _cfg(heterogeneity=0.5)
    both = _cfg(heterogeneity=0.5, appearance_shift=0.5, label_shift=0.5)
    assert old.to_dict().keys() == _cfg().to_dict().keys()
    assert "label_shift" not in old.to_dict() and both.to_dict()["label_shift"] == 0.5
    assert [s.__dict__ for s in syn.cohort_plan(old)] == [
        s.__dict__ for s in syn.cohort_plan(both)
    ]
    a = syn.generate_case(old, "GE", 0, "NOR")
    b = syn.generate_case(both, "GE", 0, "NOR")
    assert a.cine.tobytes() == b.cine.tobytes()
    with pytest.raises(ConfigError, match="label_shift"):
        syn.SynthConfig(label_shift=1.2)
    with pytest.raises(ConfigError, match="appearance_shift"):
        syn.SynthConfig(appearance_shift=-0.1)


# ----------------------------------------------------------------------------- cases


def test_case_contract_and_determinism():
    cfg = _cfg()
    a = syn.generate_case(cfg, "Philips", 0, "HCM")
    b = syn.generate_case(cfg, "Philips", 0, "HCM")
    c = syn.generate_case(_cfg(seed=1), "Philips", 0, "HCM")
    assert a.cine.dtype == np.float32 and a.cine.shape[0] == 2 and a.cine.ndim == 4
    assert a.seg_ed.dtype == np.uint8 and a.seg_ed.shape == a.cine.shape[1:]
    assert set(np.unique(a.seg_ed)) == {0, 1, 2, 3}
    assert a.label == 1 and a.centre in {"2", "3"} and a.affine.shape == (4, 4)
    assert 8 <= a.cine.shape[3] <= 14 and a.spacing[2] == pytest.approx(9.0)
    assert np.allclose(np.linalg.norm(a.affine[:3, :3], axis=0), a.spacing)
    assert (
        a.cine.tobytes() == b.cine.tobytes()
        and a.seg_es.tobytes() == b.seg_es.tobytes()
    )
    assert a.cine.shape != c.cine.shape or not np.array_equal(a.cine, c.cine)
    # the frames of a whole cine at ED / ES are exactly the frames-only output
    full = syn.generate_case(cfg, "Philips", 0, "HCM", with_cine=True)
    assert full.cine.ndim == 4 and full.cine.shape[3] >= 12
    assert np.array_equal(full.frames(), a.frames())
    assert np.array_equal(full.seg_es, a.seg_es)


def test_subjects_do_not_depend_on_other_vendors():
    one = list(syn.generate_cohort(_cfg(subjects_per_vendor={"Siemens": 3, "GE": 1})))
    two = list(syn.generate_cohort(_cfg(subjects_per_vendor={"Siemens": 3, "GE": 4})))
    s1 = [c for c in one if c.vendor == "Siemens"]
    s2 = [c for c in two if c.vendor == "Siemens"]
    assert [c.subject_id for c in s1] == [c.subject_id for c in s2]
    assert all(np.array_equal(x.cine, y.cine) for x, y in zip(s1, s2, strict=True))


def _raw_stats(heterogeneity: float, **shifts) -> dict[str, float]:
    cfg = _cfg(heterogeneity=heterogeneity, **shifts)
    out = {}
    for vendor in VENDORS:
        case = syn.generate_case(cfg, vendor, 0, "NOR")
        out[vendor] = float(np.percentile(case.cine, 99))
    return out


def test_vendor_appearance_differs_at_h1_not_at_h0():
    h1, h0 = _raw_stats(1.0), _raw_stats(0.0)
    assert max(h1.values()) / min(h1.values()) > 4  # intensity scales differ
    assert max(h0.values()) / min(h0.values()) < 2  # only per-subject jitter remains


def test_phenotypes_follow_acdc_criteria():
    cfg = _cfg()
    m = {
        p: [
            syn.measure_phenotype(c.labels(), c.spacing)
            for c in (
                syn.generate_case(cfg, "Siemens", i, p, part="acdc") for i in range(4)
            )
        ]
        for p in ("NOR", "DCM", "HCM")
    }
    mean = {p: pd.DataFrame(v).mean() for p, v in m.items()}
    assert mean["NOR"].lv_ef > 50 and mean["DCM"].lv_ef < 40 and mean["HCM"].lv_ef > 55
    assert mean["HCM"].wall_max_mm > 15 and mean["NOR"].wall_max_mm < 12
    assert mean["DCM"].lv_edv_ml > 1.3 * mean["NOR"].lv_edv_ml


def test_measure_phenotype_on_known_shapes():
    lab = np.zeros((2, 64, 64, 4), np.uint8)
    i, j = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    r = np.hypot(i - 32, j - 32)  # in voxels of 1 mm
    for p, (rc, ro) in enumerate([(15, 25), (10, 22)]):
        lab[p][r < ro] = 2
        lab[p][r < rc] = 1
        lab[p][(i > 58) & (j < 40)] = 3  # same RV at ED and ES: RV EF 0
    out = syn.measure_phenotype(lab, (1.0, 1.0, 10.0))
    lv = [(lab[p] == 1).sum() * 0.01 for p in (0, 1)]
    assert out["lv_edv_ml"] == pytest.approx(lv[0])
    assert out["lv_ef"] == pytest.approx(100 * (lv[0] - lv[1]) / lv[0])
    assert out["wall_max_mm"] == pytest.approx(10.0, abs=1.0)
    assert out["rv_ef"] == pytest.approx(0.0)


# ----------------------------------------------------------------------------- writing


def test_make_synthetic_preprocessed(tmp_path):
    cfg = _cfg(subjects_per_vendor={v: 4 for v in VENDORS}, image_size=(24, 24, 8))
    out = syn.make_synthetic(tmp_path / "d", cfg)
    df = pd.read_csv(out / "manifest.csv")
    assert list(df.columns) == [
        "subject_id", "dataset", "vendor", "centre", "pathology", "label", "split", "path"
    ]  # fmt: skip
    assert df.groupby("vendor").size().to_dict() == {v: 4 for v in VENDORS}
    with np.load(out / df.path[0]) as z:
        assert z["image"].shape == (2, 24, 24, 8) and z["image"].dtype == np.float32
        assert z["label"].dtype == np.uint8 and set(np.unique(z["label"])) <= {
            0,
            1,
            2,
            3,
        }
        assert 0.0 <= z["image"].min() and z["image"].max() <= 1.0
        assert (z["label"][0] == 1).any()


def test_pretraining_pool_is_disjoint_and_preprocessed():
    cfg = _cfg(image_size=(24, 24, 8))
    images = list(syn.pretraining_pool(2, cfg))
    assert len(images) == 2 and images[0].shape == (2, 24, 24, 8)
    assert images[0].dtype == np.float32 and images[0].max() <= 1.0
    assert not np.array_equal(images[0], images[1])
    again = next(syn.pretraining_pool(1, cfg))
    assert np.array_equal(again, images[0])


def test_make_synthetic_with_two_workers_writes_the_same_bytes(tmp_path):
    """``resolve_data_dir`` generates full-size sets with 2 processes: same data."""
    cfg = _cfg(subjects_per_vendor={v: 3 for v in VENDORS}, image_size=(24, 24, 8))
    one = syn.make_synthetic(tmp_path / "one", cfg, workers=1)
    two = syn.make_synthetic(tmp_path / "two", cfg, workers=2)
    m1, m2 = pd.read_csv(one / "manifest.csv"), pd.read_csv(two / "manifest.csv")
    pd.testing.assert_frame_equal(m1, m2)
    for rel in m1["path"]:
        with np.load(one / rel) as a, np.load(two / rel) as b:
            assert np.array_equal(a["image"], b["image"])
            assert np.array_equal(a["label"], b["label"])
