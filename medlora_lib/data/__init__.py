"""Data: real-data loaders (ACDC, M&Ms-1, M&Ms-2), CineMA-style preprocessing, the
prepared-folder manifest and splits, and torch datasets. Explained in
``notebooks/01_data_and_vendor_heterogeneity``.

``make_synthetic`` and ``SynthConfig`` come from :mod:`medlora_lib.data.synthetic` and are
imported lazily.
"""

from __future__ import annotations

from medlora_lib.data.acdc import AcdcSubject, prepare_acdc, scan_acdc
from medlora_lib.data.dataset import CineDataset, load_arrays, load_case
from medlora_lib.data.manifest import (
    MANIFEST_COLUMNS,
    SPLITS,
    VENDORS,
    PreparedRecord,
    assign_splits,
    normalise_vendor,
    pathology_to_label,
    read_dataset_info,
    read_manifest,
    write_prepared_dataset,
)
from medlora_lib.data.mnms import MnmsSubject, prepare_mnms, scan_mnms
from medlora_lib.data.mnms2 import Mnms2Subject, prepare_mnms2, scan_mnms2
from medlora_lib.data.nifti import load_nifti
from medlora_lib.data.preprocess import preprocess_case, preprocessing_params

__all__ = [
    "AcdcSubject",
    "CineDataset",
    "MANIFEST_COLUMNS",
    "MnmsSubject",
    "Mnms2Subject",
    "PreparedRecord",
    "SPLITS",
    "SynthConfig",
    "VENDORS",
    "assign_splits",
    "load_arrays",
    "load_case",
    "load_nifti",
    "make_synthetic",
    "normalise_vendor",
    "pathology_to_label",
    "prepare_acdc",
    "prepare_mnms",
    "prepare_mnms2",
    "preprocess_case",
    "preprocessing_params",
    "read_dataset_info",
    "read_manifest",
    "scan_acdc",
    "scan_mnms",
    "scan_mnms2",
    "write_prepared_dataset",
]

_LAZY = {"make_synthetic", "SynthConfig"}


def __getattr__(name: str):
    """Import the synthetic generator only when it is asked for (it is optional here)."""
    if name in _LAZY:
        from medlora_lib.data import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module 'medlora_lib.data' has no attribute {name!r}")
