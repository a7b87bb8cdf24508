"""Sites, not vendors: which subjects a federated client holds (chapter ``book/deployment.md``).

A *site* is one hospital's prepared folder. In a deployment every SuperNode names its own
folder in its node config (``data-path=…``) and that folder holds only its subjects. In
the Simulation Runtime one prepared folder is partitioned into sites by
``fed.partition_by``:

* ``vendor`` — one site per scanner vendor (the paper's setting);
* ``centre`` — one site per acquiring centre, named ``<vendor>-<centre>`` (M&Ms has two
  Philips hospitals, for example);
* ``vendor+acdc`` — one site per vendor, with ACDC (or the synthetic subjects that mimic
  it) as its own site named ``ACDC``.

Sites are ordered canonically (vendors in :data:`~medlora_lib.data.manifest.VENDORS`
order, then the rest sorted), so a simulated SuperNode with ``partition-id`` *i* is always
the same site. :func:`load_site` reads **only** that site's arrays.

A site whose training subjects are all of one class (a vendor of the real M&Ms download
may have only diseased subjects) is refused by :func:`check_site_classes` unless
``fed.allow_single_class``: ``medlora prepare`` writes such data with a warning, because
whether a vendor is a site depends on the federation, not on the data.

:func:`split_into_sites` writes one folder per site from a prepared folder (links, not
copies, where the file system allows): what each hospital of a loopback deployment, or a
hospital engineer preparing a shared download, hands to its SuperNode.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medlora_lib.errors import ConfigError, DataError

__all__ = [
    "PARTITIONS",
    "ACDC_SITE",
    "site_of",
    "site_names",
    "load_site",
    "load_sites",
    "load_options",
    "check_site_classes",
    "folder_site",
    "split_into_sites",
]

PARTITIONS = ("vendor", "centre", "vendor+acdc")
ACDC_SITE = "ACDC"


def site_of(manifest: pd.DataFrame, partition_by: str = "vendor") -> pd.Series:
    """The site of every manifest row under ``partition_by``."""
    vendor = manifest["vendor"].astype(str)
    if partition_by == "vendor":
        return vendor
    if partition_by == "centre":
        return vendor + "-" + manifest["centre"].astype(str)
    if partition_by == "vendor+acdc":
        is_acdc = manifest["dataset"].astype(str).isin(["acdc", "synthetic-acdc"])
        return vendor.where(~is_acdc, ACDC_SITE)
    raise ConfigError(
        f"config field `fed.partition_by`: unknown value {partition_by!r}; choose one "
        f"of {', '.join(PARTITIONS)}"
    )


def _ordered(names: set[str]) -> list[str]:
    from medlora_lib.data.manifest import VENDORS

    def key(n: str) -> tuple[int, str]:
        head = n.split("-", 1)[0]
        return (VENDORS.index(head) if head in VENDORS else len(VENDORS), n)

    return sorted(names, key=key)


def site_names(data_dir: str | Path, partition_by: str = "vendor") -> list[str]:
    """The sites of a prepared folder in canonical order."""
    from medlora_lib.data.manifest import read_manifest

    manifest = read_manifest(data_dir, check_files=False)
    return _ordered(set(site_of(manifest, partition_by)))


def check_site_classes(
    manifest: pd.DataFrame,
    partition_by: str = "vendor",
    sites: list[str] | None = None,
    allow_single_class: bool = False,
) -> list[str]:
    """The sites whose training subjects are all of one class; refused unless allowed.

    Args:
        manifest: a prepared folder's manifest (``read_manifest``).
        partition_by: ``fed.partition_by``.
        sites: the sites to check (default: all of the manifest's).
        allow_single_class: ``fed.allow_single_class``: only warn.

    Returns:
        The single-class sites (empty when there is none).

    Raises:
        DataError: a single-class site and ``allow_single_class`` is False (the message
            names the site, its counts and the two ways on).
    """
    import warnings

    from medlora_lib.errors import DataWarning

    names = site_of(manifest, partition_by)
    train = manifest["split"] == "train"
    where = manifest.attrs.get("data_dir", "the prepared folder")
    found = []
    for site in sites if sites is not None else _ordered(set(names)):
        labels = manifest.loc[(names == site) & train, "label"].astype(int)
        if labels.empty or labels.nunique() > 1:
            continue  # no training subject at all is reported by the callers
        found.append(site)
        n = int(labels.size)
        text = (
            f"site {site!r} (fed.partition_by={partition_by!r}) in {where} has "
            f"{n if labels.iloc[0] == 0 else 0} healthy and "
            f"{n if labels.iloc[0] == 1 else 0} diseased training subjects: one class "
            "only, so its model cannot learn the other and its specificity or "
            "sensitivity is undefined"
        )
        if not allow_single_class:
            raise DataError(
                f"{text}. Let it take part anyway with fed.allow_single_class=true "
                f"(--set fed.allow_single_class=true, or --run-config "
                f"'fed.allow-single-class=true'), leave it out with "
                f"fed.exclude={site}, or add subjects of the other class "
                "(medlora prepare ... --merge)"
            )
        warnings.warn(f"{text} (fed.allow_single_class=true)", DataWarning, 2)
    return found


def _load_rows(data_dir: Path, rows: pd.DataFrame, name: str):
    from medlora_lib.pipeline import ClientData

    cd = ClientData(name)
    for split in ("train", "val", "test"):
        part = rows[rows["split"] == split]
        if part.empty:
            continue
        arrays = []
        for p in part["path"]:
            try:
                arrays.append(np.load(data_dir / p)["image"])
            except Exception as exc:  # corrupt, truncated or missing array
                raise DataError(
                    f"{data_dir / p}: cannot read the `image` array ({exc}); "
                    "prepare the folder again (medlora prepare ... --overwrite)"
                ) from exc
        cd.splits[split] = (
            torch.from_numpy(np.stack(arrays).astype(np.float32)),
            torch.as_tensor(part["label"].to_numpy().copy(), dtype=torch.long),
        )
        cd.subjects[split] = part["subject_id"].tolist()
    return cd


def load_site(
    data_dir: str | Path,
    site: str,
    partition_by: str = "vendor",
    image_size: tuple[int, int, int] | None = None,
    *,
    allow_single_class: bool = True,
    resplit: tuple[int, float, float] | None = None,
):
    """One site's train / val / test arrays (and only that site's).

    Args:
        data_dir: a prepared folder (``manifest.csv`` + arrays).
        site: the site's name (see :func:`site_names`).
        partition_by: ``fed.partition_by``.
        image_size: when given, every array must have this ``(H, W, D)``.
        allow_single_class: ``fed.allow_single_class``; False refuses a site whose
            training subjects are of one class (:func:`check_site_classes`). True by
            default for callers that checked the whole folder already
            (:func:`medlora_lib.pipeline.resolve_data_dir` does).
        resplit: ``(seed, val_fraction, test_fraction)``: draw this site's own
            stratified split (:func:`~medlora_lib.data.manifest.assign_splits`)
            instead of the folder's (``data.split="per_seed"``, see
            :func:`load_options`). ``None``: the prepared folder's split.

    Returns:
        A :class:`~medlora_lib.pipeline.ClientData`.

    Raises:
        DataError: the site is not in the folder, has no training subjects, or holds
            arrays of another image size (the message names the folder and the fix).
    """
    from medlora_lib.data.manifest import read_manifest

    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    names = site_of(manifest, partition_by)
    rows = manifest[names == site]
    if rows.empty:
        raise DataError(
            f"{data_dir / 'manifest.csv'} holds no subject of site {site!r} "
            f"(fed.partition_by={partition_by!r}; its sites: "
            f"{', '.join(_ordered(set(names))) or 'none'})"
        )
    if resplit is not None:
        rows = _resplit(rows, site, *resplit)
    cd = _load_rows(data_dir, rows, site)
    if not cd.num_examples("train"):
        raise DataError(
            f"site {site!r} has no training subjects in {data_dir / 'manifest.csv'} "
            f"(its splits: {sorted(cd.splits) or 'none'}); re-split the data "
            "(medlora prepare ... --overwrite) or leave the site out with fed.exclude"
        )
    if not allow_single_class:
        check_site_classes(manifest, partition_by, [site])
    if image_size is not None:
        want = (2, *image_size)
        for split, (x, _) in cd.splits.items():
            if tuple(x.shape[1:]) != want:
                raise DataError(
                    f"{data_dir}: site {site} split {split} holds images of shape "
                    f"{tuple(x.shape[1:])} but the run expects {want} "
                    f"(data.image_size={list(image_size)}); prepare the data with the "
                    "profile the federation runs or set data.image_size to match"
                )
    return cd


def load_sites(
    data_dir: str | Path,
    sites: list[str],
    partition_by: str = "vendor",
    image_size: tuple[int, int, int] | None = None,
    *,
    allow_single_class: bool = True,
    resplit: tuple[int, float, float] | None = None,
) -> dict:
    """:func:`load_site` for several sites of one folder (in-process runs)."""
    return {
        s: load_site(
            data_dir,
            s,
            partition_by,
            image_size,
            allow_single_class=allow_single_class,
            resplit=resplit,
        )
        for s in sites
    }


def load_options(cfg: Any) -> dict[str, Any]:
    """The :func:`load_site` arguments of an experiment: partition, image size and —
    with ``data.split="per_seed"`` — the replicate's own split, seeded by ``cfg.seed``
    (chapters ``03_fedavg_lora`` to ``07``: what a replicate varies)."""
    return {
        "partition_by": cfg.fed.partition_by,
        "image_size": tuple(cfg.data.image_size),
        "resplit": (
            (int(cfg.seed), cfg.data.val_fraction, cfg.data.test_fraction)
            if cfg.data.split == "per_seed"
            else None
        ),
    }


def _resplit(
    rows: pd.DataFrame, site: str, seed: int, val_fraction: float, test_fraction: float
) -> pd.DataFrame:
    """``rows`` (one site) with a fresh stratified split drawn with ``seed``."""
    import warnings

    from medlora_lib.data.manifest import assign_splits
    from medlora_lib.errors import DataWarning

    with warnings.catch_warnings():
        # a single-class site was refused or allowed (and said so) by check_site_classes
        warnings.simplefilter("ignore", DataWarning)
        return assign_splits(
            rows.assign(_site=site),
            val_fraction,
            test_fraction,
            seed=seed,
            client_column="_site",
            allow_single_class=True,
        ).drop(columns="_site")


def folder_site(data_dir: str | Path, partition_by: str = "vendor") -> str:
    """The one site a SuperNode's ``data-path`` holds.

    Raises:
        DataError: the folder holds several sites (or none).
    """
    names = site_names(data_dir, partition_by)
    if len(names) != 1:
        raise DataError(
            f"{Path(data_dir) / 'manifest.csv'} holds {len(names)} sites "
            f"({', '.join(names) or 'none'}) under fed.partition_by={partition_by!r}; "
            "a SuperNode's data-path must hold one site only: split the folder with "
            "`medlora split-sites DATA OUT` and give each SuperNode its own folder"
        )
    return names[0]


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def split_into_sites(
    data_dir: str | Path,
    out_dir: str | Path,
    partition_by: str = "vendor",
    sites: list[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write one prepared folder per site of ``data_dir`` under ``out_dir/<site>``.

    Each folder holds the site's rows of ``manifest.csv``, its arrays (hard links when
    possible) and a copy of ``dataset.json``. Written atomically (a temporary folder
    renamed into place); an existing site folder is replaced only with ``overwrite``.

    Returns:
        ``{site: folder}`` in canonical order.

    Raises:
        DataError: an existing folder without ``overwrite``, or an unknown site.
    """
    from medlora_lib.data.manifest import read_manifest

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    manifest = read_manifest(data_dir)
    names = site_of(manifest, partition_by)
    wanted = sites or _ordered(set(names))
    unknown = [s for s in wanted if s not in set(names)]
    if unknown:
        raise DataError(
            f"{data_dir}: no site {unknown} under fed.partition_by={partition_by!r} "
            f"(sites: {', '.join(_ordered(set(names)))})"
        )
    out: dict[str, Path] = {}
    for site in wanted:
        dst = out_dir / site
        if dst.exists() and not overwrite:
            raise DataError(
                f"{dst} exists; pass overwrite=True (--overwrite) to replace it"
            )
        tmp = out_dir / f".{site}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        rows = manifest[names == site]
        for p in rows["path"]:
            _link_or_copy(data_dir / p, tmp / p)
        rows.to_csv(tmp / "manifest.csv", index=False)
        if (data_dir / "dataset.json").exists():
            shutil.copy2(data_dir / "dataset.json", tmp / "dataset.json")
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
        out[site] = dst
    return out
