"""``medlora_lib.fl.export``: a site exports the model it uses (chapter book/deployment.md).

Every test perturbs every trainable tensor (so a model that silently lost its global
adapter, its local adapter, FedSA-LoRA's private B or its head computes different
logits), writes the site's state with :class:`SiteStateStore`, exports it and checks
that :func:`load_exported` — and peft alone — compute the site's logits exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from medlora_lib.adapters import (
    METHODS,
    adapter_info,
    get_private_state,
    get_shared_state,
    unwrap_model,
)
from medlora_lib.config import config_hash, get_config
from medlora_lib.errors import ConfigError, DataError
from medlora_lib.fl.export import (
    EXPORT_FORMAT,
    HEAD_FILE,
    MODEL_CARD,
    export_site_model,
    load_exported,
)
from medlora_lib.fl.site_state import SiteStateStore
from medlora_lib.fl.task import build_adapted_model
from medlora_lib.models.checkpoint import SMALL_FM_PATH
from medlora_lib.pipeline import build_model

SITE = "site-a"
RUN = "run-0001"
META = {
    "round": 3,
    "metrics": {"val_auc": 0.75, "val_loss": 0.5},
    "selection_metric": "auc",
    "selection_value": 0.75,
}


def _cfg(method: str, pretrained: str = "small"):
    return get_config(
        "smoke", method=method, overrides={"model.pretrained": pretrained}
    )


def _perturbed(cfg, seed: int = 1):
    """The config's adapted model with every trainable tensor moved at random."""
    model = build_adapted_model(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _batch(cfg, n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn(n, 2, *cfg.data.image_size, generator=g)


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _save_site(state_dir: Path, cfg, model, run_key: str = RUN, which: str = "best"):
    store = SiteStateStore(state_dir, SITE)
    store.bind(run_key, cfg.to_dict(), config_hash(cfg))
    store.save_deployed(
        run_key,
        which,
        get_shared_state(model),
        get_private_state(model),
        META,
        model,
    )
    return store


def _peft_only(out: Path, cfg, adapters: list[str]):
    """Load the exported folders with peft's own API (medlora only builds the FM)."""
    from peft import PeftModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        base, _ = build_model(cfg)
    first, *others = adapters
    model = PeftModel.from_pretrained(base, str(out / first), adapter_name=first)
    for a in others:
        model.load_adapter(str(out / a), adapter_name=a)
    model.base_model.set_adapter(adapters)
    result = unwrap_model(model).load_state_dict(
        load_file(str(out / HEAD_FILE)), strict=False
    )
    assert not result.unexpected_keys
    return model.eval()


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("method", "pretrained"),
    [
        ("med_dual_lora", "small"),
        ("fedsa_lora", "small"),
        ("fedavg_lora", "none"),
        ("ffa_lora", "small"),
    ],
)
def test_export_round_trip_gives_the_sites_logits(tmp_path, method, pretrained):
    cfg = _cfg(method, pretrained)
    model = _perturbed(cfg)
    x = _batch(cfg)
    want = _logits(model, x)
    with torch.no_grad(), model.disable_adapter():
        plain = model(x)
    assert (want - plain).abs().max() > 1e-3  # the adapters matter: the test can fail
    _save_site(tmp_path / "state", cfg, model)

    out = export_site_model(tmp_path / "state", tmp_path / "export")
    spec = METHODS[method]
    adapters = list(spec.adapters)
    assert out == (tmp_path / "export").absolute()
    assert sorted(os.listdir(out)) == sorted([*adapters, HEAD_FILE, MODEL_CARD])
    for a in adapters:
        assert sorted(os.listdir(out / a)) == [
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    card = json.loads((out / MODEL_CARD).read_text())
    assert card["format"] == EXPORT_FORMAT
    assert (card["site"], card["run_key"], card["deployed"]) == (SITE, RUN, "best")
    assert card["round"] == 3 and card["metrics"] == META["metrics"]
    assert card["config"] == cfg.to_dict() and card["method"] == method
    assert list(card["adapters"]) == adapters
    fm = card["foundation_model"]
    assert fm["size"] == cfg.model.size and fm["pretrained"] == pretrained
    assert fm["image_size"] == list(cfg.data.image_size)
    assert fm["weights_sha256"] == (
        None if pretrained == "none" else _sha256(SMALL_FM_PATH)
    )
    assert (
        card["medlora_version"] and "PeftModel.from_pretrained" in card["how_to_load"]
    )
    head = load_file(str(out / HEAD_FILE))
    assert set(head) == set(card["head_tensors"])
    assert {k for k in head if k.startswith("pred_head_dict.")} and not [
        k for k in head if ".lora_" in k
    ]

    loaded = load_exported(out)
    got = _logits(loaded, x)
    assert torch.equal(got, want) or (got - want).abs().max() <= 1e-6
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert list(loaded.base_model.active_adapters) == adapters
    assert adapter_info(loaded).method == method

    by_peft = _logits(_peft_only(out, cfg, adapters), x)
    assert (by_peft - want).abs().max() <= 1e-6

    if pretrained == "none":
        with pytest.raises(ConfigError, match="random backbone"):
            load_exported(out, pretrained="small")


def test_fedsa_export_holds_the_sites_private_b(tmp_path):
    cfg = _cfg("fedsa_lora")
    model = _perturbed(cfg, seed=3)
    private = get_private_state(model)
    b_keys = [k for k in private if ".lora_B.global." in k]
    assert b_keys  # FedSA-LoRA keeps every global B at the site
    _save_site(tmp_path / "state", cfg, model)
    out = export_site_model(tmp_path / "state", tmp_path / "export")
    saved = load_file(str(out / "global" / "adapter_model.safetensors"))
    for k in b_keys:
        peft_key = "base_model.model." + k.replace(".global.", ".")
        assert torch.equal(saved[peft_key], private[k]), k
    shared = get_shared_state(model)
    for k in (k for k in shared if ".lora_A.global." in k):
        assert torch.equal(
            saved["base_model.model." + k.replace(".global.", ".")], shared[k]
        )


def test_med_dual_local_adapter_is_the_sites(tmp_path):
    cfg = _cfg("med_dual_lora")
    model = _perturbed(cfg, seed=5)
    _save_site(tmp_path / "state", cfg, model)
    out = export_site_model(tmp_path / "state", tmp_path / "export")
    saved = load_file(str(out / "local" / "adapter_model.safetensors"))
    private = {k: v for k, v in get_private_state(model).items() if ".local." in k}
    assert len(saved) == len(private) > 0
    for k, v in private.items():
        assert torch.equal(saved["base_model.model." + k.replace(".local.", ".")], v)


# ------------------------------------------------------------------ bad inputs


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A fedavg_lora site's state (run RUN, deployed-best) and its export."""
    root = tmp_path_factory.mktemp("export")
    cfg = _cfg("fedavg_lora")
    model = _perturbed(cfg, seed=11)
    _save_site(root / "state", cfg, model)
    out = export_site_model(root / "state", root / "export")
    return {"root": root, "cfg": cfg, "model": model, "out": out}


def test_unknown_run_key_lists_the_runs(site, tmp_path):
    with pytest.raises(DataError, match=rf"no run 'nope'.*{RUN}"):
        export_site_model(site["root"] / "state", tmp_path / "x", run_key="nope")


def test_missing_deployed_model(site, tmp_path):
    with pytest.raises(
        DataError,
        match=rf"no run with a deployed-last.*{RUN} \(deployed-best\).*which='best'",
    ):
        export_site_model(site["root"] / "state", tmp_path / "x", which="last")
    with pytest.raises(DataError, match="no deployed-last"):
        export_site_model(
            site["root"] / "state", tmp_path / "x", run_key=RUN, which="last"
        )
    store = SiteStateStore(tmp_path / "fresh", SITE)
    store.bind(RUN, site["cfg"].to_dict(), config_hash(site["cfg"]))
    with pytest.raises(DataError, match="no deployed model yet"):
        export_site_model(tmp_path / "fresh", tmp_path / "x")
    with pytest.raises(DataError, match="is not a site's state-dir"):
        export_site_model(tmp_path / "nothing", tmp_path / "x")
    with pytest.raises(ConfigError, match="which='worst'"):
        export_site_model(site["root"] / "state", tmp_path / "x", which="worst")
    assert not (tmp_path / "x").exists()


def test_existing_out_dir_needs_overwrite(site, tmp_path, monkeypatch):
    out = tmp_path / "export"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(DataError, match="already exists.*overwrite=True"):
        export_site_model(site["root"] / "state", out)
    assert (out / "stale.txt").exists()
    with pytest.raises(DataError, match="overlaps the state-dir"):
        export_site_model(
            site["root"] / "state", site["root"] / "state" / "exp", overwrite=True
        )

    # a failure while writing leaves the old folder as it was and no temporary folder
    import medlora_lib.fl.site_state as site_state

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(site_state, "atomic_write_tensors", boom)
    with pytest.raises(OSError, match="disk full"):
        export_site_model(site["root"] / "state", out, overwrite=True)
    assert sorted(os.listdir(out)) == ["stale.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    monkeypatch.undo()

    export_site_model(site["root"] / "state", out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / MODEL_CARD).exists()


def test_newest_run_is_exported_by_default(site, tmp_path):
    cfg, model = site["cfg"], site["model"]
    _save_site(tmp_path / "state", cfg, model, run_key="run-b")
    store = _save_site(tmp_path / "state", cfg, model, run_key="run-a")
    older = store.run_dir("run-a") / "deployed-best" / "deployed.json"
    os.utime(older, ns=(10**18, 10**18))  # run-a dates from 2001: run-b is the newest
    out = export_site_model(tmp_path / "state", tmp_path / "export")
    assert json.loads((out / MODEL_CARD).read_text())["run_key"] == "run-b"
    out = export_site_model(tmp_path / "state", tmp_path / "e2", run_key="run-a")
    assert json.loads((out / MODEL_CARD).read_text())["run_key"] == "run-a"


def test_weights_are_checked_by_hash(site, tmp_path):
    cfg, model, out = site["cfg"], site["model"], site["out"]
    x = _batch(cfg)
    same = tmp_path / "copy_of_small_fm.safetensors"
    same.write_bytes(SMALL_FM_PATH.read_bytes())
    got = _logits(load_exported(out, pretrained=str(same)), x)
    assert (got - _logits(model, x)).abs().max() <= 1e-6

    tensors = load_file(str(SMALL_FM_PATH))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1.0
    other = tmp_path / "other_fm.safetensors"
    save_file(tensors, str(other))
    want, bad = _sha256(SMALL_FM_PATH), _sha256(other)
    with pytest.raises(DataError, match=rf"SHA-256 {bad}.*SHA-256 {want}"):
        load_exported(out, pretrained=str(other))


def test_load_exported_refuses_a_broken_folder(site, tmp_path):
    with pytest.raises(DataError, match=f"{MODEL_CARD} does not exist"):
        load_exported(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    card = json.loads((site["out"] / MODEL_CARD).read_text())
    (broken / MODEL_CARD).write_text(json.dumps(card))
    with pytest.raises(DataError, match="lacks the 'global' adapter"):
        load_exported(broken)
