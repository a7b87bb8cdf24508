"""Typed experiment configuration and the three profiles (``smoke``, ``cpu``, ``paper``).

A profile is a named set of defaults; every value can still be overridden, either with
keyword arguments (``get_config("cpu", seed=3)``) or with dotted strings
(``get_config("cpu", overrides=["train.lr=3e-4", "data.heterogeneity=0.5"])``).
Every result written by the library stores ``ExperimentConfig.to_dict()`` next to it.

Explained in the book: ``book/reproducibility.md`` (profiles) and notebook 00.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from medlora_lib.errors import ConfigError

__all__ = [
    "PROFILES",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "FedConfig",
    "ExperimentConfig",
    "get_config",
    "config_hash",
    "default_cache_dir",
]

ProfileName = Literal["smoke", "cpu", "paper"]
PROFILES: tuple[str, ...] = ("smoke", "cpu", "paper")


def _help(text: str, **kwargs: Any) -> Any:
    """A dataclass field whose help text travels in ``metadata['help']``."""
    return field(metadata={"help": text}, **kwargs)


def _check(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"config field `{name}`: {message}")


@dataclass
class DataConfig:
    """Where the data comes from and how it is preprocessed."""

    data_dir: str | None = _help(
        "Prepared data folder (holds manifest.csv). None: generate the synthetic set "
        "for this profile into the cache (or read $MEDLORA_DATA_DIR if set).",
        default=None,
    )
    image_size: tuple[int, int, int] = _help(
        "Model input size (H, W, D) after preprocessing.", default=(48, 48, 8)
    )
    spacing: tuple[float, float, float] = _help(
        "Target voxel spacing in mm (x, y, z).", default=(3.0, 3.0, 10.0)
    )
    scale: float = _help(
        "Synthetic data: fraction of the real per-vendor client sizes.", default=1.0
    )
    min_per_vendor: int = _help(
        "Synthetic data: minimum subjects per vendor.", default=12
    )
    heterogeneity: float = _help(
        "Synthetic data: 0 = vendors look alike, 1 = realistic vendor shift.",
        default=1.0,
    )
    synth_seed: int = _help("Seed of the synthetic data set.", default=0)
    val_fraction: float = _help("Validation share of each client.", default=0.15)
    test_fraction: float = _help("Test share of each client.", default=0.25)
    augment: bool = _help(
        "Training-time augmentation (disables the frozen-prefix cache).",
        default=False,
    )

    def __post_init__(self) -> None:
        self.image_size = tuple(int(v) for v in self.image_size)  # type: ignore[assignment]
        self.spacing = tuple(float(v) for v in self.spacing)  # type: ignore[assignment]
        _check(len(self.image_size) == 3, "data.image_size", "expected 3 integers")
        _check(all(v > 0 for v in self.image_size), "data.image_size", "must be > 0")
        _check(len(self.spacing) == 3, "data.spacing", "expected 3 numbers (mm)")
        _check(all(v > 0 for v in self.spacing), "data.spacing", "must be > 0")
        _check(self.scale > 0, "data.scale", f"must be > 0, got {self.scale}")
        _check(self.min_per_vendor >= 1, "data.min_per_vendor", "must be >= 1")
        _check(
            0.0 <= self.heterogeneity <= 1.0,
            "data.heterogeneity",
            f"must lie in [0, 1], got {self.heterogeneity}",
        )
        _check(
            0 < self.val_fraction < 1 and 0 < self.test_fraction < 1,
            "data.val_fraction/test_fraction",
            "must lie strictly between 0 and 1",
        )
        _check(
            self.val_fraction + self.test_fraction < 1,
            "data.val_fraction/test_fraction",
            "their sum must leave some training data (< 1)",
        )


@dataclass
class ModelConfig:
    """Which foundation model and which weights."""

    size: Literal["small", "base"] = _help(
        "ConvViT size: `small` (the embedded stand-in) or `base` (CineMA).",
        default="small",
    )
    pretrained: str = _help(
        "Weights: `small` (embedded small FM), `hub` (public CineMA checkpoint), "
        "`none` (random init) or a path to a .safetensors / .pt file.",
        default="small",
    )
    drop_path: float = _help("Drop-path rate of the ViT blocks.", default=0.0)
    overrides: dict[str, Any] = _help(
        "Extra architecture overrides passed to build_convvit.", default_factory=dict
    )

    def __post_init__(self) -> None:
        _check(
            self.size in ("small", "base"),
            "model.size",
            f"unknown size {self.size!r}; choose `small` or `base`",
        )
        _check(0.0 <= self.drop_path < 1.0, "model.drop_path", "must lie in [0, 1)")


@dataclass
class TrainConfig:
    """Local optimisation, identical for every method."""

    local_epochs: int = _help("Epochs of local training per round.", default=1)
    batch_size: int = _help("Mini-batch size.", default=16)
    lr: float = _help("AdamW learning rate (adapters and head).", default=1e-3)
    weight_decay: float = _help("AdamW weight decay.", default=0.05)
    betas: tuple[float, float] = _help("AdamW betas.", default=(0.9, 0.95))
    label_smoothing: float = _help("Cross-entropy label smoothing.", default=0.1)
    grad_clip: float = _help("Gradient-norm clipping (0 = off).", default=5.0)
    class_weighting: Literal["balanced", "none"] = _help(
        "Weight the loss by inverse class frequency of the client's training split.",
        default="balanced",
    )
    use_prefix_cache: bool = _help(
        "Cache everything before the first adapted block (exact; needs no augmentation).",
        default=True,
    )
    selection_metric: Literal["balanced_accuracy", "mcc", "auc"] = _help(
        "Validation metric used to pick the checkpoint (decided before testing).",
        default="balanced_accuracy",
    )
    device: str = _help("`cpu`, `cuda` or `auto`.", default="auto")
    num_threads: int = _help("torch CPU threads (0 = torch default).", default=0)

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        _check(self.local_epochs >= 1, "train.local_epochs", "must be >= 1")
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(self.lr > 0, "train.lr", "must be > 0")
        _check(0 <= self.label_smoothing < 1, "train.label_smoothing", "in [0, 1)")
        _check(
            self.class_weighting in ("balanced", "none"),
            "train.class_weighting",
            "choose `balanced` or `none`",
        )
        _check(
            self.selection_metric in ("balanced_accuracy", "mcc", "auc"),
            "train.selection_metric",
            "choose `balanced_accuracy`, `mcc` or `auc`",
        )


@dataclass
class FedConfig:
    """Federation: rounds and method-specific knobs."""

    num_rounds: int = _help("Communication rounds.", default=20)
    proximal_mu: float = _help("FedProx proximal weight μ.", default=0.01)
    clients: Literal["vendor", "vendor+acdc"] = _help(
        "One client per vendor, or ACDC as its own fifth client.", default="vendor"
    )
    exclude: tuple[str, ...] = _help(
        "Clients left out of this experiment (e.g. a site that joins later; "
        "medlora_lib.fl.newsite).",
        default=(),
    )

    def __post_init__(self) -> None:
        if isinstance(self.exclude, str):
            self.exclude = (self.exclude,) if self.exclude else ()
        self.exclude = tuple(str(c) for c in self.exclude)
        _check(self.num_rounds >= 1, "fed.num_rounds", "must be >= 1")
        _check(self.proximal_mu >= 0, "fed.proximal_mu", "must be >= 0")
        _check(
            self.clients in ("vendor", "vendor+acdc"),
            "fed.clients",
            "choose `vendor` or `vendor+acdc`",
        )


@dataclass
class ExperimentConfig:
    """Everything that defines one run; saved with every result."""

    profile: str = "cpu"
    method: str = "med_dual_lora"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: dict[str, Any] = field(
        default_factory=lambda: {
            "adapted_blocks": "last2",
            "lora_rank": 8,
            "lora_alpha": 16,
            "target_modules": ["attn.q", "attn.kv", "attn.proj"],
        }
    )
    train: TrainConfig = field(default_factory=TrainConfig)
    fed: FedConfig = field(default_factory=FedConfig)

    def __post_init__(self) -> None:
        _check(
            self.profile in PROFILES,
            "profile",
            f"unknown profile {self.profile!r}; choose one of {', '.join(PROFILES)}",
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dictionary (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperimentConfig:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        return cls(
            profile=d.get("profile", "cpu"),
            method=d.get("method", "med_dual_lora"),
            seed=int(d.get("seed", 0)),
            data=DataConfig(**d.get("data", {})),
            model=ModelConfig(**d.get("model", {})),
            adapter=dict(d.get("adapter", {})),
            train=TrainConfig(**d.get("train", {})),
            fed=FedConfig(**d.get("fed", {})),
        )


# Profile defaults: plain nested dictionaries so that the book can print them.
_PROFILE_DEFAULTS: dict[str, dict[str, Any]] = {
    "smoke": {
        "data": {
            "image_size": (32, 32, 8),
            "spacing": (4.5, 4.5, 10.0),
            "scale": 0.06,
            "min_per_vendor": 12,
        },
        "model": {"size": "small", "pretrained": "small"},
        "train": {"local_epochs": 1, "batch_size": 8, "num_threads": 1},
        "fed": {"num_rounds": 2},
    },
    "cpu": {
        "data": {
            "image_size": (48, 48, 8),
            "spacing": (3.0, 3.0, 10.0),
            "scale": 1.0,
            "min_per_vendor": 12,
        },
        "model": {"size": "small", "pretrained": "small"},
        # One torch thread per process: the simulation runs one process per client on
        # the 2 cores, and with these small tensors more threads only add contention.
        "train": {"local_epochs": 1, "batch_size": 16, "num_threads": 1},
        "fed": {"num_rounds": 20},
    },
    "paper": {
        "data": {"image_size": (192, 192, 16), "spacing": (1.0, 1.0, 10.0)},
        "model": {"size": "base", "pretrained": "hub", "drop_path": 0.1},
        "train": {"local_epochs": 1, "batch_size": 8},
        "fed": {"num_rounds": 30},
    },
}


def profile_defaults(profile: str) -> dict[str, Any]:
    """The nested default values of ``profile`` (a deep copy)."""
    if profile not in _PROFILE_DEFAULTS:
        raise ConfigError(
            f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}"
        )
    return json.loads(json.dumps(_PROFILE_DEFAULTS[profile]))


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        low = text.lower()
        if low in ("true", "false"):
            return low == "true"
        if low in ("none", "null"):
            return None
        return text


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config override `{key}`: `{p}` is not a section")
    node[parts[-1]] = value


_SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "fed": FedConfig,
}


def get_config(
    profile: str = "cpu",
    overrides: list[str] | dict[str, Any] | None = None,
    **top_level: Any,
) -> ExperimentConfig:
    """Build the config of ``profile`` with overrides applied.

    Args:
        profile: ``smoke``, ``cpu`` (default) or ``paper``.
        overrides: dotted overrides, ``["train.lr=3e-4"]`` or ``{"train.lr": 3e-4}``.
        **top_level: ``method``, ``seed`` or whole sections (``data={...}``).

    Raises:
        ConfigError: unknown profile, unknown field or invalid value (the message
            names the field).
    """
    tree = profile_defaults(profile)
    tree["profile"] = profile
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(
                    f"config override {item!r}: expected `section.field=value`"
                )
            k, v = item.split("=", 1)
            items.append((k.strip(), _parse_value(v.strip())))
    for k, v in top_level.items():
        if k in _SECTIONS and isinstance(v, dict):
            for kk, vv in v.items():
                _set_dotted(tree, f"{k}.{kk}", vv)
        else:
            items.append((k, v))
    for k, v in items:
        section = k.split(".")[0]
        if section in _SECTIONS:
            names = {f.name for f in dataclasses.fields(_SECTIONS[section])}
            fname = k.split(".", 1)[1] if "." in k else ""
            if fname not in names:
                raise ConfigError(
                    f"config override `{k}`: unknown field; `{section}` has "
                    f"{', '.join(sorted(names))}"
                )
        elif section == "adapter":
            pass
        elif k not in ("method", "seed", "profile"):
            raise ConfigError(
                f"config override `{k}`: unknown key; use method, seed, or one of "
                f"data./model./adapter./train./fed."
            )
        _set_dotted(tree, k, v)
    try:
        return ExperimentConfig.from_dict(tree)
    except TypeError as exc:  # unknown field in a section dict
        raise ConfigError(f"invalid config: {exc}") from exc


def config_hash(config: ExperimentConfig | dict[str, Any], length: int = 12) -> str:
    """A short, stable hash of a config (used to cache results by config)."""
    d = config.to_dict() if isinstance(config, ExperimentConfig) else config
    blob = json.dumps(d, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def default_cache_dir() -> Path:
    """Where generated data and cached runs live.

    ``$MEDLORA_CACHE`` if set (the book runner sets it to ``<repo>/.cache/medlora``),
    else ``~/.cache/medlora``.
    """
    env = os.environ.get("MEDLORA_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    return (Path.home() / ".cache" / "medlora").resolve()
