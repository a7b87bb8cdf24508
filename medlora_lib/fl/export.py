"""Export the model a site actually uses, in PEFT's own adapter format.

Chapter ``book/deployment.md`` (after the federation: the site's model leaves the
SuperNode's ``state-dir``).

During a run every site keeps its deployed model under its ``state-dir``
(:mod:`medlora_lib.fl.site_state`): the global tensors it received (``shared``) and
what never left it (``private``: Med-DualLoRA's local adapter, FedSA-LoRA's ``B``, a
private head). :func:`export_site_model` rebuilds that model from the saved
experiment config, loads both parts and writes it as a self-contained folder::

    <out-dir>/model_card.json              site, run key, round, metrics, the full
                                           experiment config, the frozen foundation
                                           model (size, weights, SHA-256, image size)
    <out-dir>/global/adapter_config.json   the global adapter, PEFT format, *as the
    <out-dir>/global/adapter_model.safetensors   site uses it* (FedSA-LoRA: the site's B)
    <out-dir>/local/...                    the local adapter (methods that have one)
    <out-dir>/head.safetensors             every trained tensor that is not LoRA (heads,
                                           final norms if trained) and the heads even
                                           when frozen (they are not in the FM weights)

Each adapter folder is what ``PeftModel.save_pretrained(selected_adapters=[name])``
writes for a non-default adapter (peft puts it in a subfolder named after the
adapter); it is loadable by peft alone. Frozen adapter tensors (FFA-LoRA's ``A``) are
in the folder too. :func:`load_exported` builds the frozen foundation model named in
the card (refusing weights whose SHA-256 differs), attaches the adapters with
``PeftModel.from_pretrained`` / ``load_adapter``, activates them together (their
outputs add up) and loads the head. The folder is written under a temporary sibling
name and renamed into place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medlora_lib.errors import CheckpointError, ConfigError, DataError
from medlora_lib.fl.site_state import swap_dir

__all__ = [
    "EXPORT_FORMAT",
    "MODEL_CARD",
    "HEAD_FILE",
    "export_site_model",
    "load_exported",
    "weights_sha256",
]

#: ``format`` field of an exported model's card.
EXPORT_FORMAT = "medlora-site-export-v1"
#: File names inside an exported folder.
MODEL_CARD = "model_card.json"
HEAD_FILE = "head.safetensors"

_WHICH = ("best", "last")
_LORA_RE = re.compile(r"\.lora_[AB]\.[^.]+\.weight$")
_PEFT_PREFIX = "base_model.model."


# --------------------------------------------------------------------------------------
# Reading a site's state
# --------------------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} does not exist: {what}") from None
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{path}: cannot read it ({exc}); the file is corrupt — {what}"
        ) from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object; {what}")
    return obj


def _runs(root: Path) -> dict[str, list[str]]:
    """Run folders of a state-dir -> the deployed models each holds (``best``, ``last``)."""
    out: dict[str, list[str]] = {}
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.name.startswith("."):
            continue
        deployed = [
            w for w in _WHICH if (d / f"deployed-{w}" / "deployed.json").exists()
        ]
        if deployed or (d / "experiment.json").exists():
            out[d.name] = deployed
    return out


def _describe(runs: dict[str, list[str]]) -> str:
    if not runs:
        return "none"
    return ", ".join(
        f"{k} ({'deployed-' + '/'.join(v) if v else 'no deployed model yet'})"
        for k, v in runs.items()
    )


def _other(which: str) -> str:
    return "last" if which == "best" else "best"


def _pick_run(root: Path, run_key: str | None, which: str) -> str:
    runs = _runs(root)
    if run_key is None:
        holding = [k for k, v in runs.items() if which in v]
        if not holding:
            raise DataError(
                f"state-dir {root} holds no run with a deployed-{which} model (runs: "
                f"{_describe(runs)}); a site writes it when it evaluates a round — run "
                f"the federation first, or pass which={_other(which)!r} / another "
                "state-dir"
            )
        return max(
            holding,
            key=lambda k: (
                (root / k / f"deployed-{which}" / "deployed.json").stat().st_mtime_ns,
                k,
            ),
        )
    if run_key not in runs:
        raise DataError(
            f"state-dir {root} has no run {run_key!r} (runs: {_describe(runs)}); pass "
            "one of these run keys, or run_key=None for the newest"
        )
    if which not in runs[run_key]:
        raise DataError(
            f"run {run_key!r} in {root} has no deployed-{which} model (it holds: "
            f"{_describe({run_key: runs[run_key]})}); the site writes it when it "
            f"evaluates a round — pass which={_other(which)!r} or another run"
        )
    return run_key


# --------------------------------------------------------------------------------------
# Foundation-model weights
# --------------------------------------------------------------------------------------


def _weights_file(pretrained: str) -> Path | None:
    """The weights file ``model.pretrained`` names (None for ``"none"``)."""
    if pretrained == "none":
        return None
    from medlora_lib.models.checkpoint import _resolve

    return _resolve(pretrained)


def weights_sha256(pretrained: str) -> str | None:
    """SHA-256 (hex) of the foundation-model weights ``model.pretrained`` names.

    Args:
        pretrained: ``"small"`` (embedded FM), ``"hub"``, a path, or ``"none"``.

    Returns:
        The hex digest of the file's bytes, or None for ``"none"`` (a random backbone
        drawn from the experiment's seed).

    Raises:
        CheckpointError: the file does not exist (or the hub cannot be reached).
    """
    path = _weights_file(pretrained)
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _build_base(cfg: Any) -> nn.Module:
    """The frozen ConvViT of ``cfg``, built as :func:`~medlora_lib.fl.task.build_adapted_model`
    builds it (under ``torch.manual_seed(cfg.seed)``: the same random parts)."""
    from medlora_lib.pipeline import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model, _ = build_model(cfg)
    return model


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------


def _clean(name: str) -> str:
    return name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name


def _head_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trained non-LoRA tensor (heads, trained norms) + the heads even if frozen."""
    from medlora_lib.adapters import parameter_roles

    roles = parameter_roles(model)
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        key = _clean(name)
        if _LORA_RE.search(key):
            continue
        if roles.get(key) in ("shared", "private") or key.startswith("pred_head_dict."):
            out[key] = p.detach().to("cpu", copy=True)
    return out


def _how_to_load(adapters: list[str]) -> str:
    first, *others = adapters
    extra = "".join(f"; m.load_adapter('{a}', adapter_name='{a}')" for a in others)
    return (
        "With medlora: `from medlora_lib.fl.export import load_exported; "
        "model = load_exported(OUT_DIR)` (pass pretrained=PATH when the weights file "
        "lives elsewhere; its SHA-256 must equal foundation_model.weights_sha256). "
        "With peft alone: build the frozen foundation model of foundation_model "
        "(medlora_lib.pipeline.build_model(ExperimentConfig.from_dict(config)) under "
        "torch.manual_seed(config.seed)), then "
        f"`m = PeftModel.from_pretrained(base, '{first}', adapter_name='{first}')"
        f"{extra}; m.base_model.set_adapter({adapters!r})` (the adapters' outputs "
        f"add up), load {HEAD_FILE} into m.base_model.model with "
        "load_state_dict(strict=False), and call m.eval()."
    )


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def export_site_model(
    state_dir: str | Path,
    out_dir: str | Path,
    run_key: str | None = None,
    which: str = "best",
    overwrite: bool = False,
) -> Path:
    """Write the model a site uses (global + local adapter + head) as PEFT folders.

    Chapter ``book/deployment.md``. The model is rebuilt from the run's
    ``experiment.json`` (the foundation model's weights must be where
    ``model.pretrained`` says), its shared and private tensors are loaded from
    ``deployed-<which>/`` — so the exported global adapter is the one the site uses,
    FedSA-LoRA's private ``B`` included — and the folder described in the module
    docstring is written atomically.

    Args:
        state_dir: the SuperNode's ``state-dir`` (holds ``site.json``).
        out_dir: the folder to create.
        run_key: the run to export; None = the newest run holding a
            ``deployed-<which>`` model.
        which: ``"best"`` (the best validation round) or ``"last"``.
        overwrite: replace an existing ``out_dir``.

    Returns:
        ``out_dir`` (absolute).

    Raises:
        ConfigError: ``which`` is not ``best`` / ``last``; the saved config is invalid.
        DataError: no such state-dir, run or deployed model; a corrupt file; saved
            tensors that do not fit the config; ``out_dir`` exists (without
            ``overwrite``) or overlaps ``state_dir``; the weights cannot be loaded.
    """
    from medlora_lib import __version__
    from medlora_lib.adapters import (
        METHODS,
        adapter_info,
        set_private_state,
        set_shared_state,
    )
    from medlora_lib.config import ExperimentConfig
    from medlora_lib.fl.site_state import (
        SiteStateStore,
        atomic_write_tensors,
    )
    from medlora_lib.fl.task import build_adapted_model

    if which not in _WHICH:
        raise ConfigError(
            f"export: which={which!r} is unknown; use 'best' (the best validation "
            "round) or 'last'"
        )
    root = Path(state_dir).expanduser().absolute()
    out = Path(out_dir).expanduser().absolute()
    marker = root / "site.json"
    if not marker.exists():
        raise DataError(
            f"{root} is not a site's state-dir ({marker} is missing); pass the "
            "SuperNode's state-dir (its node config `state-dir`)"
        )
    site = _read_json(marker, "pass an intact state-dir").get("site")
    if _overlaps(out, root):
        raise DataError(
            f"out_dir {out} overlaps the state-dir {root}; export to a folder outside it"
        )
    if out.exists() and not out.is_dir():
        raise DataError(f"out_dir {out} is a file; choose a folder path")
    if out.exists() and not overwrite:
        raise DataError(
            f"out_dir {out} already exists; pass overwrite=True (--overwrite) to "
            "replace it, or choose another folder"
        )

    key = _pick_run(root, run_key, which)
    exp_path = root / key / "experiment.json"
    experiment = _read_json(
        exp_path, "the run's config is needed to rebuild its model; export another run"
    )
    if not isinstance(experiment.get("config"), dict):
        raise DataError(
            f"{exp_path} has no `config` object; the run's config is needed to rebuild "
            "its model — export another run"
        )
    try:
        cfg = ExperimentConfig.from_dict(experiment["config"])
    except ConfigError as exc:
        raise ConfigError(
            f"{exp_path}: the saved config is not valid for this medlora version "
            f"({exc}); export with the medlora version that ran the experiment"
        ) from exc
    store = SiteStateStore(root, str(site))
    deployed = store.deployed(key, which)
    assert deployed is not None  # _pick_run checked deployed.json
    dep_dir = Path(deployed["path"])

    try:
        model = build_adapted_model(cfg)
    except CheckpointError as exc:
        raise DataError(
            f"{exp_path} field `model.pretrained`={cfg.model.pretrained!r}: cannot load "
            f"the foundation model ({exc}); export on the site's machine, where the "
            "weights are"
        ) from exc
    try:
        set_shared_state(model, deployed["shared"])
        set_private_state(model, deployed["private"])
    except CheckpointError as exc:
        raise DataError(
            f"{dep_dir}: the saved tensors do not fit the model of {exp_path} ({exc}); "
            "the folder belongs to another configuration — export another run"
        ) from exc
    model.eval()

    info = adapter_info(model)
    spec = METHODS[info.method]
    adapters = list(info.adapters)
    fm_file = _weights_file(cfg.model.pretrained)
    meta = deployed["meta"]
    card: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "site": site,
        "run_key": key,
        "deployed": which,
        "round": meta.get("round"),
        "metrics": meta.get("metrics", {}),
        "selection_metric": meta.get("selection_metric"),
        "selection_value": meta.get("selection_value"),
        "method": info.method,
        "adapters": {
            a: {
                "folder": a,
                "rank": info.config.rank_of(a),
                "role": "federated (global)"
                if a == "global"
                else "kept at the site (local)",
            }
            for a in adapters
        },
        "adapted_blocks": list(info.blocks),
        "head": HEAD_FILE,
        "config": cfg.to_dict(),
        "config_id": experiment.get("config_id"),
        "foundation_model": {
            "size": cfg.model.size,
            "pretrained": cfg.model.pretrained,
            "weights_file": None if fm_file is None else str(fm_file),
            "weights_sha256": weights_sha256(cfg.model.pretrained),
            "image_size": list(cfg.data.image_size),
            "in_frames": 2,
            "num_classes": 2,
            "overrides": dict(cfg.model.overrides),
            "seed": cfg.seed,
            "note": "frozen; not part of this folder"
            + (
                " (model.pretrained='none': a random backbone drawn from `seed`)"
                if fm_file is None
                else ""
            ),
        },
        "method_description": spec.description,
        "medlora_version": __version__,
        "peft_version": _version("peft"),
        "torch_version": torch.__version__,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "how_to_load": _how_to_load(adapters),
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        scratch = tmp / ".peft"
        # peft writes a non-default adapter to <dir>/<name>/ (and a README.md at <dir>)
        model.save_pretrained(str(scratch), selected_adapters=adapters)
        for a in adapters:
            os.replace(scratch / a, tmp / a)
        shutil.rmtree(scratch)
        head = _head_tensors(model)
        atomic_write_tensors(tmp / HEAD_FILE, head)
        card["head_tensors"] = sorted(head)
        (tmp / MODEL_CARD).write_text(json.dumps(card, indent=1, default=str))
        swap_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------


def load_exported(out_dir: str | Path, pretrained: str | None = None) -> nn.Module:
    """The model of an exported folder, ready for inference.

    Chapter ``book/deployment.md``. Builds the frozen foundation model named in
    ``model_card.json``, attaches the adapters with peft (``PeftModel.from_pretrained``
    for the first, ``load_adapter`` for the others), activates them all
    (``model.base_model.set_adapter(["global", "local"])``: their outputs add up, as
    in :func:`medlora_lib.adapters.apply_adapters`) and loads ``head.safetensors``.

    Args:
        out_dir: a folder written by :func:`export_site_model`.
        pretrained: a local weights file (or ``"small"`` / ``"hub"``) replacing the
            card's ``model.pretrained``; its SHA-256 must equal the card's.

    Returns:
        The ``peft.PeftModel`` in eval mode, every parameter frozen;
        :func:`medlora_lib.adapters.adapter_info` works on it.

    Raises:
        DataError: no card / a corrupt card or file, a missing adapter folder, weights
            whose SHA-256 differs from the card's, head tensors the model lacks.
        ConfigError: ``pretrained`` given for a model exported on a random backbone.
    """
    from peft import PeftModel

    from medlora_lib.adapters import (
        ADAPTER_INFO_ATTR,
        AdapterInfo,
        resolve_adapted_blocks,
        unwrap_model,
    )
    from medlora_lib.config import ExperimentConfig
    from medlora_lib.fl.site_state import read_tensors

    folder = Path(out_dir).expanduser().absolute()
    card_path = folder / MODEL_CARD
    card = _read_json(
        card_path, "pass a folder written by export_site_model (medlora export)"
    )
    if card.get("format") != EXPORT_FORMAT:
        raise DataError(
            f"{card_path}: field `format` is {card.get('format')!r}, expected "
            f"{EXPORT_FORMAT!r}; re-export the model with this medlora version"
        )
    try:
        cfg = ExperimentConfig.from_dict(card["config"])
    except (KeyError, TypeError, ConfigError) as exc:
        raise DataError(
            f"{card_path}: field `config` is missing or invalid ({exc}); re-export the "
            "model with this medlora version"
        ) from exc
    fm = card.get("foundation_model") or {}
    want = fm.get("weights_sha256")
    if pretrained is not None:
        if want is None:
            raise ConfigError(
                f"{card_path}: the model was exported on a random backbone "
                "(foundation_model.pretrained='none', drawn from the seed); do not pass "
                f"pretrained={pretrained!r}"
            )
        cfg = dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, pretrained=str(pretrained))
        )
    source = cfg.model.pretrained
    if want is not None:
        try:
            got = weights_sha256(source)
        except CheckpointError as exc:
            raise DataError(
                f"{card_path}: cannot read the foundation model "
                f"(model.pretrained={source!r}: {exc}); pass pretrained=PATH to a copy "
                f"of the weights with SHA-256 {want}"
            ) from exc
        if got != want:
            raise DataError(
                f"foundation-model weights {source!r} ({_weights_file(source)}) have "
                f"SHA-256 {got}, but {card_path} was exported on weights with SHA-256 "
                f"{want} ({fm.get('weights_file')}); pass pretrained=PATH to those "
                "weights — the adapters only fit the foundation model they were "
                "trained on"
            )

    adapters = list(card.get("adapters") or {})
    if not adapters:
        raise DataError(f"{card_path}: field `adapters` is empty; re-export the model")
    for a in adapters:
        cfg_file = folder / a / "adapter_config.json"
        if not cfg_file.exists():
            raise DataError(
                f"{cfg_file} is missing: the exported folder lacks the {a!r} adapter; "
                "re-export the model (medlora export)"
            )

    try:
        base = _build_base(cfg)
    except CheckpointError as exc:
        raise DataError(
            f"{card_path}: cannot load the foundation model ({exc}); pass "
            "pretrained=PATH to the weights"
        ) from exc
    first, *others = adapters
    model = PeftModel.from_pretrained(base, str(folder / first), adapter_name=first)
    for a in others:
        model.load_adapter(str(folder / a), adapter_name=a)
    # every adapter active: their outputs add up (PeftModel.set_adapter takes one name)
    model.base_model.set_adapter(adapters)

    head = read_tensors(folder / HEAD_FILE) if (folder / HEAD_FILE).exists() else None
    if head is None:
        raise DataError(
            f"{folder / HEAD_FILE} is missing; re-export the model (medlora export)"
        )
    params = dict(unwrap_model(model).named_parameters())
    unknown = [k for k in head if k not in params]
    bad = [
        k
        for k in head
        if k in params and tuple(head[k].shape) != tuple(params[k].shape)
    ]
    if unknown or bad:
        raise DataError(
            f"{folder / HEAD_FILE} does not fit the model of {card_path}: unknown "
            f"tensors {unknown[:5]}, wrong shapes {bad[:5]}; re-export the model"
        )
    with torch.no_grad():
        for k, t in head.items():
            params[k].copy_(t.to(dtype=params[k].dtype))
    for p in model.parameters():  # set_adapter re-enables requires_grad
        p.requires_grad_(False)

    acfg = cfg.adapter_config()
    depth = int(unwrap_model(model).config.depth)
    info = AdapterInfo(
        config=acfg,
        method=cfg.method,
        seed=cfg.seed,
        depth=depth,
        blocks=tuple(resolve_adapted_blocks(acfg.adapted_blocks, depth)),
        adapters=tuple(adapters),
    )
    object.__setattr__(model, ADAPTER_INFO_ATTR, info)
    model.eval()
    return model
