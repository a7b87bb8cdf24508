"""A site's private state on its own disk, written atomically after every round.

Chapter ``book/deployment.md`` (nothing lost when a SuperNode restarts).

What a method keeps at the site — Med-DualLoRA's local adapter, a private head,
FedSA-LoRA's B — never enters a message. After every training round the ClientApp
writes it under the SuperNode's ``state-dir``; a restarted SuperNode reads it back
bit for bit and continues. Layout::

    <state-dir>/site.json                    which site owns this folder
    <state-dir>/<run-key>/experiment.json    the experiment's config (refused if it differs)
    <state-dir>/<run-key>/round-0007/        private.safetensors + round.json
    <state-dir>/<run-key>/deployed-last/     the model the site uses now: the global
    <state-dir>/<run-key>/deployed-best/     state it evaluated + its private state
                                             (best on validation: the local adapter
                                             also in PEFT's format, ``local_adapter/``)

``run-key`` is chosen by the server when a run starts and kept when it resumes, so a
resumed run finds its sites' state and a new run of the same configuration starts fresh.
The private state of round *r* is what training in round *r* produced; a message of
server round *r* loads the newest round before *r* (a site that missed rounds continues
from its last one). Every folder is written under a temporary name and renamed into
place; the last two rounds are kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from medlora_lib.errors import ConfigError, DataError

__all__ = [
    "SiteStateStore",
    "atomic_write_tensors",
    "atomic_write_many",
    "read_tensors",
    "swap_dir",
    "KEEP_ROUNDS",
]

KEEP_ROUNDS = 2
_ROUND_RE = re.compile(r"^round-(\d{4,})$")


def atomic_write_tensors(
    path: Path, tensors: dict[str, torch.Tensor], durable: bool = True
) -> None:
    """``save_file`` to a temporary name, fsync (``durable``), rename into place.

    Without ``durable`` a killed process still leaves the old file or the new one,
    never a torn one; after a power cut the newest version may be lost or, on a
    filesystem that does not flush a file renamed over another, empty.
    """
    atomic_write_many({path: tensors}, durable=durable)


def atomic_write_many(
    files: dict[Path, dict[str, torch.Tensor]], durable: bool = True
) -> None:
    """:func:`atomic_write_tensors` for several files: every file is written first and
    then fsynced (``durable``), so one journal commit carries them all (two fsyncs in a
    row cost about one), then each is renamed into place."""
    from safetensors.torch import save_file

    staged = []
    for path, tensors in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp)
        )
        staged.append((tmp, path))
    if durable:
        for tmp, _ in staged:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
    for tmp, path in staged:
        os.replace(tmp, path)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a corrupt one is a :class:`DataError` naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:
        raise DataError(
            f"{path}: cannot read the saved tensors ({exc}); the file is corrupt — "
            "delete its folder to fall back to the previous round"
        ) from exc


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


def swap_dir(tmp: Path, dst: Path) -> None:
    """Put the finished folder ``tmp`` at ``dst`` (replacing an older one)."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)


@contextlib.contextmanager
def _staged(parent: Path, name: str) -> Iterator[Path]:
    """A fresh hidden folder beside ``parent/name``, swapped into place on success."""
    tmp = parent / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    swap_dir(tmp, parent / name)


class SiteStateStore:
    """The private state of one site under its ``state-dir``.

    Args:
        state_dir: the SuperNode's ``state-dir`` (created if missing).
        site: the site's name; a folder that belongs to another site is refused.

    Raises:
        DataError: ``state_dir`` belongs to another site.
    """

    def __init__(self, state_dir: str | Path, site: str) -> None:
        self.root = Path(state_dir).expanduser()
        self.site = site
        self.root.mkdir(parents=True, exist_ok=True)
        marker = self.root / "site.json"
        if marker.exists():
            owner = json.loads(marker.read_text()).get("site")
            if owner != site:
                raise DataError(
                    f"state-dir {self.root} belongs to site {owner!r}, not {site!r}; "
                    "give every SuperNode its own state-dir"
                )
        else:
            _write_json(marker, {"site": site, "created": time.time()})

    # ------------------------------------------------------------------ experiment
    def run_dir(self, run_key: str) -> Path:
        if not run_key or "/" in run_key or run_key.startswith("."):
            raise ConfigError(f"invalid run key {run_key!r}")
        return self.root / run_key

    def bind(self, run_key: str, config: dict[str, Any], config_id: str) -> Path:
        """Tie ``run_key`` to an experiment; refuse state of another configuration."""
        d = self.run_dir(run_key)
        d.mkdir(parents=True, exist_ok=True)
        meta = d / "experiment.json"
        if meta.exists():
            saved = json.loads(meta.read_text())
            if saved.get("config_id") != config_id:
                from medlora_lib.fl.checkpoint import first_difference

                key = first_difference(saved.get("config", {}), config)
                raise ConfigError(
                    f"state-dir {d} holds the state of another configuration "
                    f"(first differing key: `{key}`); the server sent a run key that "
                    "belongs to another experiment — start a new run"
                )
        else:
            _write_json(
                meta,
                {"config": config, "config_id": config_id, "site": self.site},
            )
        return d

    # ------------------------------------------------------------------ rounds
    def rounds(self, run_key: str) -> list[int]:
        d = self.run_dir(run_key)
        if not d.exists():
            return []
        out = []
        for p in d.iterdir():
            m = _ROUND_RE.match(p.name)
            if m and (p / "round.json").exists():
                out.append(int(m.group(1)))
        return sorted(out)

    def save_round(
        self,
        run_key: str,
        rnd: int,
        private: dict[str, torch.Tensor],
        meta: dict[str, Any] | None = None,
        optimizer: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write the private state that training in round ``rnd`` produced (and the
        optimiser moments the site keeps, ``train.optimizer_state``)."""
        d = self.run_dir(run_key)
        with _staged(d, f"round-{rnd:04d}") as tmp:
            files = {tmp / "private.safetensors": private}
            if optimizer:
                files[tmp / "optimizer.safetensors"] = optimizer
            atomic_write_many(files)
            _write_json(
                tmp / "round.json", {"round": rnd, "site": self.site, **(meta or {})}
            )
        for old in self.rounds(run_key)[:-KEEP_ROUNDS]:
            shutil.rmtree(d / f"round-{old:04d}", ignore_errors=True)
        return d / f"round-{rnd:04d}"

    def load_before(
        self, run_key: str, rnd: int
    ) -> tuple[int, dict[str, torch.Tensor]] | None:
        """The newest saved round before ``rnd`` and its private tensors (or None)."""
        earlier = [r for r in self.rounds(run_key) if r < rnd]
        if not earlier:
            return None
        r = earlier[-1]
        return r, read_tensors(
            self.run_dir(run_key) / f"round-{r:04d}" / "private.safetensors"
        )

    def optimizer_before(
        self, run_key: str, rnd: int
    ) -> dict[str, torch.Tensor] | None:
        """The optimiser moments saved with the newest round before ``rnd`` (or None)."""
        earlier = [r for r in self.rounds(run_key) if r < rnd]
        if not earlier:
            return None
        path = (
            self.run_dir(run_key) / f"round-{earlier[-1]:04d}" / "optimizer.safetensors"
        )
        return read_tensors(path) if path.exists() else None

    # ------------------------------------------------------------------ deployed model
    def save_deployed(
        self,
        run_key: str,
        which: str,
        shared: dict[str, torch.Tensor],
        private: dict[str, torch.Tensor],
        meta: dict[str, Any],
        model: Any = None,
    ) -> Path:
        """Write the model the site uses (``which``: ``last`` or ``best``).

        ``best`` is fsynced; ``last`` — rewritten by every message, and made of the
        global state the server checkpoints and the site's fsynced round state — is
        atomic only: a killed process leaves the old copy or the new one, but after a
        power cut, on a filesystem that does not flush a file renamed over another,
        the newest copy may be lost or empty (``medlora export`` then names the file,
        and the next message rewrites it). ~4 fsyncs a message saved,
        ``benchmarks/bench_federation.py --trace``.
        """
        d = self.run_dir(run_key)
        with _staged(d, f"deployed-{which}") as tmp:
            atomic_write_many(
                {
                    tmp / "shared.safetensors": shared,
                    tmp / "private.safetensors": private,
                },
                durable=which != "last",
            )
            if model is not None:
                from medlora_lib.adapters import save_local_adapter

                save_local_adapter(model, tmp / "local_adapter")
            _write_json(tmp / "deployed.json", {"site": self.site, **meta})
        return d / f"deployed-{which}"

    def deployed(self, run_key: str, which: str = "best") -> dict[str, Any] | None:
        """``{"shared", "private", "meta", "path"}`` of a saved deployed model."""
        p = self.run_dir(run_key) / f"deployed-{which}"
        if not (p / "deployed.json").exists():
            return None
        return {
            "shared": read_tensors(p / "shared.safetensors"),
            "private": read_tensors(p / "private.safetensors"),
            "meta": json.loads((p / "deployed.json").read_text()),
            "path": p,
        }

    def best_metric(self, run_key: str) -> float | None:
        info = self.run_dir(run_key) / "deployed-best" / "deployed.json"
        if not info.exists():
            return None
        v = json.loads(info.read_text()).get("selection_value")
        return None if v is None else float(v)
