"""The server's per-round checkpoint and resume (chapter ``book/deployment.md``).

After every completed round the ServerApp writes, atomically, under its run folder::

    <run.dir>/checkpoint/round-0007/shared.safetensors   the global shared state
    <run.dir>/checkpoint/round-0007/state.json           round, run key, config,
                                                         per-round per-site rows,
                                                         failures, message log

and keeps the last two rounds. A run whose ServerApp or SuperLink died continues from
the last completed round (``run.resume=auto``, the default, or ``require``); the result
equals an uninterrupted run with the same seed. Resuming with another configuration is
refused with the first differing key (:data:`~medlora_lib.config.OPERATIONAL_KEYS` such
as ``fed.round_timeout`` may change).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medlora_lib.config import OPERATIONAL_KEYS
from medlora_lib.errors import ConfigError, DataError
from medlora_lib.fl.site_state import atomic_write_tensors, read_tensors, swap_dir

__all__ = [
    "Checkpoint",
    "first_difference",
    "comparable_config",
    "save_checkpoint",
    "load_checkpoint",
]

_ROUND_RE = re.compile(r"^round-(\d{4,})$")
KEEP = 2


def comparable_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (``ExperimentConfig.to_dict()``) without the operational keys.

    The dictionary is read back through :class:`ExperimentConfig` first, so a config
    saved before a field existed compares equal to one holding that field's default.
    """
    from medlora_lib.config import ExperimentConfig
    from medlora_lib.errors import ConfigError

    try:
        d = ExperimentConfig.from_dict(config).to_dict()
    except (ConfigError, TypeError, ValueError):
        d = json.loads(json.dumps(config))
    for key in OPERATIONAL_KEYS:
        section, name = key.split(".")
        d.get(section, {}).pop(name, None)
    return d


def first_difference(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> str:
    """The first dotted key (sorted order) whose value differs between ``a`` and ``b``."""
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        va, vb = a.get(k, "<missing>"), b.get(k, "<missing>")
        if isinstance(va, dict) and isinstance(vb, dict):
            sub = first_difference(va, vb, key + ".")
            if sub:
                return sub
        elif va != vb:
            return f"{key}: {va!r} in the checkpoint, {vb!r} now"
    return ""


@dataclass
class Checkpoint:
    """What a run needs to continue after round ``round``."""

    round: int
    run_key: str
    config: dict[str, Any]
    shared: dict[str, torch.Tensor]
    rows: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def _dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoint"


def save_checkpoint(run_dir: str | Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` atomically; keep the last two rounds."""
    root = _dir(Path(run_dir))
    root.mkdir(parents=True, exist_ok=True)
    dst = root / f"round-{ckpt.round:04d}"
    tmp = root / f".round-{ckpt.round:04d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    atomic_write_tensors(tmp / "shared.safetensors", ckpt.shared)
    state = {
        "round": ckpt.round,
        "run_key": ckpt.run_key,
        "config": ckpt.config,
        "rows": ckpt.rows,
        "failures": ckpt.failures,
        "messages": ckpt.messages,
        "extra": ckpt.extra,
    }
    text = json.dumps(state, default=float)
    (tmp / ".state.json.tmp").write_text(text)
    os.replace(tmp / ".state.json.tmp", tmp / "state.json")
    swap_dir(tmp, dst)
    done = sorted(
        int(m.group(1))
        for p in root.iterdir()
        if (m := _ROUND_RE.match(p.name)) and (p / "state.json").exists()
    )
    for old in done[:-KEEP]:
        shutil.rmtree(root / f"round-{old:04d}", ignore_errors=True)
    return dst


def load_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    """The newest readable checkpoint of ``run_dir`` (None when there is none).

    A corrupt newest round (a torn write cannot happen, a damaged disk can) is reported
    and the previous one is used.

    Raises:
        DataError: every checkpoint folder is unreadable.
    """
    root = _dir(Path(run_dir))
    if not root.exists():
        return None
    done = sorted(
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _ROUND_RE.match(p.name)) and (p / "state.json").exists()
    )
    errors = []
    for _rnd, p in reversed(done):
        try:
            state = json.loads((p / "state.json").read_text())
            shared = read_tensors(p / "shared.safetensors")
        except (OSError, ValueError, DataError) as exc:
            errors.append(f"{p}: {exc}")
            print(f"warning: checkpoint {p} is unreadable ({exc}); trying an older one")
            continue
        return Checkpoint(
            round=int(state["round"]),
            run_key=str(state["run_key"]),
            config=state["config"],
            shared=shared,
            rows=state.get("rows", []),
            failures=state.get("failures", []),
            messages=state.get("messages", []),
            extra=state.get("extra", {}),
        )
    if errors:
        raise DataError(
            "no readable checkpoint in "
            f"{root}: " + "; ".join(errors) + " — remove the folder to start afresh"
        )
    return None


def check_resumable(ckpt: Checkpoint, config: dict[str, Any], run_dir: Path) -> None:
    """Refuse to resume ``ckpt`` under another configuration (names the first key)."""
    a, b = comparable_config(ckpt.config), comparable_config(config)
    if a != b:
        raise ConfigError(
            f"{run_dir} holds a checkpoint of round {ckpt.round} of another "
            f"configuration (first differing key: {first_difference(a, b)}); resume "
            "with the same configuration, or choose another run.dir (or "
            "run.resume='never' with a fresh folder) to start a new run"
        )
