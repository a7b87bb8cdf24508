"""The paper path without a GPU: CineMA-base loaded through the hub path, end to end.

The CineMA weights come from a Hugging Face cache laid out offline (``HF_HUB_OFFLINE=1``,
``HF_HOME`` a temporary folder; ``tests/cinema_hub.py``) holding a formula checkpoint
with CineMA's real keys and shapes under its real name. The end-to-end test runs the
command a researcher runs (``book/gpu_colab.md``: ``medlora run --method med_dual_lora
--profile paper --data DIR --out DIR``) on a handful of synthetic subjects at 192 × 192
× 16 for one round: every line a GPU user runs except CUDA itself. It runs whatever the
``paper`` profile says (augmentation, prefix cache, AMP, ...). Bad input: a hub file
that is not CineMA's, and an HF cache without the file while offline.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medlora_lib.config import get_config
from medlora_lib.errors import CheckpointError
from medlora_lib.models import build_convvit, load_pretrained
from medlora_lib.models.checkpoint import FIRST_CONV
from tests.cinema_hub import FILENAME, REPO_FOLDER, formula_tensor, write_hf_cache

ROOT = Path(__file__).resolve().parent.parent
IMG = (192, 192, 16)
#: synthetic subjects per site: 3 train, 1 val, 1 test at the default split fractions
PER_SITE = 5
SITES = ("Siemens", "Philips")


@pytest.fixture
def offline_hub(monkeypatch):
    """Point this process's huggingface_hub at an HF cache, offline; return a setter."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def use(hf_home: Path) -> None:
        monkeypatch.setenv("HF_HOME", str(hf_home))
        # the library reads the cache folder at call time from these constants
        monkeypatch.setattr(
            huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub")
        )
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    return use


def _base() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_convvit("base", IMG, in_frames=2, num_classes=2)


@pytest.mark.slow
def test_hub_path_loads_cinema_from_an_offline_hf_cache(cinema_hf_home, offline_hub):
    """``"hub"`` finds the file in the HF cache; CineMA's rules give 244 keys unchanged,
    the first conv tiled, heads and pos_embed left; every value is the file's."""
    offline_hub(cinema_hf_home)
    model = _base()
    t0 = time.perf_counter()
    rep = load_pretrained(model, "hub")
    seconds = time.perf_counter() - t0
    snap = cinema_hf_home / "hub" / REPO_FOLDER / "snapshots"
    assert Path(rep.source).is_relative_to(snap) and rep.source.endswith(FILENAME)
    assert (
        rep.kind == "mae"
        and len(rep.loaded) == 244
        and list(rep.adapted) == [FIRST_CONV]
    )
    assert len(rep.dropped) == 358
    sd = model.state_dict()
    heads = [k for k in sd if k.startswith("pred_head_dict.")]
    assert sorted(rep.missing) == sorted(["enc_down_dict.sax.pos_embed", *heads])
    for key in rep.loaded:
        assert torch.equal(sd[key], formula_tensor(key, tuple(sd[key].shape))), key
    first = formula_tensor(FIRST_CONV, (64, 1, 4, 4, 1))
    assert torch.equal(sd[FIRST_CONV], first.repeat(1, 2, 1, 1, 1))
    print(f"hub load of the 503 MB checkpoint: {seconds:.1f} s")


@pytest.mark.parametrize(
    ("state", "match"),
    [
        # a timm ViT checkpoint (fused qkv, other prefixes): not CineMA's names
        (
            {"blocks.0.attn.qkv.weight": torch.zeros(2304, 768)},
            r"unexpected key\(s\).*'blocks\.0\.attn\.qkv\.weight'.*is it a CineMA",
        ),
        # CineMA's names, another width: the first mismatching key and both shapes
        (
            {
                "encoder.blocks.0.attn.q.weight": torch.zeros(384, 384),
                "encoder.blocks.0.attn.kv.weight": torch.zeros(768, 384),
            },
            r"first mismatching key 'encoder\.blocks\.0\.attn\.q\.weight' has shape "
            r"\[384, 384\] in the file but \[768, 768\]",
        ),
    ],
    ids=["wrong-keys", "wrong-shapes"],
)
def test_hub_file_that_is_not_cinema_is_refused(tmp_path, offline_hub, state, match):
    offline_hub(tmp_path)
    write_hf_cache(tmp_path / "hub", state)
    with pytest.raises(CheckpointError, match=match):
        load_pretrained(_base(), "hub")


def _check_offline_advice(msg: str) -> None:
    assert "mathpluscode/CineMA" in msg and FILENAME in msg
    assert "HF_HUB_OFFLINE is set and the file is not in the HF cache" in msg
    assert "hf download" in msg and "model.pretrained=" in msg


@pytest.mark.parametrize("cache", ["empty", "snapshot-without-file"])
def test_offline_hf_cache_without_the_file_fails_in_seconds(
    tmp_path, offline_hub, cache
):
    """The real huggingface_hub on an HF cache that lacks the file: instructions at
    once, no network wait; ``simulate`` refuses before Flower starts."""
    from medlora_lib.fl import simulate

    offline_hub(tmp_path)
    if cache == "snapshot-without-file":  # refs/main and a snapshot, but no file
        write_hf_cache(tmp_path / "hub", {"x": torch.zeros(1)})
        (tmp_path / "hub" / REPO_FOLDER / "snapshots").joinpath(
            "0123456789abcdef0123456789abcdef01234567", FILENAME
        ).unlink()
    model = build_convvit("small", (32, 32, 4))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as err:
        load_pretrained(model, "hub")
    assert time.perf_counter() - t0 < 5
    _check_offline_advice(str(err.value))
    cfg = get_config("smoke", overrides=['model.pretrained="hub"', "fed.num_rounds=1"])
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as err:  # not a DeploymentError from Flower
        simulate(cfg, verbose=False)
    assert time.perf_counter() - t0 < 20
    _check_offline_advice(str(err.value))


def _paper_data(out: Path) -> Path:
    """A prepared folder as the paper profile expects: 192 x 192 x 16, CineMA's crop
    and intensity, ``PER_SITE`` synthetic subjects for each of ``SITES``."""
    from medlora_lib.data.synthetic import make_synthetic
    from medlora_lib.pipeline import synthetic_config

    scfg = dataclasses.replace(
        synthetic_config(get_config("paper")),
        subjects_per_vendor=dict.fromkeys(SITES, PER_SITE),
    )
    return make_synthetic(out, scfg)


def _env(hf_home: Path, cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_CACHE"}
    env.update(
        HF_HOME=str(hf_home),
        HF_HUB_OFFLINE="1",
        MEDLORA_CACHE=str(cache),
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    env.pop("MEDLORA_DATA_DIR", None)
    return env


@pytest.mark.slow
def test_paper_profile_end_to_end_on_cpu_through_the_hub_path(cinema_hf_home, tmp_path):
    """``medlora run --method med_dual_lora --profile paper`` (CineMA-base, hub
    weights, real input size) for one round: a result for both sites, the paper's
    model and input, the adapters' shared part only, Flower's simulation."""
    data = _paper_data(tmp_path / "data")
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "medlora_lib.cli",
        "run",
        "--method",
        "med_dual_lora",
        "--profile",
        "paper",
        "--data",
        str(data),
        "--out",
        str(out),
        "--set",
        "fed.num_rounds=1",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd,
        env=_env(cinema_hf_home, tmp_path / "cache"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from medlora_lib.fl import RunResult

    r = RunResult.load(out)
    cfg = r.config
    paper = get_config("paper", method="med_dual_lora")
    # whatever the paper profile says (model, training recipe, adapters) is what ran
    for section in ("model", "train", "adapter", "data"):
        want, got = getattr(paper, section), getattr(cfg, section)
        skip = {"data_dir"} if section == "data" else set()
        for f in dataclasses.fields(want):
            if f.name not in skip:
                assert getattr(got, f.name) == getattr(want, f.name), (section, f.name)
    assert cfg.model.size == "base" and cfg.model.pretrained == "hub"
    assert tuple(cfg.data.image_size) == IMG
    assert cfg.fed.num_rounds == 1 and cfg.method == "med_dual_lora"
    assert r.provenance["runtime"] == "flower-simulation" and not r.failures
    assert sorted(r.rounds["client"].unique()) == sorted(SITES)
    assert (r.rounds["train_loss"] > 0).all()
    assert (r.rounds["val_n"] >= 1).all() and (r.rounds["test_n"] >= 1).all()
    sel = r.selected()
    assert set(sel["client"]) >= set(SITES)
    # a one-subject test split has one class: its balanced accuracy is undefined (NaN)
    ba = sel["balanced_accuracy"]
    assert (ba.isna() | ba.between(0, 1)).all()
    assert ba[sel["client"] == "pooled"].between(0, 1).all()
    # only the global adapter was shared: the local one never left its site
    assert r.final_shared and not any(".local." in k for k in r.final_shared)
    print(
        f"paper profile, CineMA-base, {len(SITES)} sites x {PER_SITE} subjects, "
        f"1 round, `medlora run`: {seconds:.0f} s"
    )
