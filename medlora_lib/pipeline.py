"""From a config to data, model and a fine-tuned reference: the steps every chapter shares.

- :func:`resolve_data_dir` — the prepared data of a config: ``data.data_dir``,
  ``$MEDLORA_DATA_DIR``, or the synthetic set of the profile (generated once, cached by
  its parameters).
- :func:`load_client_data` — every client's train / val / test arrays in memory.
- :func:`build_model` — the ConvViT of the profile with its pretrained weights.
- :func:`finetune_pooled` — the centralised reference (all clients' data pooled), used to
  calibrate the difficulty of the synthetic task before any federated method is compared.

Explained in the book: notebooks 00 and 01.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medlora_lib.config import ExperimentConfig, default_cache_dir, profile_defaults
from medlora_lib.errors import DataError

__all__ = [
    "ClientData",
    "resolve_data_dir",
    "check_data_matches",
    "synthetic_config",
    "load_client_data",
    "build_model",
    "adapter_config",
    "finetune_pooled",
    "calibration_runs",
]


def synthetic_config(cfg: ExperimentConfig):
    """The :class:`~medlora_lib.data.synthetic.SynthConfig` that a config implies."""
    from medlora_lib.data.synthetic import SynthConfig

    return SynthConfig.for_profile(
        cfg.profile if cfg.profile != "paper" else "cpu",
        scale=cfg.data.scale,
        min_per_vendor=cfg.data.min_per_vendor,
        heterogeneity=cfg.data.heterogeneity,
        appearance_shift=cfg.data.appearance_shift,
        label_shift=cfg.data.label_shift,
        seed=cfg.data.synth_seed,
        image_size=tuple(cfg.data.image_size),
        spacing=tuple(cfg.data.spacing),
        val_fraction=cfg.data.val_fraction,
        test_fraction=cfg.data.test_fraction,
        crop=cfg.data.crop,
        intensity=cfg.data.intensity,
    )


def resolve_data_dir(cfg: ExperimentConfig, verbose: bool = True) -> Path:
    """The prepared data folder for ``cfg`` (generated and cached when synthetic).

    Order: ``cfg.data.data_dir``, then ``$MEDLORA_DATA_DIR``, then the synthetic data set
    of the profile under ``<cache>/data/synth-<hash>`` (made once; same parameters, same
    folder, same bytes). The folder must have been prepared as ``cfg`` says
    (:func:`check_data_matches`), and no site of the federation may have training
    subjects of one class only unless ``fed.allow_single_class``
    (:func:`medlora_lib.fl.sites.check_site_classes`).

    Raises:
        DataError: a given folder holds no ``manifest.csv``, or a single-class site.
        ConfigError: the folder was prepared otherwise (image size, crop, intensity).
    """
    given = cfg.data.data_dir or os.environ.get("MEDLORA_DATA_DIR")
    if given:
        path = Path(given).expanduser().resolve()
        if not (path / "manifest.csv").exists():
            raise DataError(
                f"{path} holds no manifest.csv; prepare real data with "
                f"`medlora prepare acdc|mnms RAW_DIR {path}` or unset MEDLORA_DATA_DIR "
                f"to use the synthetic default"
            )
        check_data_matches(cfg, path)
        _check_sites(cfg, path)
        return path
    from medlora_lib.data.synthetic import make_synthetic

    scfg = synthetic_config(cfg)
    # The cache key covers the generator's parameters *and* its code, so that a changed
    # generator never serves stale data.
    key = json.dumps(_jsonable(scfg), sort_keys=True) + _generator_fingerprint()
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    path = default_cache_dir() / "data" / f"synth-{cfg.profile}-{digest}"
    if not (path / "manifest.csv").exists():
        import fcntl

        # several processes may ask at once (the virtual SuperNodes of a first
        # `flwr run .`): one generates, the others wait and read the same folder
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{path.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (path / "manifest.csv").exists():
                t0 = time.perf_counter()
                # two processes halve the generation of a full-size set; for a small
                # set the start-up of a worker pool costs more than it saves
                workers = min(2, os.cpu_count() or 1) if scfg.scale >= 0.5 else 1
                make_synthetic(
                    path, scfg, layout="preprocessed", overwrite=True, workers=workers
                )
                if verbose:
                    print(
                        f"generated synthetic data in {path} "
                        f"({time.perf_counter() - t0:.1f} s)"
                    )
    _check_sites(cfg, path)
    return path


def _check_sites(cfg: ExperimentConfig, data_dir: Path) -> None:
    """Refuse a single-class site of ``cfg``'s federation (``fed.allow_single_class``)."""
    from medlora_lib.data.manifest import read_manifest
    from medlora_lib.fl.sites import check_site_classes, site_names

    manifest = read_manifest(data_dir, check_files=False)
    sites = [
        s
        for s in site_names(data_dir, cfg.fed.partition_by)
        if s not in cfg.fed.exclude
    ]
    check_site_classes(
        manifest, cfg.fed.partition_by, sites, cfg.fed.allow_single_class
    )


def check_data_matches(cfg: ExperimentConfig, data_dir: Path) -> None:
    """Refuse prepared data that were not prepared the way ``cfg`` says.

    Checks the image size (recorded in ``dataset.json`` or, without one, the shape of
    the first array of the manifest) and the preprocessing options ``data.crop`` and
    ``data.intensity`` recorded in ``dataset.json`` (a folder written before they were
    options was prepared with ``lv_centred`` and ``joint``).

    Raises:
        ConfigError: another image size or preprocessing option (the message names the
            field, both values and the fix).
        DataError: the first array cannot be read.
    """
    from medlora_lib.data.dataset import load_case
    from medlora_lib.data.manifest import read_dataset_info, read_manifest
    from medlora_lib.data.preprocess import normalise_preprocessing
    from medlora_lib.errors import ConfigError

    info = read_dataset_info(data_dir) or {}
    pre = normalise_preprocessing(info.get("preprocessing") or {})
    profile_data = profile_defaults(cfg.profile)["data"]
    for name in ("crop", "intensity"):
        want = getattr(cfg.data, name)
        if name in pre and pre[name] != want:
            flag = "" if profile_data.get(name) == want else f" --{name} {want}"
            raise ConfigError(
                f"{data_dir} was prepared with {name} {pre[name]!r} (dataset.json) but "
                f"config field `data.{name}` is {want!r} (profile {cfg.profile!r}); "
                f"prepare the data again: `medlora prepare acdc|mnms RAW_DIR "
                f"{data_dir} --profile {cfg.profile}{flag} --overwrite` (the second "
                f"source with --merge instead of --overwrite), or run on the data as "
                f"they are with data.{name}={pre[name]}"
            )
    size = pre.get("image_size")
    if size is None:
        first = data_dir / read_manifest(data_dir, check_files=False)["path"].iloc[0]
        size = load_case(first)[0].shape[1:]
    if tuple(size) != tuple(cfg.data.image_size):
        raise ConfigError(
            f"{data_dir} was prepared at image size {tuple(size)} but config field "
            f"`data.image_size` is {tuple(cfg.data.image_size)} (profile "
            f"{cfg.profile!r}); use the profile the data were prepared with (e.g. "
            f"`paper` for `medlora prepare ... --profile paper`) or override "
            f"data.image_size={list(size)} and data.spacing"
        )


def _generator_fingerprint() -> str:
    root = Path(__file__).resolve().parent / "data"
    h = hashlib.sha256()
    for name in (
        "synthetic.py",
        "phantom.py",
        "vendors.py",
        "preprocess.py",
        "manifest.py",
    ):
        h.update((root / name).read_bytes())
    return h.hexdigest()


def _jsonable(obj: Any) -> Any:
    from dataclasses import asdict, is_dataclass

    return json.loads(
        json.dumps(asdict(obj) if is_dataclass(obj) else obj, default=str)
    )


@dataclass
class ClientData:
    """One client's arrays: ``splits[split] = (images (N,2,H,W,D), labels (N,))``."""

    name: str
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    subjects: dict[str, list[str]] = field(default_factory=dict)

    def num_examples(self, split: str = "train") -> int:
        return int(self.splits[split][1].shape[0]) if split in self.splits else 0


ACDC_CLIENT = "ACDC"


def client_of(manifest: pd.DataFrame, clients: str = "vendor") -> pd.Series:
    """The federated client of every manifest row.

    ``vendor``: one client per vendor (the paper's setting). ``vendor+acdc``: ACDC (or
    the synthetic subjects that mimic it) as a fifth client, the rest by vendor.
    """
    if clients == "vendor":
        return manifest["vendor"].astype(str)
    if clients == "vendor+acdc":
        is_acdc = manifest["dataset"].astype(str).isin(["acdc", "synthetic-acdc"])
        return manifest["vendor"].astype(str).where(~is_acdc, ACDC_CLIENT)
    raise DataError(f"unknown client definition {clients!r}; use vendor or vendor+acdc")


def load_client_data(
    data_dir: str | Path, clients: str = "vendor"
) -> tuple[dict[str, ClientData], pd.DataFrame]:
    """Every client's train / val / test arrays, held in memory as float32 tensors.

    Args:
        data_dir: a prepared folder (``manifest.csv`` + arrays).
        clients: ``vendor`` (default) or ``vendor+acdc`` (see :func:`client_of`).

    Returns:
        ``(clients, manifest)`` with clients in the canonical vendor order (ACDC last)
        and a ``client`` column added to the manifest.

    Raises:
        DataError: the folder does not match its manifest, or a client has no
            training data.
    """
    from medlora_lib.data.dataset import load_case
    from medlora_lib.data.manifest import VENDORS, read_manifest

    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    manifest["client"] = client_of(manifest, clients)
    client_column = "client"
    names = [v for v in VENDORS if v in set(manifest[client_column])]
    names += sorted(set(manifest[client_column]) - set(names))
    out: dict[str, ClientData] = {}
    for name in names:
        cd = ClientData(name)
        for split in ("train", "val", "test"):
            rows = manifest[
                (manifest[client_column] == name) & (manifest.split == split)
            ]
            if rows.empty:
                continue
            imgs = np.stack([load_case(data_dir / p)[0] for p in rows["path"]]).astype(
                np.float32
            )
            cd.splits[split] = (
                torch.from_numpy(imgs),
                torch.as_tensor(rows["label"].to_numpy().copy(), dtype=torch.long),
            )
            cd.subjects[split] = rows["subject_id"].tolist()
        if not cd.num_examples("train"):
            raise DataError(
                f"client {name!r} has no training subjects in {data_dir / 'manifest.csv'}; "
                "re-split the data (medlora prepare ... --overwrite) or drop the client"
            )
        out[name] = cd
    return out, manifest


def build_model(cfg: ExperimentConfig, verbose: bool = False):
    """The ConvViT of ``cfg`` with its weights (``model.pretrained``).

    Returns:
        ``(model, report)``; ``report`` is the :class:`LoadReport` or None for ``none``.
    """
    from medlora_lib.models import build_convvit, load_pretrained

    model = build_convvit(
        cfg.model.size,
        image_size=tuple(cfg.data.image_size),
        in_frames=2,
        num_classes=2,
        drop_path=cfg.model.drop_path,
        **cfg.model.overrides,
    )
    report = None
    if cfg.model.pretrained != "none":
        report = load_pretrained(model, cfg.model.pretrained)
        if verbose:
            print(report)
    model.eval()
    return model, report


def adapter_config(cfg: ExperimentConfig, method: str | None = None):
    """The :class:`~medlora_lib.adapters.AdapterConfig` of ``cfg``."""
    return cfg.adapter_config(method)


def _inputs_for(model, start_block: int | None, images: torch.Tensor, batch_size: int):
    """Model inputs: the frozen-prefix cache when possible, else the raw images."""
    if start_block is None:
        return {"image": images}
    from medlora_lib.models.prefix_cache import build_prefix_cache

    cache = build_prefix_cache(model, images, start_block, batch_size=batch_size)
    return cache.as_inputs()


def finetune_pooled(
    cfg: ExperimentConfig,
    clients: dict[str, ClientData],
    epochs: int,
    seed: int | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Centralised reference: LoRA + head fine-tuned on all clients' data pooled.

    Model selection on the pooled validation split (best ``train.selection_metric``);
    the test split is touched once, at the end.

    Returns:
        ``{"history": DataFrame, "test": per-client + pooled metrics DataFrame,
        "best_epoch": int, "seconds": float}``.
    """
    from medlora_lib.adapters import apply_adapters, first_adapted_block
    from medlora_lib.metrics import binary_metrics
    from medlora_lib.train import fit, predict_proba, resolve_device, seed_everything

    seed = cfg.seed if seed is None else seed
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    seed_everything(seed)
    t0 = time.perf_counter()
    model, _ = build_model(cfg)
    acfg = adapter_config(cfg, "centralized")
    model = apply_adapters(model, acfg, "centralized", seed=seed)
    device = resolve_device(cfg.train.device)
    from medlora_lib.recipe import BatchAugmenter, set_grad_checkpointing

    start = first_adapted_block(acfg, model) if cfg.uses_prefix_cache else None
    set_grad_checkpointing(model, cfg.train.grad_checkpointing)
    augment = None
    if cfg.data.augment:
        augment = BatchAugmenter(cfg.data.spacing)
        augment.seed(seed)

    def pooled(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [c.splits[split] for c in clients.values() if split in c.splits]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    xtr, ytr = pooled("train")
    xva, yva = pooled("val")
    model.eval()
    tr_in = _inputs_for(model, start, xtr, cfg.train.batch_size)
    va_in = _inputs_for(model, start, xva, cfg.train.batch_size)
    model.to(device)

    def forward(batch):
        if start is None:
            return model(batch["image"])
        return model.forward_suffix(batch, start)

    res = fit(
        forward,
        model,
        (tr_in, ytr),
        (va_in, yva),
        cfg.train,
        epochs=epochs,
        seed=seed,
        device=device,
        augment=augment,
        on_epoch=(
            lambda r: print(
                f"epoch {r['epoch']:3d}  loss {r['train_loss']:.4f}  "
                f"val BA {r['val_balanced_accuracy']:.3f}"
            )
        )
        if verbose
        else None,
    )
    rows, all_y, all_p = [], [], []
    for name, c in clients.items():
        if "test" not in c.splits:
            continue
        xte, yte = c.splits["test"]
        prob = predict_proba(forward, _inputs_for(model, start, xte, 64), device=device)
        rows.append({"client": name, **binary_metrics(yte.numpy(), prob)})
        all_y.append(yte.numpy())
        all_p.append(prob)
    rows.append(
        {
            "client": "pooled",
            **binary_metrics(np.concatenate(all_y), np.concatenate(all_p)),
        }
    )
    return {
        "history": pd.DataFrame(res.history),
        "test": pd.DataFrame(rows),
        "best_epoch": res.best_epoch,
        "seconds": time.perf_counter() - t0,
        "y_true": np.concatenate(all_y),
        "prob": np.concatenate(all_p),
    }


def calibration_runs(
    cfg: ExperimentConfig,
    clients: dict[str, ClientData],
    epochs: int,
    seeds: Any,
    max_parallel: int | None = None,
) -> Any:
    """Chapter ``01_data_and_vendor_heterogeneity``'s centralised reference:
    :func:`finetune_pooled` once per seed, in worker processes where the cores allow
    (the rule of :func:`medlora_lib.fl.simulate.worker_count`: ``cpu``-profile runs on a
    CPU; ``max_parallel=1`` keeps them in this process). Each run seeds itself and sets
    its own thread count, so the numbers do not depend on where it ran (tested).

    Returns:
        One row per seed: ``seed``, ``best epoch``, the pooled test split's
        ``balanced_accuracy``, ``sensitivity``, ``specificity`` and ``auc``, and
        ``seconds`` (the fine-tuning's own).
    """
    from medlora_lib.fl.simulate import map_in_workers, worker_count

    seeds = [int(s) for s in seeds]
    workers = worker_count([cfg] * len(seeds), max_parallel)
    results = map_in_workers(
        "medlora_lib.pipeline:finetune_pooled",
        [(cfg, clients, epochs, s, False) for s in seeds],
        workers,
    )
    rows = []
    for s, res in zip(seeds, results, strict=True):
        pooled = res["test"].set_index("client").loc["pooled"]
        rows.append(
            {
                "seed": s,
                "best epoch": res["best_epoch"],
                **{
                    k: pooled[k]
                    for k in ("balanced_accuracy", "sensitivity", "specificity", "auc")
                },
                "seconds": res["seconds"],
            }
        )
    return pd.DataFrame(rows)
