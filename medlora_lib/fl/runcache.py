"""Where a run's folder is and when a cached result may be reused (chapter ``book/reproducibility.md``).

A run folder (``run.dir``) holds the server's checkpoints while the run goes and its
result at the end (``results.json``, ``rounds.csv``, ``final_shared.safetensors``).
:func:`cache_path` is the folder :func:`medlora_lib.fl.simulate` uses with
``use_cache=True``: its name is keyed by the experiment's configuration, the data folder,
the weights' content and **the code that computes a result** — every module of
``medlora_lib`` except the presentation ones (:data:`PRESENTATION_MODULES`) — so a code
change can never serve stale numbers.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from medlora_lib.config import ExperimentConfig, config_hash, default_cache_dir

__all__ = [
    "CACHE_VERSION",
    "PRESENTATION_MODULES",
    "cache_path",
    "code_fingerprint",
    "default_run_dir",
    "result_modules",
]

CACHE_VERSION = 3  # 3: sites, run folders with checkpoints
#: Modules that only present results (plots, tables, the book runner, the command line,
#: deployment launchers): changing them does not change a number.
PRESENTATION_MODULES = (
    "plotting.py",
    "bookrun.py",
    "cli.py",
    "stats.py",
    "experiments.py",
    "notebook.py",
    "fl/deploy.py",
    "fl/runner.py",
    "fl/security.py",
    "fl/export.py",
)


def result_modules() -> list[Path]:
    """Every ``medlora_lib`` module whose code can change a result (sorted)."""
    root = Path(__file__).resolve().parent.parent
    return sorted(
        p
        for p in root.rglob("*.py")
        if p.relative_to(root).as_posix() not in PRESENTATION_MODULES
    )


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """Hash of :func:`result_modules`, read once per process (the running code was
    imported from those files, so one read per cache key would only repeat it)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for p in result_modules():
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def _weights_fingerprint(cfg: ExperimentConfig) -> str:
    p = cfg.model.pretrained
    if p == "none":
        return "none"
    path = None
    if p == "small":
        from medlora_lib.models.checkpoint import SMALL_FM_PATH

        path = SMALL_FM_PATH
    elif p != "hub":
        path = Path(p).expanduser()
    if path is not None and path.exists():
        st = path.stat()
        return f"{p}:{_file_digest(str(path.resolve()), st.st_size, st.st_mtime_ns)}"
    return p


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a weights file (content, not time stamps: a fresh clone or a copy of
    the same weights hits the same cached runs); memoised per file version."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def cache_path(cfg: ExperimentConfig, data_dir: str | Path) -> Path:
    """Where ``simulate(..., use_cache=True)`` keeps the run of ``cfg``."""
    key = {
        "config": config_hash(cfg, 64),
        "data_dir": str(data_dir),
        "weights": _weights_fingerprint(cfg),
        "code": code_fingerprint(),
        "version": CACHE_VERSION,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return default_cache_dir() / "runs" / f"{cfg.method}-{config_hash(cfg, 6)}-{digest}"


def default_run_dir(cfg: ExperimentConfig) -> Path:
    """The run folder of ``flwr run`` when ``run.dir`` is empty (keyed by the config)."""
    return default_cache_dir() / "runs" / "flwr" / f"{cfg.method}-{config_hash(cfg, 8)}"
