"""Torch access to a prepared data folder: :class:`CineDataset` and :func:`load_arrays`.

Training augmentation follows the spirit of CineMA's fine-tuning recipe with MONAI
transforms: a small random in-plane affine (rotation, scale, translation), random gamma
contrast, and Gaussian noise, then clipping back to [0, 1]. It is deterministic given
``seed``: item ``i`` in epoch ``e`` is augmented with a generator seeded by
``(seed, e, i)`` (call :meth:`CineDataset.set_epoch` each epoch for new draws), so results
do not depend on worker count or iteration order. Explained in
``notebooks/01_data_and_vendor_heterogeneity`` and ``02_single_site_baseline``.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from medlora_lib.data.manifest import SPLITS, VENDORS, normalise_vendor, read_manifest
from medlora_lib.errors import DataError

if TYPE_CHECKING:  # MONAI is imported where a transform is built: ~10 s per process
    from monai.transforms import Compose

__all__ = ["CineDataset", "load_arrays", "load_case", "make_augmentation"]


def load_case(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(image float32 (2,H,W,D), label uint8 (2,H,W,D))`` from one ``.npz`` file.

    Raises:
        DataError: the file is missing, truncated or corrupt (a partly copied or
            interrupted download of a prepared folder); the message names the file.
    """
    try:
        with np.load(path) as z:
            return z["image"].astype(np.float32, copy=False), z["label"].astype(
                np.uint8
            )
    except (
        OSError,
        KeyError,
        ValueError,
        EOFError,
        zipfile.BadZipFile,
        zlib.error,
    ) as exc:
        raise DataError(
            f"cannot read prepared array `{path}` ({type(exc).__name__}: {exc}): the "
            "file is missing, truncated or corrupt. Re-run the `medlora prepare` (or "
            "`medlora synth`) that wrote this folder: with the same settings it "
            "rebuilds the folder in place; or restore the file from a good copy."
        ) from exc


def _resolve_dir(data_dir: str | Path | None, manifest: pd.DataFrame) -> Path:
    if data_dir is not None:
        return Path(data_dir)
    if "data_dir" in manifest.attrs:
        return Path(manifest.attrs["data_dir"])
    raise DataError(
        "the manifest DataFrame does not say which folder it belongs to; pass "
        "data_dir= (or read it with medlora_lib.data.read_manifest)."
    )


def load_arrays(
    data_dir: str | Path | None, manifest: pd.DataFrame | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load every case of ``manifest`` (rows in order) into memory.

    Args:
        data_dir: the prepared folder (paths in the manifest are relative to it); may be
            None when ``manifest`` came from :func:`read_manifest`.
        manifest: rows to load; the whole ``data_dir/manifest.csv`` when None.

    Returns:
        ``(images float32 (N, 2, H, W, D), labels int64 (N,))``.
    """
    if manifest is None:
        if data_dir is None:
            raise DataError("load_arrays needs data_dir or a manifest.")
        manifest = read_manifest(data_dir)
    root = _resolve_dir(data_dir, manifest)
    images = [load_case(root / p)[0] for p in manifest["path"]]
    if not images:
        return np.zeros((0, 2, 1, 1, 1), np.float32), np.zeros((0,), np.int64)
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise DataError(f"cases in `{root}` have different shapes {sorted(shapes)}.")
    return np.stack(images), manifest["label"].to_numpy(dtype=np.int64)


def make_augmentation(spacing: Sequence[float] = (1.0, 1.0, 10.0)) -> Compose:
    """The training augmentation (MONAI), for ``(2, H, W, D)`` images in [0, 1]:
    CineMA's (:func:`medlora_lib.recipe.make_augmentation`; translation in mm, converted
    with the data's ``spacing``)."""
    from medlora_lib.recipe import make_augmentation as cinema_augmentation

    return cinema_augmentation(spacing)


class CineDataset(Dataset):
    """Prepared cine cases as a torch Dataset.

    Each item is ``{"image": float32 (2,H,W,D), "label": long scalar, "vendor": str,
    "subject_id": str}``.

    Args:
        data: a prepared folder, or a manifest DataFrame (from :func:`read_manifest`, or
            with ``data_dir=``).
        split: keep only ``train`` / ``val`` / ``test`` (or a list of them); all if None.
        vendor: keep only this vendor (or list; any accepted spelling); all if None.
        augment: apply :func:`make_augmentation` (training only).
        seed: augmentation seed.
        spacing: voxel spacing of the prepared data in mm (the augmentation's
            translation range is 60 mm); the `paper` profile's by default.
        cache: hold all arrays in memory after the first load (loaded once, up front).
        data_dir: folder for a DataFrame without ``attrs["data_dir"]``.

    Raises:
        DataError: unknown split / vendor, or no subject left after filtering.
    """

    def __init__(
        self,
        data: str | Path | pd.DataFrame,
        split: str | Sequence[str] | None = None,
        vendor: str | Sequence[str] | None = None,
        augment: bool = False,
        seed: int = 0,
        cache: bool = True,
        *,
        data_dir: str | Path | None = None,
        spacing: Sequence[float] = (1.0, 1.0, 10.0),
    ) -> None:
        if isinstance(data, pd.DataFrame):
            df = data
            root = _resolve_dir(data_dir, df)
        else:
            root = Path(data)
            df = read_manifest(root)
        present = sorted(set(df["vendor"]), key=lambda v: VENDORS.index(v))
        if split is not None:
            splits = [split] if isinstance(split, str) else list(split)
            bad = [s for s in splits if s not in SPLITS]
            if bad:
                raise DataError(f"unknown split(s) {bad}; use {list(SPLITS)}.")
            df = df[df["split"].isin(splits)]
        if vendor is not None:
            vendors = [vendor] if isinstance(vendor, str) else list(vendor)
            vendors = [normalise_vendor(v) for v in vendors]
            df = df[df["vendor"].isin(vendors)]
        if df.empty:
            raise DataError(
                f"no subjects in `{root}` for split={split!r}, vendor={vendor!r}; "
                f"vendors present: {present}."
            )
        self.root = root
        self.manifest = df.reset_index(drop=True)
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0
        self._transform = make_augmentation(spacing) if augment else None
        self._paths = [root / p for p in self.manifest["path"]]
        self._labels = self.manifest["label"].to_numpy(dtype=np.int64)
        self._cache: np.ndarray | None = None
        if cache:
            self._cache = load_arrays(root, self.manifest)[0]

    def __len__(self) -> int:
        return len(self.manifest)

    @property
    def labels(self) -> np.ndarray:
        """Binary labels of the items, in order (int64)."""
        return self._labels

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation draws (deterministic per ``(seed, epoch, index)``)."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict:
        if self._cache is not None:
            image = self._cache[index]
        else:
            image = load_case(self._paths[index])[0]
        tensor = torch.from_numpy(np.array(image, dtype=np.float32, copy=True))
        if self._transform is not None:
            rng = np.random.default_rng([self.seed, self.epoch, int(index)])
            self._transform.set_random_state(seed=int(rng.integers(2**31 - 1)))
            tensor = self._transform(tensor)
            tensor = torch.as_tensor(tensor, dtype=torch.float32).clamp_(0.0, 1.0)
            if hasattr(tensor, "as_tensor"):
                tensor = tensor.as_tensor()
        row = self.manifest.iloc[index]
        return {
            "image": tensor,
            "label": torch.tensor(int(self._labels[index]), dtype=torch.long),
            "vendor": str(row["vendor"]),
            "subject_id": str(row["subject_id"]),
        }
