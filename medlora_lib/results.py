"""Provenance and tidy result files: every result records config, seed, commit, versions.

Explained in the book: ``book/reproducibility.md``.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["provenance", "write_json", "read_json", "write_table", "read_table"]

_PACKAGES = (
    "medlora",
    "torch",
    "flwr",
    "peft",
    "monai",
    "nibabel",
    "numpy",
    "scikit-learn",
    "scipy",
    "pandas",
    "safetensors",
)


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Git commit and dirty flag, package versions, device and time of this process."""
    root = Path(__file__).resolve().parent.parent
    commit = _git(["rev-parse", "HEAD"], root)
    status = _git(["status", "--porcelain", "--untracked-files=no"], root)
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    device = "cpu"
    try:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{torch.cuda.get_device_name(0)}"
        threads = torch.get_num_threads()
    except Exception:  # pragma: no cover - torch always present in practice
        threads = None
    info = {
        "git_commit": commit,
        "git_dirty": bool(status) if status is not None else None,
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "torch_threads": threads,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    if extra:
        info.update(extra)
    return info


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as pretty JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)
    return path


def read_json(path: str | Path) -> Any:
    """Read a JSON file written by :func:`write_json`."""
    return json.loads(Path(path).read_text())


def write_table(path: str | Path, df: pd.DataFrame) -> Path:
    """Write a tidy table as CSV atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(path)
    return path


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a tidy CSV table."""
    return pd.read_csv(path)
