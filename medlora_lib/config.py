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
    "PrivacyConfig",
    "AdapterSection",
    "RunOptions",
    "ExperimentConfig",
    "LORA_TARGETS",
    "OPERATIONAL_KEYS",
    "get_config",
    "to_run_config",
    "from_run_config",
    "run_config_defaults",
    "experiment_of",
    "flat_key",
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


def _choice(section: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(section, name)
    label = type(section).__name__.replace("Config", "").lower()
    _check(
        value in choices,
        f"{label}.{name}",
        f"unknown value {value!r}; choose one of {', '.join(map(repr, choices))}",
    )


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
        "Synthetic data: 0 = vendors look alike, 1 = realistic vendor shift (both the "
        "appearance and the label shift below, unless they are set).",
        default=1.0,
    )
    appearance_shift: float | None = _help(
        "Synthetic data: the feature shift alone (contrast, noise, bias field, blur, "
        "intensity scale, acquisition grid): 0 = every vendor has the across-vendor "
        "mean appearance, 1 = its own. None = data.heterogeneity.",
        default=None,
    )
    label_shift: float | None = _help(
        "Synthetic data: the label shift alone (share of healthy subjects and disease "
        "mix of each client): 0 = the pooled prevalence and mix everywhere, 1 = each "
        "vendor's own. Client sizes stay those of the real data. None = "
        "data.heterogeneity.",
        default=None,
    )
    synth_seed: int = _help("Seed of the synthetic data set.", default=0)
    val_fraction: float = _help("Validation share of each client.", default=0.15)
    test_fraction: float = _help("Test share of each client.", default=0.25)
    augment: bool = _help(
        "CineMA's training-time augmentation (MONAI: gamma contrast, Gaussian noise, "
        "rescaling, in-plane rotation / scaling / translation; "
        "medlora_lib.recipe.make_augmentation), applied to every training batch. It "
        "switches the frozen-prefix cache off (the `paper` profile: on).",
        default=False,
    )
    split: Literal["per_seed", "fixed"] = _help(
        "What a replicate (seed) varies: `per_seed` = each seed draws its own "
        "stratified train / val / test split of every site (data.val_fraction, "
        "data.test_fraction; seeded by `seed`), so intervals over seeds include the "
        "sampling of the test set; `fixed` = the split written by `medlora prepare` / "
        "`medlora synth` (an official or agreed split) for every seed.",
        default="per_seed",
    )
    crop: Literal["lv_centred", "shift_inside"] = _help(
        "In-plane crop around the LV centre at ED: `shift_inside` = CineMA's (the "
        "window is shifted back inside the image where it would leave it; the "
        "`paper` profile), `lv_centred` = the window stays centred on the LV and is "
        "zero-padded outside the image (`cpu` / `smoke`). Used by `medlora prepare` "
        "and the synthetic data; a prepared folder must match it.",
        default="lv_centred",
    )
    intensity: Literal["joint", "per_frame"] = _help(
        "Clip to the 0.95-99.5th percentiles and rescale to [0, 1]: `per_frame` = "
        "CineMA's (ED and ES each on their own; the `paper` profile), `joint` = one "
        "range for both frames, which keeps their relative contrast (`cpu` / "
        "`smoke`). A prepared folder must match it.",
        default="joint",
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
        for name in ("appearance_shift", "label_shift"):
            value = getattr(self, name)
            _check(
                value is None or 0.0 <= value <= 1.0,
                f"data.{name}",
                f"must be empty (= data.heterogeneity) or lie in [0, 1], got {value}",
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
        _check(
            self.split in ("per_seed", "fixed"),
            "data.split",
            f"unknown value {self.split!r}; choose `per_seed` (each seed its own "
            "split) or `fixed` (the prepared folder's split)",
        )
        _check(
            self.crop in ("lv_centred", "shift_inside"),
            "data.crop",
            f"unknown value {self.crop!r}; choose `shift_inside` (CineMA) or "
            "`lv_centred`",
        )
        _check(
            self.intensity in ("joint", "per_frame"),
            "data.intensity",
            f"unknown value {self.intensity!r}; choose `per_frame` (CineMA) or `joint`",
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
    use_prefix_cache: Literal["auto", "on", "off"] = _help(
        "Cache everything before the first adapted block (exact, since the prefix is "
        "frozen): `auto` = whenever it is exact, i.e. without augmentation "
        "(`data.augment=true` switches it off, and the run says so); `on` = required "
        "(refused together with data.augment); `off` = never. true / false are read "
        "as `auto` / `off`.",
        default="auto",
    )
    selection_metric: Literal["balanced_accuracy", "mcc", "auc"] = _help(
        "Validation metric used to pick each site's round (decided before testing) "
        "and monitored by early stopping (CineMA: `mcc`).",
        default="balanced_accuracy",
    )
    test_every_round: bool = _help(
        "Evaluate the test split after every round (true), or only where it can be "
        "read (false): for a site, the rounds whose validation "
        "train.selection_metric beats every earlier round of that site (the rounds "
        "selection can pick), and the last round. Selected and final results are "
        "the same either way; with false the other rounds' rows hold no test "
        "metrics, and test-set curves need true.",
        default=False,
    )
    schedule: Literal["constant", "warmup_cosine"] = _help(
        "Learning-rate schedule over the federation's global step count: `constant` "
        "= train.lr throughout; `warmup_cosine` = CineMA's linear warm-up over the "
        "first train.warmup_fraction of training, then a half cosine down to "
        "train.min_lr at the last step of the last round (a step's position is "
        "(round - 1 + fraction of the round done) / fed.num_rounds).",
        default="constant",
    )
    warmup_fraction: float = _help(
        "warmup_cosine: share of the whole training spent warming up (CineMA: 10 of "
        "its epochs).",
        default=0.1,
    )
    min_lr: float = _help(
        "warmup_cosine: the learning rate at the end (CineMA: 1e-5).", default=1e-5
    )
    layer_decay: float = _help(
        "Layer-wise learning-rate decay (CineMA: 0.75): a tensor of transformer block "
        "i (LoRA factors included) learns at layer_decay^(depth - i) of the rate, the "
        "conv stem and embeddings at layer_decay^(depth + 1), the heads and final norm "
        "at the full rate. 1 = off.",
        default=1.0,
    )
    patience: int = _help(
        "Early stopping: stop the federation once the sites' mean validation "
        "train.selection_metric has not improved by train.min_delta for this many "
        "evaluated rounds (CineMA: 5 evaluations). 0 = run all fed.num_rounds.",
        default=0,
    )
    min_delta: float = _help(
        "Early stopping: the smallest gain that counts as an improvement.", default=1e-4
    )
    amp: Literal["auto", "off", "bf16", "fp16"] = _help(
        "Mixed precision on CUDA: `auto` = bf16 where the GPU supports it, otherwise "
        "fp16 with a GradScaler; `bf16` / `fp16` as asked. On a CPU `auto` trains in "
        "fp32, and an explicit bf16 / fp16 falls back to fp32 with a warning.",
        default="auto",
    )
    grad_checkpointing: bool = _help(
        "Recompute the activations of the transformer blocks that need gradients in "
        "the backward pass instead of storing them (CineMA's configs: on). Changes "
        "memory and time only, not the numbers.",
        default=False,
    )
    optimizer_state: Literal["reset", "private", "all"] = _help(
        "AdamW's moments across rounds at a site: `reset` = a fresh optimiser every "
        "round; `private` = the moments of the tensors that never leave the site "
        "(local adapter, private head, FedSA's B; every tensor for `local` and "
        "`centralized`) are kept in the site's state, saved with its private tensors "
        "so that a restarted SuperNode continues; `all` = the moments of the shared "
        "tensors too, continued from the aggregate the site receives.",
        default="reset",
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
        cache = self.use_prefix_cache
        if isinstance(cache, bool) or str(cache).lower() in ("true", "false"):
            self.use_prefix_cache = (  # type: ignore[assignment]
                "auto" if str(cache).lower() == "true" else "off"
            )
        _choice(self, "use_prefix_cache", ("auto", "on", "off"))
        _choice(self, "schedule", ("constant", "warmup_cosine"))
        _choice(self, "amp", ("auto", "off", "bf16", "fp16"))
        _choice(self, "optimizer_state", ("reset", "private", "all"))
        _check(
            0 <= self.warmup_fraction < 1,
            "train.warmup_fraction",
            f"must lie in [0, 1), got {self.warmup_fraction}",
        )
        _check(self.min_lr >= 0, "train.min_lr", "must be >= 0")
        _check(
            0 < self.layer_decay <= 1,
            "train.layer_decay",
            f"must lie in (0, 1] (1 = off; CineMA: 0.75), got {self.layer_decay}",
        )
        _check(self.patience >= 0, "train.patience", "must be >= 0 (0 = off)")
        _check(self.min_delta >= 0, "train.min_delta", "must be >= 0")


@dataclass
class FedConfig:
    """Federation: rounds, sites, fault tolerance and method-specific knobs."""

    num_rounds: int = _help("Communication rounds.", default=20)
    proximal_mu: float = _help("FedProx proximal weight μ.", default=0.01)
    partition_by: Literal["vendor", "centre", "vendor+acdc"] = _help(
        "Simulation: how one prepared folder is split into sites: one site per "
        "`vendor` (the paper's setting), per `centre` (M&Ms has several hospitals "
        "per vendor) or per vendor with ACDC as its own site (`vendor+acdc`). In a "
        "deployment each SuperNode's `data-path` holds one site.",
        default="vendor",
    )
    exclude: tuple[str, ...] = _help(
        "Sites left out of this experiment (e.g. a site that joins later; "
        "medlora_lib.fl.newsite).",
        default=(),
    )
    min_sites: int = _help(
        "Fewest sites a round needs; a round goes on with the sites that answered "
        "in time as long as at least this many did.",
        default=2,
    )
    num_sites: int = _help(
        "Sites the server waits for before round 1 (0 = every connected SuperNode "
        "that holds a site).",
        default=0,
    )
    round_timeout: float = _help(
        "Seconds the server waits for the sites' replies in a round before going on "
        "without the missing ones.",
        default=900.0,
    )
    connect_timeout: float = _help(
        "Seconds the server waits for enough sites (fed.num_sites, at least "
        "fed.min_sites) to connect before giving up with a clear error.",
        default=120.0,
    )
    allow_single_class: bool = _help(
        "Let a site whose training subjects are all of one class (e.g. only diseased) "
        "take part, with a warning; its specificity or sensitivity is then undefined. "
        "False: such a site is refused before the run starts (the message names it; "
        "leaving it out with fed.exclude is the other way). True in the `smoke` "
        "profile, whose tiny sets leave ACDC or a centre with one class.",
        default=False,
    )

    def __post_init__(self) -> None:
        if isinstance(self.exclude, str):
            self.exclude = tuple(s for s in self.exclude.split(",") if s)
        self.exclude = tuple(str(c) for c in self.exclude)
        _check(self.num_rounds >= 1, "fed.num_rounds", "must be >= 1")
        _check(self.proximal_mu >= 0, "fed.proximal_mu", "must be >= 0")
        _check(
            self.partition_by in ("vendor", "centre", "vendor+acdc"),
            "fed.partition_by",
            f"unknown value {self.partition_by!r}; choose `vendor`, `centre` or "
            "`vendor+acdc`",
        )
        _check(self.min_sites >= 1, "fed.min_sites", "must be >= 1")
        _check(self.num_sites >= 0, "fed.num_sites", "must be >= 0 (0 = all)")
        _check(self.round_timeout > 0, "fed.round_timeout", "must be > 0 seconds")
        _check(self.connect_timeout > 0, "fed.connect_timeout", "must be > 0 seconds")


@dataclass
class PrivacyConfig:
    """Differential privacy, secure aggregation and what a site reports (chapter
    ``notebooks/08_privacy``; ``book/deployment.md``).

    Everything is off by default, and off changes nothing: a config whose privacy
    section holds only defaults leaves it out of :meth:`ExperimentConfig.to_dict` (and
    so out of its hash), and no message carries a privacy key.
    """

    site_dp: Literal[
        "off", "server_fixed", "client_fixed", "server_adaptive", "client_adaptive"
    ] = _help(
        "Site-level (central) DP on the shared update, with Flower's strategy wrappers: "
        "the update of the shared tensors (received -> trained) of each site is clipped "
        "(`server_*`: by the server, `client_*`: at the site by Flower's clipping mods) "
        "and Gaussian noise is added to their mean. `*_adaptive` adapts the clipping "
        "norm to a quantile of the update norms (Andrew et al. 2021). Protects a whole "
        "site; the mean is then unweighted so that the noise fits the sensitivity.",
        default="off",
    )
    noise_multiplier: float = _help(
        "Site-level DP: noise standard deviation / clipping norm (z).", default=1.0
    )
    clipping_norm: float = _help(
        "Site-level DP: L2 clipping norm of a site's update (the initial norm with "
        "adaptive clipping).",
        default=1.0,
    )
    target_quantile: float = _help(
        "Adaptive clipping: the quantile of update norms the clipping norm tracks.",
        default=0.5,
    )
    clip_lr: float = _help("Adaptive clipping: learning rate of the norm.", default=0.2)
    dp_sgd: bool = _help(
        "Sample-level DP-SGD at every site with Opacus (per-sample gradients of the "
        "trainable LoRA / head tensors, clipped and noised; Poisson-sampled batches). "
        "Protects each patient of each site.",
        default=False,
    )
    sgd_noise_multiplier: float = _help(
        "DP-SGD: noise standard deviation / max_grad_norm (ignored when "
        "privacy.target_epsilon > 0: Opacus then chooses it).",
        default=1.0,
    )
    sgd_max_grad_norm: float = _help(
        "DP-SGD: per-sample gradient L2 clipping norm.", default=1.0
    )
    target_epsilon: float = _help(
        "0 = none. DP-SGD: the noise multiplier is chosen (Opacus) so that a site "
        "spends this epsilon over all fed.num_rounds rounds; site-level DP: the run "
        "is refused if fed.num_rounds rounds at privacy.noise_multiplier would spend "
        "more.",
        default=0.0,
    )
    delta: float = _help(
        "The delta at which epsilon is reported (choose < 1/records protected).",
        default=1e-5,
    )
    accountant: Literal["rdp", "prv"] = _help(
        "DP-SGD privacy accountant (Opacus): `rdp` (Renyi DP) or `prv` (privacy loss "
        "random variables, tighter). Site-level DP uses Flower's RDP accountant.",
        default="rdp",
    )
    secagg: bool = _help(
        "Secure aggregation (Flower's SecAgg+): the server sees only the sum of the "
        "sites' shared updates, never one site's.",
        default=False,
    )
    secagg_shares: float = _help(
        "SecAgg+: shares of each secret (a fraction of the sites, or a count > 1).",
        default=1.0,
    )
    secagg_threshold: float = _help(
        "SecAgg+: shares needed to reconstruct (a fraction of the shares, or a "
        "count > 1); fewer answering sites abort the round.",
        default=0.66,
    )
    secagg_clipping_range: float = _help(
        "SecAgg+: values are clipped to [-range, range] before quantisation.",
        default=8.0,
    )
    secagg_quantization_range: int = _help(
        "SecAgg+: quantisation levels of the clipped range.", default=4194304
    )
    metrics: Literal["auto", "full", "minimal"] = _help(
        "What a site reports: `full` = every metric of its val and test splits with "
        "their confusion counts (what the book's tables need); `minimal` = only what "
        "the server needs (the validation selection metric and the validation count; "
        "test metrics stay in the site's own state folder); `auto` = `minimal` on a "
        "deployed SuperNode (one with a data-path), `full` in the Simulation Runtime.",
        default="auto",
    )

    def __post_init__(self) -> None:
        modes = (
            "off",
            "server_fixed",
            "client_fixed",
            "server_adaptive",
            "client_adaptive",
        )
        _check(
            self.site_dp in modes,
            "privacy.site_dp",
            f"unknown value {self.site_dp!r}; choose one of {', '.join(modes)}",
        )
        _check(
            self.noise_multiplier >= 0,
            "privacy.noise_multiplier",
            f"must be >= 0 (got {self.noise_multiplier}); 1.0 or more for a useful "
            "guarantee",
        )
        _check(
            self.clipping_norm > 0,
            "privacy.clipping_norm",
            f"must be > 0 (got {self.clipping_norm}); e.g. 1.0",
        )
        _check(
            0 <= self.target_quantile <= 1,
            "privacy.target_quantile",
            "must be in [0, 1]",
        )
        _check(self.clip_lr > 0, "privacy.clip_lr", "must be > 0")
        _check(
            self.sgd_noise_multiplier >= 0,
            "privacy.sgd_noise_multiplier",
            f"must be >= 0 (got {self.sgd_noise_multiplier})",
        )
        _check(
            self.sgd_max_grad_norm > 0,
            "privacy.sgd_max_grad_norm",
            f"must be > 0 (got {self.sgd_max_grad_norm}); e.g. 1.0",
        )
        _check(
            self.target_epsilon >= 0,
            "privacy.target_epsilon",
            "must be >= 0 (0 = no target)",
        )
        _check(0 < self.delta < 1, "privacy.delta", "must be in (0, 1), e.g. 1e-5")
        _check(
            self.accountant in ("rdp", "prv"),
            "privacy.accountant",
            f"unknown value {self.accountant!r}; choose `rdp` or `prv`",
        )
        _check(self.secagg_shares > 0, "privacy.secagg_shares", "must be > 0")
        _check(self.secagg_threshold > 0, "privacy.secagg_threshold", "must be > 0")
        _check(
            self.secagg_clipping_range > 0,
            "privacy.secagg_clipping_range",
            "must be > 0",
        )
        _check(
            self.secagg_quantization_range > 1,
            "privacy.secagg_quantization_range",
            "must be > 1",
        )
        _check(
            self.secagg_quantization_range < 2**31,
            "privacy.secagg_quantization_range",
            f"{self.secagg_quantization_range} levels do not fit SecAgg+'s int32 "
            "quantisation and 2**32 modulus; use at most 2**30 (default 2**22)",
        )
        # SecAgg+ reads a value <= 1 as a fraction and one > 1 as a count
        for name, v in (
            ("privacy.secagg_shares", self.secagg_shares),
            ("privacy.secagg_threshold", self.secagg_threshold),
        ):
            _check(
                v <= 1 or float(v).is_integer(),
                name,
                f"{v:g} is neither a fraction (<= 1) nor a whole count (> 1); e.g. "
                "0.66 or 3",
            )
        _check(
            not 1 < self.secagg_shares < 3,
            "privacy.secagg_shares",
            f"a count of shares must be >= 3 (got {self.secagg_shares:g}); use 1.0 "
            "for one share per site of the round",
        )
        if self.secagg_shares > 1 and self.secagg_threshold > 1:
            _check(
                self.secagg_threshold < self.secagg_shares,
                "privacy.secagg_threshold",
                f"{self.secagg_threshold:g} shares to reconstruct a secret split into "
                f"privacy.secagg_shares={self.secagg_shares:g}: the threshold must be "
                "below the number of shares",
            )
        _check(
            self.metrics in ("auto", "full", "minimal"),
            "privacy.metrics",
            f"unknown value {self.metrics!r}; choose `auto`, `full` or `minimal`",
        )

    @property
    def active(self) -> bool:
        """Whether any DP or secure aggregation is requested."""
        return self.site_dp != "off" or self.dp_sgd or self.secagg


#: The linears of a CineMA block that LoRA can adapt.
LORA_TARGETS = ("attn.q", "attn.kv", "attn.proj", "mlp.fc1", "mlp.fc2")


@dataclass
class AdapterSection:
    """LoRA settings of an experiment (``ExperimentConfig.adapter``).

    The one source of the adapter defaults: :class:`medlora_lib.adapters.AdapterConfig`
    is this section plus the method, and validates every value (chapter
    ``notebooks/00_foundation_model_and_lora``).
    """

    lora_rank: int = _help("Rank r of every LoRA adapter (the global one).", default=8)
    lora_alpha: float = _help(
        "LoRA scaling alpha; the update is (alpha/r)·B·A.", default=16.0
    )
    lora_dropout: float = _help(
        "Dropout on the LoRA branch input, in [0, 1).", default=0.0
    )
    adapted_blocks: str | tuple[int, ...] = _help(
        "Transformer blocks that get LoRA: 'all', 'lastK', 'firstK' or a list of "
        "indices (negative allowed). The paper's efficient variant uses 'last2'.",
        default="last2",
    )
    target_modules: tuple[str, ...] = _help(
        f"Linears inside each adapted block, among {LORA_TARGETS}.",
        default=("attn.q", "attn.kv", "attn.proj"),
    )
    head: Literal["auto", "shared", "private", "frozen"] = _help(
        "Classification heads (pred_head_dict.sax / .cls): 'shared' = trained and "
        "sent with the shared tensors, 'private' = trained, kept at the client, "
        "'frozen' = not trained. 'auto' = the method's default (shared, except "
        "'local': private).",
        default="auto",
    )
    train_final_norms: bool = _help(
        "Also train encoder.norm and the fusion norm(s); they then follow the head "
        "policy. Frozen by default.",
        default=False,
    )
    local_lora_rank: int | None = _help(
        "Rank of med_dual_lora's local adapter (None = lora_rank).", default=None
    )

    def __post_init__(self) -> None:
        if isinstance(self.adapted_blocks, list):
            self.adapted_blocks = tuple(self.adapted_blocks)
        if isinstance(self.target_modules, str):
            self.target_modules = tuple(
                t.strip() for t in self.target_modules.split(",") if t.strip()
            )
        self.target_modules = tuple(self.target_modules)


@dataclass
class RunOptions:
    """How one run is carried out; not part of the experiment (never hashed).

    Read from the run config's ``run.*`` keys (``--run-config "run.dir='/srv/x'"``).
    """

    dir: str = _help(
        "The server's run folder (checkpoints, results). Empty: "
        "<cache>/runs/flwr/<method>-<config hash>.",
        default="",
    )
    resume: Literal["auto", "never", "require"] = _help(
        "`auto`: continue from the run folder's last completed round when it holds "
        "a checkpoint of the same configuration; `never`: refuse a folder that holds "
        "one; `require`: refuse to start without one.",
        default="auto",
    )
    record_messages: bool = _help(
        "Keep a summary (record types, keys, bytes) of every message.", default=False
    )
    state_dir: str = _help(
        "Simulation only: the folder under which every virtual site keeps its state "
        "(one sub-folder per site). Empty: <run folder>/sites. A deployed SuperNode "
        "takes its `state-dir` from its own node config.",
        default="",
    )
    batch: str = _help(
        "Several experiments in one run (the book's batching): a JSON list of "
        "flattened run configs; empty = the one experiment of this run config.",
        default="",
    )


@dataclass
class ExperimentConfig:
    """Everything that defines one run; saved with every result."""

    profile: str = "cpu"
    method: str = "med_dual_lora"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        _check(
            self.profile in PROFILES,
            "profile",
            f"unknown profile {self.profile!r}; choose one of {', '.join(PROFILES)}",
        )
        _check(
            isinstance(self.seed, int) and not isinstance(self.seed, bool),
            "seed",
            f"expected an integer, got {self.seed!r}",
        )
        self.adapter_config()  # validates the adapter section against the method
        if self.data.augment and self.train.use_prefix_cache == "on":
            raise ConfigError(
                "config fields `data.augment` and `train.use_prefix_cache`: "
                "augmentation changes a subject's frozen-prefix output every epoch, so "
                "the prefix cannot be cached; set train.use_prefix_cache='auto' (the "
                "cache goes off while augmenting) or data.augment=false"
            )
        self._check_privacy()

    @property
    def uses_prefix_cache(self) -> bool:
        """Whether training runs on the frozen-prefix cache (``train.use_prefix_cache``
        not ``off`` and no augmentation)."""
        return self.train.use_prefix_cache != "off" and not self.data.augment

    def _check_privacy(self) -> None:
        from medlora_lib.adapters import METHODS

        p = self.privacy
        if not p.active:
            return
        spec = METHODS.get(self.method)
        if spec is not None and not spec.federated:
            asked = [
                k
                for k, on in (
                    ("privacy.site_dp", p.site_dp != "off"),
                    ("privacy.dp_sgd", p.dp_sgd),
                    ("privacy.secagg", p.secagg),
                )
                if on
            ]
            raise ConfigError(
                f"config field `{asked[0]}`: method {self.method!r} sends no messages "
                "(nothing leaves a site, so there is nothing to protect in transit); "
                "use a federated method or switch it off"
            )
        if p.secagg:
            self._check_secagg_sites()
        if p.secagg and p.site_dp.startswith("server_"):
            raise ConfigError(
                "config field `privacy.site_dp`: server-side clipping needs each "
                "site's update, which secure aggregation hides from the server; use "
                "privacy.site_dp='client_fixed' or 'client_adaptive' with "
                "privacy.secagg=true"
            )
        if p.site_dp != "off" and p.noise_multiplier == 0:
            raise ConfigError(
                "config field `privacy.noise_multiplier`: 0 adds no noise, so site-level "
                "DP would clip without any guarantee; use a value > 0 (1.0 or more) "
                "or privacy.site_dp='off'"
            )

    def _check_secagg_sites(self) -> None:
        """SecAgg+ against the federation: a round the federation would accept must be
        one SecAgg+ can finish (``medlora_lib.fl.secagg.check_round`` checks each round
        with its actual sites)."""
        p, fed = self.privacy, self.fed
        if fed.min_sites < 2:
            raise ConfigError(
                f"config field `fed.min_sites`: {fed.min_sites} lets a round go on with "
                "one site, and with privacy.secagg=true the 'sum' of one site is its "
                "update; set fed.min_sites >= 2 (or privacy.secagg=false)"
            )
        if p.secagg_threshold <= 1:  # a fraction: it scales with the round's sites
            return
        need = int(p.secagg_threshold)
        for name, n in (
            ("fed.min_sites", fed.min_sites),
            ("fed.num_sites", fed.num_sites),
        ):
            if n and n < need:
                raise ConfigError(
                    f"config field `privacy.secagg_threshold`: SecAgg+ needs {need} "
                    f"sites in every round to reconstruct a site's masks, but {name}="
                    f"{n} lets a round go on with {n}, which it could not finish; set "
                    f"{name} >= {need}, or privacy.secagg_threshold <= {n} (or a "
                    "fraction of the shares such as 0.66)"
                )

    def adapter_config(self, method: str | None = None) -> Any:
        """The :class:`~medlora_lib.adapters.AdapterConfig` of this experiment.

        Raises:
            ConfigError: an invalid adapter value or method (names the field).
        """
        from medlora_lib.adapters import AdapterConfig

        try:
            return AdapterConfig(method=method or self.method, **asdict(self.adapter))
        except ConfigError as exc:
            text = str(exc)
            if text.startswith("AdapterConfig.method"):
                from medlora_lib.adapters import METHODS

                raise ConfigError(
                    f"config field `method`: unknown method {method or self.method!r}"
                    + _nearest(str(method or self.method), list(METHODS))
                    + f" (methods: {', '.join(METHODS)})"
                ) from None
            name = next(
                (f.name for f in dataclasses.fields(AdapterSection) if f.name in text),
                None,
            )
            where = f"adapter.{name}" if name else "adapter"
            raise ConfigError(f"config field `{where}`: {text}") from None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dictionary (tuples become lists).

        The ``privacy`` section is left out while it holds only defaults (everything
        off), so results and hashes of non-private runs are those of before it existed.
        """
        d = json.loads(json.dumps(asdict(self)))
        if self.privacy == PrivacyConfig():
            d.pop("privacy")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperimentConfig:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        fed = dict(d.get("fed", {}))
        if "clients" in fed:  # results written before sites replaced vendors
            fed.setdefault("partition_by", fed.pop("clients"))
        sections = {
            "data": (DataConfig, d.get("data", {})),
            "model": (ModelConfig, d.get("model", {})),
            "adapter": (AdapterSection, d.get("adapter", {})),
            "train": (TrainConfig, d.get("train", {})),
            "fed": (FedConfig, fed),
            "privacy": (PrivacyConfig, d.get("privacy", {})),
        }
        built = {}
        for name, (klass, values) in sections.items():
            values = dict(values)
            _check_names(name, klass, values)
            built[name] = klass(
                **{
                    k: _coerce(f"{name}.{k}", _field_type(klass, k), v)
                    for k, v in values.items()
                }
            )
        return cls(
            profile=str(d.get("profile", "cpu")),
            method=str(d.get("method", "med_dual_lora")),
            seed=_coerce("seed", "int", d.get("seed", 0)),
            **built,
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
        "fed": {"num_rounds": 2, "allow_single_class": True},
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
        "data": {
            "image_size": (192, 192, 16),
            "spacing": (1.0, 1.0, 10.0),
            "crop": "shift_inside",
            "intensity": "per_frame",
            "augment": True,
        },
        "model": {"size": "base", "pretrained": "hub", "drop_path": 0.1},
        # CineMA's fine-tuning recipe (medlora_lib.recipe; its classification configs)
        "train": {
            "local_epochs": 1,
            "batch_size": 8,
            "schedule": "warmup_cosine",
            "layer_decay": 0.75,
            "selection_metric": "mcc",
            "patience": 5,
            "amp": "auto",
            "grad_checkpointing": True,
            "optimizer_state": "private",
        },
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


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "adapter": AdapterSection,
    "train": TrainConfig,
    "fed": FedConfig,
    "privacy": PrivacyConfig,
}
_TOP_LEVEL = ("profile", "method", "seed")

#: Fields that change how a run is carried out, not what it computes: left out of
#: :func:`config_hash` (the cache key) and of the resume check.
OPERATIONAL_KEYS: tuple[str, ...] = (
    "fed.min_sites",
    "fed.num_sites",
    "fed.round_timeout",
    "fed.connect_timeout",
    "fed.allow_single_class",
)


def _all_keys() -> list[str]:
    keys = list(_TOP_LEVEL)
    for name, klass in _SECTIONS.items():
        keys += [f"{name}.{f.name}" for f in dataclasses.fields(klass)]
    return keys


def _nearest(key: str, candidates: list[str]) -> str:
    import difflib

    norm = {c.replace("-", "_"): c for c in candidates}
    hit = difflib.get_close_matches(key.replace("-", "_"), list(norm), n=1, cutoff=0.5)
    return f"; did you mean `{norm[hit[0]]}`?" if hit else ""


def _check_names(section: str, klass: type, values: dict[str, Any]) -> None:
    names = [f.name for f in dataclasses.fields(klass)]
    for k in values:
        if k not in names:
            raise ConfigError(
                f"config field `{section}.{k}` does not exist"
                + _nearest(f"{section}.{k}", [f"{section}.{n}" for n in names])
                + f" (`{section}` has {', '.join(names)})"
            )


def _field_type(klass: type, name: str) -> str:
    for f in dataclasses.fields(klass):
        if f.name == name:
            return str(f.type)
    raise KeyError(name)  # pragma: no cover - names are checked first


def _coerce(key: str, typ: str, value: Any) -> Any:
    """``value`` converted to the field's type ``typ`` (the annotation as a string).

    Accepts what a command line or a Flower run config can hold: numbers as strings,
    lists as comma-separated strings, ``""`` / ``"none"`` for an optional value.

    Raises:
        ConfigError: the value does not fit (the message names the field).
    """

    def bad(what: str) -> ConfigError:
        return ConfigError(f"config field `{key}`: expected {what}, got {value!r}")

    optional = "None" in typ
    if optional and (value is None or value == "" or str(value).lower() == "none"):
        return None
    base = typ.replace(" | None", "").strip()
    if base.startswith("Literal"):
        return str(value)
    if base == "bool":
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes"):
            return True
        if str(value).lower() in ("false", "0", "no"):
            return False
        raise bad("true or false")
    if base == "int":
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value))
        except ValueError:
            raise bad("an integer") from None
    if base == "float":
        if isinstance(value, bool):
            raise bad("a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad("a number") from None
    if base == "str":
        if isinstance(value, dict | list | tuple):
            raise bad("a string")
        return str(value)
    if base.startswith("dict"):
        if isinstance(value, str):
            try:
                value = json.loads(value or "{}")
            except json.JSONDecodeError:
                raise bad("a JSON object") from None
        if not isinstance(value, dict):
            raise bad("a JSON object")
        return value
    if base.startswith("tuple") or "tuple" in base:
        items: Any = value
        if isinstance(value, str):
            s = value.strip().strip("[]()")
            if (
                "tuple" in base
                and base.startswith("str |")
                and not ("," in s or s.lstrip("-").isdigit())
            ):
                return value  # e.g. adapter.adapted_blocks="last2"
            items = [v.strip().strip("'\"") for v in s.split(",") if v.strip()]
        elif isinstance(value, int | float) and not isinstance(value, bool):
            items = [value]
        if not isinstance(items, list | tuple):
            raise bad("a list")
        inner = base[base.index("tuple[") + 6 :].split(",")[0].strip().rstrip("]")
        conv = {"int": "int", "float": "float", "str": "str"}.get(inner, "str")
        return tuple(_coerce(key, conv, v) for v in items)
    return value


def get_config(
    profile: str = "cpu",
    overrides: list[str] | dict[str, Any] | None = None,
    **top_level: Any,
) -> ExperimentConfig:
    """Build the config of ``profile`` with overrides applied.

    Args:
        profile: ``smoke``, ``cpu`` (default) or ``paper``.
        overrides: dotted overrides, ``["train.lr=3e-4"]`` or ``{"train.lr": 3e-4}``;
            a field may be spelt with ``-`` as in the Flower run config
            (``fed.num-rounds``).
        **top_level: ``method``, ``seed`` or whole sections (``data={...}``).

    Raises:
        ConfigError: unknown profile, unknown field (with the nearest valid one) or a
            value of the wrong type or range (the message names the field).
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
            items += [(f"{k}.{kk}", vv) for kk, vv in v.items()]
        else:
            items.append((k, v))
    valid = _all_keys()
    for k, v in items:
        k = k.replace("-", "_")
        section = k.split(".")[0]
        if k not in valid:
            if section in _SECTIONS:
                _check_names(section, _SECTIONS[section], {k.split(".", 1)[-1]: v})
            raise ConfigError(
                f"config key `{k}` does not exist"
                + _nearest(k, valid)
                + "; use method, seed, profile or data./model./adapter./train./fed./privacy."
            )
        _set_dotted(tree, k, v)
    return ExperimentConfig.from_dict(tree)


# --------------------------------------------------------------------- Flower run config
def flat_key(key: str) -> str:
    """The Flower run-config spelling of a config key: ``fed.num_rounds`` -> ``fed.num-rounds``."""
    return key.replace("_", "-")


def _flat_value(value: Any) -> bool | int | float | str:
    if value is None:
        return ""
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return json.dumps(value, sort_keys=True)


def _flatten(cfg: ExperimentConfig) -> dict[str, bool | int | float | str]:
    d = asdict(cfg)
    flat: dict[str, bool | int | float | str] = {}
    for k in _TOP_LEVEL:
        flat[k] = _flat_value(d[k])
    for name in _SECTIONS:
        for k, v in d[name].items():
            flat[flat_key(f"{name}.{k}")] = _flat_value(v)
    return flat


def _run_option_keys() -> dict[str, str]:
    return {flat_key(f"run.{f.name}"): f.name for f in dataclasses.fields(RunOptions)}


def run_config_defaults() -> dict[str, bool | int | float | str]:
    """``[tool.flwr.app.config]`` of ``pyproject.toml``: the ``cpu`` profile flattened.

    ``profile-defaults = true`` means: a key left at this value takes the default of
    the chosen ``profile`` (``--run-config "profile='paper'"`` gives the paper's image
    size); a key set to anything else overrides it. ``run.*`` keys are
    :class:`RunOptions`. A test keeps ``pyproject.toml`` equal to this.
    """
    flat: dict[str, bool | int | float | str] = {"profile-defaults": True}
    flat.update(_flatten(get_config("cpu")))
    opts = RunOptions()
    for fk, name in _run_option_keys().items():
        flat[fk] = _flat_value(getattr(opts, name))
    return flat


def to_run_config(
    cfg: ExperimentConfig, options: RunOptions | None = None
) -> dict[str, bool | int | float | str]:
    """``cfg`` (and ``options``) as a complete Flower run config (every key explicit)."""
    flat: dict[str, bool | int | float | str] = {"profile-defaults": False}
    flat.update(_flatten(cfg))
    opts = options or RunOptions()
    for fk, name in _run_option_keys().items():
        flat[fk] = _flat_value(getattr(opts, name))
    return flat


def from_run_config(
    run_config: dict[str, Any],
) -> tuple[ExperimentConfig, RunOptions]:
    """Read a Flower run config (``context.run_config``) back into typed configs.

    Every key must be one of :func:`run_config_defaults`; with ``profile-defaults``
    (the project's default) the keys that still hold the ``cpu`` value take the chosen
    profile's defaults.

    Raises:
        ConfigError: an unknown key (naming the nearest valid one) or a bad value.
    """
    defaults = run_config_defaults()
    unknown = [k for k in run_config if k not in defaults]
    if unknown:
        k = unknown[0]
        raise ConfigError(
            f"run-config key `{k}` does not exist"
            + _nearest(k, list(defaults))
            + " (the keys are those of [tool.flwr.app.config] in pyproject.toml)"
        )
    rc = {**defaults, **run_config}
    opts_kw = {}
    for fk, name in _run_option_keys().items():
        opts_kw[name] = _coerce(
            flat_key(f"run.{name}"), _field_type(RunOptions, name), rc[fk]
        )
    options = RunOptions(**opts_kw)
    _check(
        options.resume in ("auto", "never", "require"),
        "run.resume",
        f"unknown value {options.resume!r}; choose auto, never or require",
    )
    use_profile = _coerce("profile-defaults", "bool", rc["profile-defaults"])
    profile = str(rc["profile"])
    overrides: dict[str, Any] = {}
    for key in _all_keys():
        if key == "profile":
            continue
        fk = flat_key(key)
        if use_profile and rc[fk] == defaults[fk] and key not in ("method", "seed"):
            continue
        overrides[key] = rc[fk]
    method = overrides.pop("method")
    seed = _coerce("seed", "int", overrides.pop("seed"))
    return get_config(profile, overrides=overrides, method=method, seed=seed), options


def config_hash(config: ExperimentConfig | dict[str, Any], length: int = 12) -> str:
    """A short, stable hash of what a config computes (used to cache results).

    :data:`OPERATIONAL_KEYS` (the federation's time-outs and site counts) are left out.
    """
    d = config.to_dict() if isinstance(config, ExperimentConfig) else dict(config)
    d = json.loads(json.dumps(d))
    for key in OPERATIONAL_KEYS:
        section, name = key.split(".")
        d.get(section, {}).pop(name, None)
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


def experiment_of(
    run_config: dict[str, Any], index: int
) -> tuple[ExperimentConfig, RunOptions]:
    """The ``index``-th experiment of a Flower run config.

    A run holds one experiment (its run config), or several listed in ``run.batch``
    (a JSON list of flattened run configs: the book runs many experiments in one Flower
    run so that the Simulation Runtime starts once).

    Raises:
        ConfigError: no such experiment, or a bad key / value in it.
    """
    batch = str(run_config.get("run.batch", "") or "")
    if not batch:
        if index != 0:
            raise ConfigError(f"experiment {index} asked of a run with one experiment")
        return from_run_config(dict(run_config))
    items = json.loads(batch)
    if not 0 <= index < len(items):
        raise ConfigError(f"experiment {index} asked of a batch of {len(items)}")
    return from_run_config(items[index])
