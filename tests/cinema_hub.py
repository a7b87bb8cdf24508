"""A Hugging Face cache laid out offline, holding a formula CineMA checkpoint.

``write_hf_cache`` writes what ``huggingface_hub.hf_hub_download`` finds in a real cache
after a download of ``pretrained/cinema.safetensors`` from ``mathpluscode/CineMA``:
``models--mathpluscode--CineMA/{blobs/<sha256>, snapshots/<rev>/pretrained/
cinema.safetensors -> ../../../blobs/<sha256>, refs/main}``. The checkpoint's keys and
shapes are CineMA's MAE (the 603 rows of ``cinema_mae_pretrain_state_dict.tsv``); its
values come from the closed-form recipe of the golden forward (section 9 of the
checkpoint-format reference), so the ~500 MB file is produced at test time, not stored.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

FIX = Path(__file__).parent / "fixtures" / "cinema"
MAE_TSV = FIX / "cinema_mae_pretrain_state_dict.tsv"
REPO_FOLDER = "models--mathpluscode--CineMA"
FILENAME = "pretrained/cinema.safetensors"
#: a made-up commit of the hub repo (any 40 hex digits)
REVISION = "0123456789abcdef0123456789abcdef01234567"


def formula_tensor(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The golden-forward recipe's value of ``key``: LayerNorm gammas ``1 + 0.1·base``,
    biases and the CLS token ``0.02·base``, the rest ``base·sqrt(2 / fan_in)``, with
    ``base[i] = sin(0.618034·i + phase(crc32(key)))``."""
    n = int(np.prod(shape))
    phase = (zlib.crc32(key.encode("utf-8")) % 10007) / 10007 * 2 * np.pi
    base = np.sin(0.618034 * np.arange(n, dtype=np.float64) + phase)
    if len(shape) == 1 and key.endswith(".weight"):
        val = 1 + 0.1 * base
    elif key.endswith(".bias") or key == "encoder.cls_token":
        val = 0.02 * base
    else:
        val = base * np.sqrt(2.0 / (n / shape[0]))
    return torch.from_numpy(val.astype(np.float32).reshape(shape))


def cinema_mae_shapes() -> dict[str, tuple[int, ...]]:
    """CineMA's MAE state dict: key -> shape, in its real order (603 keys)."""
    with open(MAE_TSV, newline="") as f:
        return {
            r["key"]: tuple(json.loads(r["shape"]))
            for r in csv.DictReader(f, delimiter="\t")
        }


def formula_mae_state() -> dict[str, torch.Tensor]:
    """The formula checkpoint with CineMA's real MAE keys and shapes (~503 MB fp32)."""
    return {k: formula_tensor(k, s) for k, s in cinema_mae_shapes().items()}


def write_hf_cache(
    hub_cache: Path, state: dict[str, torch.Tensor], revision: str = REVISION
) -> Path:
    """Write ``state`` as ``pretrained/cinema.safetensors`` of ``mathpluscode/CineMA``
    into the HF hub cache folder ``hub_cache`` (``$HF_HOME/hub``); return the snapshot
    file's path."""
    repo = Path(hub_cache) / REPO_FOLDER
    tmp = repo / "blobs" / "incoming.safetensors"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    h = hashlib.sha256()
    with open(tmp, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    blob = tmp.with_name(h.hexdigest())
    tmp.replace(blob)
    snap = repo / "snapshots" / revision / FILENAME
    snap.parent.mkdir(parents=True, exist_ok=True)
    if snap.is_symlink() or snap.exists():
        snap.unlink()
    os.symlink(os.path.relpath(blob, snap.parent), snap)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snap
