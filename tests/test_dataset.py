"""CineDataset / load_arrays on a tiny prepared folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medlora_lib.data.dataset import CineDataset, load_arrays
from medlora_lib.data.manifest import (
    PreparedRecord,
    read_manifest,
    write_prepared_dataset,
)
from medlora_lib.data.preprocess import preprocessing_params
from medlora_lib.errors import DataError

SIZE = (16, 16, 4)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    records = []
    for vendor in ("Siemens", "Philips", "GE"):
        for i in range(8):
            image = np.zeros((2, *SIZE), np.float32)
            image[:, 4:12, 4:12, :] = rng.uniform(0.3, 1.0)
            records.append(
                PreparedRecord(
                    subject_id=f"{vendor}_{i}",
                    dataset="t",
                    vendor=vendor,
                    centre="c",
                    pathology="NOR" if i < 3 else "DCM",
                    label=int(i >= 3),
                    image=image,
                    seg=np.zeros((2, *SIZE), np.uint8),
                )
            )
    info = {
        "preprocessing": preprocessing_params((3, 3, 10), SIZE),
        "sources": ["t"],
        "split": {"val_fraction": 0.2, "test_fraction": 0.2, "seed": 0},
    }
    return write_prepared_dataset(tmp_path_factory.mktemp("d") / "out", records, info)


def test_item_types_and_shapes(data_dir):
    ds = CineDataset(data_dir)
    assert len(ds) == 24
    item = ds[0]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (2, *SIZE)
    assert item["label"].dtype == torch.long and item["label"].ndim == 0
    assert isinstance(item["vendor"], str) and isinstance(item["subject_id"], str)
    assert ds.labels.dtype == np.int64


def test_filters(data_dir):
    train = CineDataset(data_dir, split="train", vendor="PHILIPS")
    df = read_manifest(data_dir)
    expected = df[(df["split"] == "train") & (df["vendor"] == "Philips")]
    assert sorted(train.manifest["subject_id"]) == sorted(expected["subject_id"])
    assert (
        len(CineDataset(data_dir, split=["val", "test"]))
        == (df["split"] != "train").sum()
    )
    with pytest.raises(DataError, match="unknown split"):
        CineDataset(data_dir, split="holdout")
    with pytest.raises(DataError, match="no subjects.*Canon"):
        CineDataset(data_dir, vendor="Canon")


def test_dataframe_input_and_no_cache(data_dir):
    df = read_manifest(data_dir)
    a = CineDataset(df[df["vendor"] == "GE"], cache=False)
    b = CineDataset(data_dir, vendor="GE")
    assert torch.equal(a[2]["image"], b[2]["image"])


def test_augmentation_deterministic_and_in_range(data_dir):
    a = CineDataset(data_dir, augment=True, seed=5)
    b = CineDataset(data_dir, augment=True, seed=5)
    plain = CineDataset(data_dir)
    xa = torch.stack([a[i]["image"] for i in range(6)])
    xb = torch.stack([b[i]["image"] for i in range(6)])
    assert torch.equal(xa, xb)
    assert xa.min() >= 0.0 and xa.max() <= 1.0
    assert type(a[0]["image"]) is torch.Tensor  # plain tensor, not a MONAI MetaTensor
    assert not torch.equal(xa, torch.stack([plain[i]["image"] for i in range(6)]))
    a.set_epoch(1)
    assert not torch.equal(xa, torch.stack([a[i]["image"] for i in range(6)]))
    # the cached array is not modified by augmentation
    assert torch.equal(
        plain[0]["image"], CineDataset(data_dir, cache=False)[0]["image"]
    )


def test_load_arrays(data_dir):
    images, labels = load_arrays(data_dir)
    assert images.shape == (24, 2, *SIZE) and images.dtype == np.float32
    assert labels.dtype == np.int64 and labels.sum() == 15
    df = read_manifest(data_dir)
    sub = df[df["split"] == "test"]
    images, labels = load_arrays(None, sub)
    assert images.shape[0] == len(sub)


def test_dataloader_batches(data_dir):
    loader = torch.utils.data.DataLoader(
        CineDataset(data_dir, augment=True), batch_size=4
    )
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 2, *SIZE) and batch["label"].shape == (4,)
    assert len(batch["vendor"]) == 4
