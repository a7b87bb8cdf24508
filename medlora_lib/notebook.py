"""The common opening of every chapter, on the model of MONAI's ``print_config()``.

Chapters ``notebooks/00_foundation_model_and_lora`` to ``07_beyond_the_paper``:
:func:`setup` silences the two known harmless warnings, sets the book's plot and table
style and prints the versions, the machine and the cache the chapter runs with;
:func:`describe_profile` prints the profile and the key values of the configuration that
produce the chapter's numbers, next to the chapter's own parameters; :func:`glue` hands a
value to the book's ``{glue}`` roles and still runs where the book's tools are not
installed (Colab, ``book/gpu_colab.md``).
"""

from __future__ import annotations

import os
import platform
import sys
import warnings
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

__all__ = ["KNOWN_NOISE", "setup", "describe_profile", "glue"]

#: Warnings that say nothing about the results (no ipywidgets; a split with one class).
KNOWN_NOISE = ("IProgress not found", "y_pred contains classes not in y_true")
DEFAULT_PACKAGES = ("medlora", "torch", "flwr", "peft", "monai", "numpy", "scipy")


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"


def setup(packages: Sequence[str] = DEFAULT_PACKAGES, *, quiet: bool = False) -> dict:
    """Style, warnings filters and a printout of what the chapter runs on.

    Returns:
        ``{"versions": {package: version}, "python", "platform", "torch_threads",
        "device", "cache"}`` (what was printed).
    """
    import pandas as pd
    import torch

    from medlora_lib import plotting
    from medlora_lib.config import default_cache_dir

    for message in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message)
    plotting.set_style()
    pd.set_option("display.width", 160)
    info = {
        "versions": {p: _version(p) for p in packages},
        "python": sys.version.split()[0],
        "platform": platform.platform(terse=True),
        "torch_threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cache": str(default_cache_dir()),
        "data": os.environ.get("MEDLORA_DATA_DIR", "") or "synthetic (default)",
    }
    if not quiet:
        for pkg, v in info["versions"].items():
            print(f"{pkg:>14} {v}")
        print(f"{'python':>14} {info['python']} on {info['platform']}")
        print(f"{'device':>14} {info['device']}, {info['torch_threads']} torch threads")
        print(f"{'cache':>14} {info['cache']}")
        print(f"{'data':>14} {info['data']}")
    return info


def describe_profile(config: Any, **parameters: Any) -> dict:
    """Print the profile, the key values of its configuration and the chapter's
    parameters (what a reader needs to reproduce the chapter's numbers).

    Args:
        config: a profile name or the chapter's :class:`~medlora_lib.config.ExperimentConfig`.
        parameters: the chapter's own parameters (seeds, budget, sweep levels, ...).

    Returns:
        The printed key values.
    """
    from medlora_lib.config import get_config

    cfg = get_config(config) if isinstance(config, str) else config
    a = cfg.adapter
    key = {
        "profile": cfg.profile,
        "image size": "x".join(map(str, cfg.data.image_size)),
        "model": f"{cfg.model.size} ({cfg.model.pretrained})",
        "adapted blocks": a.adapted_blocks,
        "LoRA": f"rank {a.lora_rank}, alpha {a.lora_alpha:g} on {', '.join(a.target_modules)}",
        "budget": f"{cfg.fed.num_rounds} rounds x {cfg.train.local_epochs} local epoch(s)",
        "optimiser": f"lr {cfg.train.lr:g}, batch {cfg.train.batch_size}",
        "selection": f"validation {cfg.train.selection_metric}"
        + (f", early stop after {t.patience}" if (t := cfg.train).patience else ""),
        "recipe": _recipe(cfg),
        "sites": f"partition by {cfg.fed.partition_by}",
        **{f"param {k}": v for k, v in parameters.items()},
    }
    width = max(len(k) for k in key)
    for k, v in key.items():
        print(f"{k:>{width}}  {v}")
    return key


def _recipe(cfg: Any) -> str:
    """CineMA's fine-tuning recipe as configured (``medlora_lib.recipe``), in one line."""
    t = cfg.train
    parts = [
        "augmentation" if cfg.data.augment else "no augmentation",
        "warm-up + cosine lr" if t.schedule == "warmup_cosine" else "constant lr",
        f"layer decay {t.layer_decay:g}" if t.layer_decay != 1 else "no layer decay",
        f"amp {t.amp}",
        "grad checkpointing" if t.grad_checkpointing else "no grad checkpointing",
        f"optimiser state {t.optimizer_state}",
        "prefix cache" if cfg.uses_prefix_cache else "no prefix cache",
    ]
    return ", ".join(parts)


def glue(name: str, value: Any, display: bool = True) -> None:
    """Hand ``value`` to the book's ``{glue}`` roles under ``name``.

    With ``myst_nb`` installed (the ``[book]`` extra: ``make book``, papermill) this is
    ``myst_nb.glue(name, value, display=display)``: the rendered page shows the value
    where the prose writes ``{glue:text}`name```. Without it (a plain ``pip install``,
    Colab) the prose's roles are not rendered, so the value is shown in the cell's
    output instead, labelled with its name, whatever ``display`` says: the chapter runs
    and the reader still sees the number the text refers to. Chapters 00, 01 and 04
    use it (``from medlora_lib.notebook import glue``).
    """
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        _show(name, value)
        return
    myst_glue(name, value, display=display)


def _show(name: str, value: Any) -> None:
    try:
        from IPython.display import display
    except ImportError:  # plain Python, no kernel
        print(f"{name}: {value!r}")
        return
    print(f"{name}:")
    display(value)
