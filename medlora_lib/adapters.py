"""LoRA adapters for the ConvViT with peft: global / local adapters, method-specific freezing.

Explained in the book's chapters ``notebooks/00_foundation_model_and_lora`` (LoRA on chosen
blocks), ``notebooks/03_fedavg_lora`` (what a client sends), ``notebooks/04_med_dual_lora``
(global + local adapters whose outputs add up) and ``notebooks/06_communication_analysis``
(closed-form parameter and byte counts).

The one entry point is :func:`apply_adapters`. It

1. freezes the whole backbone,
2. attaches peft LoRA adapters to ``target_modules`` of the blocks in ``adapted_blocks``
   (``layers_to_transform`` + ``layers_pattern="blocks"``),
3. for ``med_dual_lora`` adds a second adapter ``local`` on the same layers and activates both
   (``model.base_model.set_adapter(["global", "local"])``): their outputs add up,
   ``W = W0 + (alpha/r) B_g A_g + (alpha/r) B_l A_l``,
4. applies the method's freezing rules (FFA-LoRA: ``lora_A`` frozen) and the head policy.

Every parameter then has exactly one *role*: ``shared`` (trained and sent to the server),
``private`` (trained, never leaves the client), ``fixed`` (an adapter tensor that is not trained,
e.g. FFA-LoRA's ``A``, reproduced from the seed on every client and on the server) or ``base``
(the frozen backbone). :func:`get_shared_state`, :func:`get_private_state`,
:func:`trainable_parameter_count` and :func:`proximal_term` all read these roles, so what is
trained, what is sent and what is counted can never disagree.

State-dict names are the model's parameter names without peft's ``base_model.model.`` prefix,
with the adapter name kept, e.g. ``encoder.blocks.5.attn.q.lora_A.global.weight``; the global and
the local adapter can therefore never be confused. Heads keep their own names
(``pred_head_dict.cls.weight``).

The classification head is kept outside peft's ``modules_to_save`` (peft allows that in one
adapter only when several are active); its ``requires_grad`` is set here and its tensors are
handled by the state functions according to ``AdapterConfig.head``.

Choices made here (the paper does not state them; each is a parameter):

* **Head policy** ``head="auto"``: the heads are trained and *shared* for every federated
  method, Med-DualLoRA included, except FedSA-LoRA, whose reference configuration keeps
  its head private with its B; private for ``local``. The diagnosis (healthy vs
  disease) means the same thing at every site, and with the same head policy for every method
  the comparison isolates the adapter design; Med-DualLoRA's personalisation lives in its
  local adapter. ``head="private"`` gives FedPer-style private heads, ``"frozen"`` keeps
  the (pretrained or randomly initialised) heads fixed.
* ``encoder.norm`` and the fusion norm are frozen unless ``train_final_norms=True``; then
  they follow the head policy.
* Adapter names: ``global`` for the federated adapter of every method (FedSA-LoRA's private
  B included), ``local`` for Med-DualLoRA's second adapter and for the ``local`` baseline.
  ``centralized`` shares everything trainable (one pooled model), ``local`` nothing.
* Every ``lora_A`` is drawn from a generator keyed by ``(seed, adapter, module name)``, so
  clients and server built with the same ``seed`` agree bit for bit whatever the global RNG
  state (FFA-LoRA's frozen A relies on it); every ``lora_B`` starts at zero (peft default),
  so a freshly adapted model computes exactly the backbone's function.
"""

from __future__ import annotations

import dataclasses
import math
import re
import weakref
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from medlora_lib.config import LORA_TARGETS, AdapterSection
from medlora_lib.errors import CheckpointError, ConfigError

__all__ = [
    "check_adapter_sum",
    "ADAPTER_INFO_ATTR",
    "GLOBAL_ADAPTER",
    "KNOWN_TARGETS",
    "LOCAL_ADAPTER",
    "METHODS",
    "AdapterConfig",
    "AdapterInfo",
    "MethodSpec",
    "adapter_info",
    "aggregate_shared",
    "apply_adapters",
    "closed_form_lora_params",
    "enforce_trainability",
    "first_adapted_block",
    "get_private_state",
    "get_shared_state",
    "lora_delta",
    "methods_table",
    "parameter_roles",
    "proximal_term",
    "resolve_adapted_blocks",
    "save_local_adapter",
    "set_private_state",
    "set_shared_state",
    "shared_bytes",
    "trainable_parameter_count",
    "unwrap_model",
]

GLOBAL_ADAPTER = "global"
LOCAL_ADAPTER = "local"
KNOWN_TARGETS = LORA_TARGETS
ADAPTER_INFO_ATTR = "_medlora_adapter_info"

MethodName = Literal[
    "local",
    "centralized",
    "fedavg_lora",
    "ffa_lora",
    "fedsa_lora",
    "fedprox_lora",
    "med_dual_lora",
]
HeadPolicy = Literal["auto", "shared", "private", "frozen"]

_PEFT_PREFIX = "base_model.model."
_LORA_RE = re.compile(r"\.lora_(?P<part>[AB])\.(?P<adapter>[^.]+)\.weight$")
_FUSION_NORM_RE = re.compile(r"^enc_fusion_dict\.[^.]+\.norm\.")


# --------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodSpec:
    """What one federated-LoRA method trains, sends and aggregates (one row of the book's table).

    ``shared_parts`` / ``fixed_parts`` name adapter tensors as ``"<adapter>.<A|B>"``; every other
    tensor of an adapter in ``adapters`` is trained and private.
    """

    name: str
    adapters: tuple[str, ...]
    shared_parts: frozenset[str]
    fixed_parts: frozenset[str]
    default_head: Literal["shared", "private", "frozen"]
    federated: bool
    trains: str
    shares: str
    aggregation: str
    description: str
    reference: str
    proximal: bool = False  # the client adds FedProx's term mu/2 ||w - w_t||^2
    pooled: bool = False  # one model on every site's data (no federation)

    @property
    def has_local_adapter(self) -> bool:
        """True when the method keeps a second, private LoRA adapter next to the global one."""
        return LOCAL_ADAPTER in self.adapters and GLOBAL_ADAPTER in self.adapters


def _parts(*names: str) -> frozenset[str]:
    return frozenset(names)


METHODS: dict[str, MethodSpec] = {
    "local": MethodSpec(
        name="local",
        adapters=(LOCAL_ADAPTER,),
        shared_parts=_parts(),
        fixed_parts=_parts(),
        default_head="private",
        federated=False,
        trains="LoRA A, B (+ head)",
        shares="nothing",
        aggregation="none",
        description="Each site fine-tunes alone: the lower bound without collaboration.",
        reference="single-site baseline",
    ),
    "centralized": MethodSpec(
        name="centralized",
        adapters=(GLOBAL_ADAPTER,),
        shared_parts=_parts("global.A", "global.B"),
        fixed_parts=_parts(),
        default_head="shared",
        federated=False,
        trains="LoRA A, B (+ head)",
        shares="all data pooled (not federated)",
        aggregation="none (one model)",
        description="One model on the pooled data: privacy-infeasible upper reference.",
        reference="pooled baseline",
        pooled=True,
    ),
    "fedavg_lora": MethodSpec(
        name="fedavg_lora",
        adapters=(GLOBAL_ADAPTER,),
        shared_parts=_parts("global.A", "global.B"),
        fixed_parts=_parts(),
        default_head="shared",
        federated=True,
        trains="LoRA A, B (+ head)",
        shares="A, B (+ head)",
        aggregation="sample-weighted mean of A and of B separately",
        description="FedAvg on the LoRA factors; mean(B)·mean(A) != mean(BA), so inexact.",
        reference="Zhang et al., FedIT (ICASSP 2024; arXiv 2023)",
    ),
    "ffa_lora": MethodSpec(
        name="ffa_lora",
        adapters=(GLOBAL_ADAPTER,),
        shared_parts=_parts("global.B"),
        fixed_parts=_parts("global.A"),
        default_head="shared",
        federated=True,
        trains="LoRA B only (+ head); A random, frozen, same seed everywhere",
        shares="B (+ head)",
        aggregation="sample-weighted mean of B (exact: A is identical)",
        description="Freezes A from a shared seed: half the traffic, exact averaging.",
        reference="Sun et al., FFA-LoRA (ICLR 2024)",
    ),
    "fedsa_lora": MethodSpec(
        name="fedsa_lora",
        adapters=(GLOBAL_ADAPTER,),
        shared_parts=_parts("global.A"),
        fixed_parts=_parts(),
        default_head="private",  # as in FedSA-LoRA's reference configuration
        federated=True,
        trains="LoRA A, B (+ head)",
        shares="A (head private)",
        aggregation="sample-weighted mean of A; B and the head stay on the client",
        description="A learns shared knowledge, B stays private: structural personalisation.",
        reference="Guo et al., FedSA-LoRA (ICLR 2025)",
    ),
    "fedprox_lora": MethodSpec(
        name="fedprox_lora",
        adapters=(GLOBAL_ADAPTER,),
        shared_parts=_parts("global.A", "global.B"),
        fixed_parts=_parts(),
        default_head="shared",
        federated=True,
        trains="LoRA A, B (+ head) + proximal term mu/2 ||w - w_t||^2 on the shared part",
        shares="A, B (+ head)",
        aggregation="sample-weighted mean of A and of B (as FedAvg)",
        description="FedAvg-LoRA with a proximal term against client drift.",
        reference="Li et al., FedProx (MLSys 2020) applied to LoRA",
        proximal=True,
    ),
    "med_dual_lora": MethodSpec(
        name="med_dual_lora",
        adapters=(GLOBAL_ADAPTER, LOCAL_ADAPTER),
        shared_parts=_parts("global.A", "global.B"),
        fixed_parts=_parts(),
        default_head="shared",
        federated=True,
        trains="global LoRA + local LoRA on the same layers, outputs add (+ head)",
        shares="global A, B only (+ head)",
        aggregation="sample-weighted mean of A_g and of B_g; local adapter stays",
        description="W = W0 + (a/r)B_g A_g + (a/r)B_l A_l; only the global adapter travels.",
        reference="Med-DualLoRA (2026)",
    ),
}


def methods_table() -> Any:
    """The book's table of methods (chapter ``notebooks/03_fedavg_lora``).

    Returns:
        A ``pandas.DataFrame`` with one row per method in :data:`METHODS`.
    """
    import pandas as pd

    rows = [
        {
            "method": s.name,
            "federated": s.federated,
            "trained on the client": s.trains,
            "sent to the server": s.shares,
            "aggregation": s.aggregation,
            "local adapter": s.has_local_adapter,
            "default head": s.default_head,
            "description": s.description,
            "reference": s.reference,
        }
        for s in METHODS.values()
    ]
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------

_BLOCKS_RE = re.compile(r"^(?P<where>last|first)(?P<k>\d+)$")


def _parse_block_spec(spec: Any) -> str | tuple[int, ...]:
    """Normalise ``adapted_blocks`` without knowing the depth (raises ConfigError)."""
    hint = (
        "use 'all', 'lastK' / 'firstK' (K >= 1, e.g. 'last2') or a list of block indices "
        "(negative indices count from the end, e.g. [-2, -1])"
    )
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "all":
            return s
        m = _BLOCKS_RE.match(s)
        if m is None:
            raise ConfigError(
                f"AdapterConfig.adapted_blocks={spec!r} is not understood; {hint}."
            )
        if int(m["k"]) == 0:
            raise ConfigError(
                f"AdapterConfig.adapted_blocks={spec!r} adapts no block; {hint}."
            )
        return s
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = (spec,)
    if isinstance(spec, Sequence):
        idx = []
        for v in spec:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(
                    f"AdapterConfig.adapted_blocks contains {v!r}, not an integer; {hint}."
                )
            idx.append(int(v))
        if not idx:
            raise ConfigError(
                f"AdapterConfig.adapted_blocks is empty: no block adapted; {hint}."
            )
        return tuple(idx)
    raise ConfigError(
        f"AdapterConfig.adapted_blocks={spec!r} has the wrong type; {hint}."
    )


def resolve_adapted_blocks(
    adapted_blocks: str | Sequence[int], depth: int
) -> list[int]:
    """Turn ``adapted_blocks`` into sorted, non-negative block indices for a model of ``depth``.

    Args:
        adapted_blocks: ``"all"``, ``"lastK"``, ``"firstK"`` or a list of indices (negative
            indices count from the end).
        depth: number of transformer blocks of the model.

    Returns:
        Sorted unique indices in ``[0, depth)``.

    Raises:
        ConfigError: no block, an index out of range, a duplicate or K larger than ``depth``.
    """
    spec = _parse_block_spec(adapted_blocks)
    if spec == "all":
        return list(range(depth))
    if isinstance(spec, str):
        m = _BLOCKS_RE.match(spec)
        assert m is not None
        k = int(m["k"])
        if k > depth:
            raise ConfigError(
                f"AdapterConfig.adapted_blocks={adapted_blocks!r} asks for {k} blocks but the "
                f"model has depth {depth}; use at most '{m['where']}{depth}' or 'all'."
            )
        return list(range(depth - k, depth)) if m["where"] == "last" else list(range(k))
    out = []
    for i in spec:
        if not -depth <= i < depth:
            raise ConfigError(
                f"AdapterConfig.adapted_blocks contains block {i}, out of range for a model "
                f"of depth {depth}; use indices in [{-depth}, {depth - 1}]."
            )
        out.append(i % depth)
    if len(set(out)) != len(out):
        raise ConfigError(
            f"AdapterConfig.adapted_blocks={list(spec)} names a block twice (after negative "
            f"indices are resolved against depth {depth}: {out}); list each block once."
        )
    return sorted(out)


def first_adapted_block(config: AdapterConfig, depth: Any) -> int:
    """Index of the first block that carries LoRA = the largest exact prefix-cache start.

    Chapter ``notebooks/05_block_ablation``. Everything before this block is frozen and, without
    augmentation, a fixed function of the input (see ``medlora_lib.models.prefix_cache``).

    Args:
        config: adapter settings.
        depth: number of transformer blocks, or a model / model config to read it from.

    Raises:
        ConfigError: bad ``adapted_blocks`` for this depth.
    """
    if isinstance(depth, nn.Module):
        depth = _model_depth(unwrap_model(depth))
    elif not isinstance(depth, int):
        depth = _model_dims(depth)["depth"]
    return min(resolve_adapted_blocks(config.adapted_blocks, int(depth)))


@dataclass
class AdapterConfig(AdapterSection):
    """LoRA adapter settings (chapter ``notebooks/00_foundation_model_and_lora``).

    The fields and defaults of :class:`medlora_lib.config.AdapterSection` (the
    experiment's ``adapter`` section) plus the ``method``. Validated on creation; the
    block indices are checked against the model's depth when the adapters are applied
    (:func:`resolve_adapted_blocks`).
    """

    method: MethodName = field(
        default="med_dual_lora",
        metadata={"help": "Federated method, one of METHODS (see methods_table())."},
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(
                f"AdapterConfig.method={self.method!r} is unknown; choose one of "
                f"{sorted(METHODS)}."
            )
        for name in ("lora_rank", "local_lora_rank"):
            v = getattr(self, name)
            if v is None and name == "local_lora_rank":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(
                    f"AdapterConfig.{name}={v!r} must be a positive integer (e.g. 8)."
                )
        if not (isinstance(self.lora_alpha, int | float) and self.lora_alpha > 0):
            raise ConfigError(
                f"AdapterConfig.lora_alpha={self.lora_alpha!r} must be a positive number "
                "(e.g. 2 * lora_rank)."
            )
        if not (0.0 <= float(self.lora_dropout) < 1.0):
            raise ConfigError(
                f"AdapterConfig.lora_dropout={self.lora_dropout!r} must be in [0, 1)."
            )
        self.adapted_blocks = _parse_block_spec(self.adapted_blocks)
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        if not self.target_modules:
            raise ConfigError(
                f"AdapterConfig.target_modules is empty; choose some of {KNOWN_TARGETS}."
            )
        unknown = [t for t in self.target_modules if t not in KNOWN_TARGETS]
        if unknown:
            raise ConfigError(
                f"AdapterConfig.target_modules has unknown {unknown}; choose among "
                f"{KNOWN_TARGETS}."
            )
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ConfigError(
                f"AdapterConfig.target_modules={self.target_modules} lists a module twice."
            )
        if self.head not in ("auto", "shared", "private", "frozen"):
            raise ConfigError(
                f"AdapterConfig.head={self.head!r} is unknown; use 'auto', 'shared', "
                "'private' or 'frozen'."
            )
        spec = METHODS[self.method]
        if self.head == "shared" and self.method == "local":
            raise ConfigError(
                "AdapterConfig.head='shared' with method='local': a local model sends nothing; "
                "use head='private' (or 'auto') or 'frozen'."
            )
        if self.head == "private" and self.method == "centralized":
            raise ConfigError(
                "AdapterConfig.head='private' with method='centralized': the pooled model has "
                "no client; use head='shared' (or 'auto') or 'frozen'."
            )
        if self.local_lora_rank is not None and not spec.has_local_adapter:
            raise ConfigError(
                f"AdapterConfig.local_lora_rank is set but method={self.method!r} has no "
                "local adapter; leave it None or use method='med_dual_lora'."
            )

    @property
    def head_policy(self) -> Literal["shared", "private", "frozen"]:
        """The head policy with 'auto' resolved to the method's default."""
        return METHODS[self.method].default_head if self.head == "auto" else self.head

    def rank_of(self, adapter: str) -> int:
        """LoRA rank of ``adapter`` ('global' or 'local')."""
        if adapter == LOCAL_ADAPTER and self.local_lora_rank is not None:
            return self.local_lora_rank
        return self.lora_rank

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view, saved with every result."""
        d = dataclasses.asdict(self)
        d["adapted_blocks"] = (
            list(self.adapted_blocks)
            if isinstance(self.adapted_blocks, tuple)
            else self.adapted_blocks
        )
        d["target_modules"] = list(self.target_modules)
        return d


@dataclass(frozen=True)
class AdapterInfo:
    """What :func:`apply_adapters` did, stored on the returned model."""

    config: AdapterConfig
    method: str
    seed: int
    depth: int
    blocks: tuple[int, ...]
    adapters: tuple[str, ...]


# --------------------------------------------------------------------------------------
# Wiring
# --------------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """The underlying ConvViT (inside a ``PeftModel`` if adapters were applied)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.base_model.model
    return model


def _model_depth(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    depth = getattr(cfg, "depth", None)
    if depth is None and isinstance(cfg, Mapping):
        depth = cfg.get("depth")
    if depth is None:
        try:
            depth = len(model.encoder.blocks)  # type: ignore[union-attr, arg-type]
        except AttributeError as e:
            raise ConfigError(
                "apply_adapters: the model has neither config.depth nor encoder.blocks; "
                "pass a ConvViT from medlora_lib.models.build_convvit."
            ) from e
    return int(depth)


def _lora_config(config: AdapterConfig, adapter: str, blocks: list[int]) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=config.rank_of(adapter),
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        layers_to_transform=list(blocks),
        layers_pattern="blocks",
        bias="none",
        init_lora_weights=True,
    )


def _seeded_init_lora_a(model: nn.Module, adapter: str, seed: int) -> None:
    """Re-draw every ``lora_A`` of ``adapter`` from a generator keyed by (seed, adapter, module).

    Same distribution as peft's default (kaiming-uniform, a=sqrt(5)), but independent of the
    global RNG and of module creation order, so two clients and the server built with the same
    seed hold bit-identical A matrices (needed by FFA-LoRA, convenient for every method).
    """
    for name, module in unwrap_model(model).named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict) or adapter not in lora_a:
            continue
        weight = lora_a[adapter].weight
        key = zlib.crc32(f"{seed}/{adapter}/{name}".encode())
        gen = torch.Generator(device="cpu").manual_seed(key)
        fresh = torch.empty(weight.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=gen)
        with torch.no_grad():
            weight.copy_(fresh.to(dtype=weight.dtype, device=weight.device))


def apply_adapters(
    model: nn.Module,
    config: AdapterConfig,
    method: str | None = None,
    seed: int = 0,
) -> nn.Module:
    """Freeze ``model`` and attach the method's LoRA adapters with peft.

    Chapters ``notebooks/00_foundation_model_and_lora`` and ``notebooks/04_med_dual_lora``.

    Args:
        model: a ConvViT (``medlora_lib.models.build_convvit``); modified in place and wrapped.
        config: adapter settings.
        method: overrides ``config.method`` when given.
        seed: seeds the ``lora_A`` initialisation (``lora_B`` starts at zero), so every client
            and the server built with the same seed start from identical adapters.

    Returns:
        The ``peft.PeftModel``; ``model(x)``, ``model.forward_prefix`` and
        ``model.forward_suffix`` work as on the ConvViT. Its :class:`AdapterInfo` is
        available through :func:`adapter_info`.

    Raises:
        ConfigError: unknown method, bad block selection for this model's depth, or a model
            that already carries adapters.
    """
    from peft import PeftModel, get_peft_model

    already = isinstance(model, PeftModel) or any(
        hasattr(m, "lora_A") for m in model.modules()
    )
    if already:
        raise ConfigError(
            "apply_adapters: this model already has adapters; build a fresh model "
            "(build_convvit + load_pretrained) and apply the adapters once."
        )
    if method is not None and method != config.method:
        config = dataclasses.replace(config, method=method)  # re-validates
    spec = METHODS[config.method]
    depth = _model_depth(model)
    blocks = resolve_adapted_blocks(config.adapted_blocks, depth)

    for p in model.parameters():
        p.requires_grad_(False)
    first, *others = spec.adapters
    peft_model = get_peft_model(
        model, _lora_config(config, first, blocks), adapter_name=first
    )
    for name in others:
        peft_model.add_adapter(name, _lora_config(config, name, blocks))
    for name in spec.adapters:
        _seeded_init_lora_a(peft_model, name, seed)
    info = AdapterInfo(
        config=config,
        method=config.method,
        seed=seed,
        depth=depth,
        blocks=tuple(blocks),
        adapters=spec.adapters,
    )
    object.__setattr__(peft_model, ADAPTER_INFO_ATTR, info)
    enforce_trainability(peft_model)
    return peft_model


def save_local_adapter(model: nn.Module, out_dir: Any) -> list[str]:
    """Write the adapters that stay at the site in PEFT's own format.

    ``PeftModel.save_pretrained(out_dir, selected_adapters=[...])`` for the private
    adapter(s) of the method (Med-DualLoRA's and ``local``'s ``local`` adapter):
    ``adapter_config.json`` + ``adapter_model.safetensors`` per adapter, loadable with
    ``PeftModel.load_adapter``. Chapter ``book/deployment.md``.

    Returns:
        The adapter names written (empty when the method keeps no local adapter).
    """
    info = adapter_info(model)
    names = [a for a in info.adapters if a == LOCAL_ADAPTER]
    if names:
        model.save_pretrained(str(out_dir), selected_adapters=names)
    return names


def adapter_info(model: nn.Module) -> AdapterInfo:
    """The :class:`AdapterInfo` stored by :func:`apply_adapters` (ConfigError if none)."""
    info = model.__dict__.get(ADAPTER_INFO_ATTR)
    if info is None:
        raise ConfigError(
            "this model has no medlora adapters; call medlora_lib.adapters.apply_adapters "
            "(model, AdapterConfig(...)) first."
        )
    return info


def _check_method(model: nn.Module, method: str | None) -> AdapterInfo:
    info = adapter_info(model)
    if method is not None and method != info.method:
        raise ConfigError(
            f"method={method!r} but the adapters were applied for method={info.method!r}; "
            "pass the same method (or None)."
        )
    return info


def _clean(name: str) -> str:
    return name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name


def _role(name: str, info: AdapterInfo) -> str:
    """``shared`` / ``private`` / ``fixed`` / ``base`` for a (clean) parameter name."""
    spec = METHODS[info.method]
    m = _LORA_RE.search(name)
    if m is not None:
        part = f"{m['adapter']}.{m['part']}"
        if m["adapter"] not in info.adapters:
            return "base"
        if part in spec.fixed_parts:
            return "fixed"
        return "shared" if part in spec.shared_parts else "private"
    is_head = name.startswith("pred_head_dict.")
    if info.config.train_final_norms and (
        name.startswith("encoder.norm.") or _FUSION_NORM_RE.match(name)
    ):
        is_head = True
    if is_head:
        policy = info.config.head_policy
        return "base" if policy == "frozen" else policy
    return "base"


def _named_params(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    for name, p in model.named_parameters():
        yield _clean(name), p


#: model -> (its AdapterInfo, role -> {clean name: parameter}), built once per
#: :func:`apply_adapters` (the info object): the state functions run several times per
#: federated message, and walking the model's modules cost ~4 ms each time
_ROLE_INDEX: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _role_index(
    model: nn.Module, info: AdapterInfo
) -> dict[str, dict[str, nn.Parameter]]:
    """Every parameter of ``model`` by role, in model order (cached per ``info``).

    The adapters and the head are in place once :func:`apply_adapters` (or
    ``fl/export``'s loader) stores ``info``, and nothing adds or replaces a parameter
    afterwards; loading a state copies into the same tensors.
    """
    hit = _ROLE_INDEX.get(model)
    if hit is not None and hit[0] is info:
        return hit[1]
    index: dict[str, dict[str, nn.Parameter]] = {}
    for name, p in _named_params(model):
        index.setdefault(_role(name, info), {})[name] = p
    _ROLE_INDEX[model] = (info, index)
    return index


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """Role of every parameter: ``shared``, ``private``, ``fixed`` or ``base`` (frozen backbone).

    Chapter ``notebooks/04_med_dual_lora``. The state functions, the freezing and the counts all
    derive from these roles.
    """
    info = adapter_info(model)
    return {name: _role(name, info) for name, _ in _named_params(model)}


def enforce_trainability(model: nn.Module) -> None:
    """(Re-)apply the method's freezing: only ``shared`` and ``private`` tensors train.

    Call again after any peft ``set_adapter`` call (peft re-enables ``requires_grad`` on every
    active adapter, which would unfreeze FFA-LoRA's ``A``). Also makes sure all of the method's
    adapters are active.
    """
    info = adapter_info(model)
    base = model.base_model
    if list(base.active_adapters) != list(info.adapters):
        base.set_adapter(list(info.adapters))
    for name, p in _named_params(model):
        p.requires_grad_(_role(name, info) in ("shared", "private"))


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of scalars with ``requires_grad=True`` (chapter ``06_communication_analysis``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------


def _params_with_role(
    model: nn.Module, role: str, method: str | None
) -> dict[str, nn.Parameter]:
    info = _check_method(model, method)
    return dict(_role_index(model, info).get(role, {}))


def _detached(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in params.items()}


def get_shared_state(
    model: nn.Module, method: str | None = None
) -> dict[str, torch.Tensor]:
    """Exactly the tensors a client sends to the server (chapter ``03_fedavg_lora``).

    Args:
        model: a model returned by :func:`apply_adapters`.
        method: must equal the method the adapters were applied for (None = that method).

    Returns:
        Detached CPU clones in model order. Names keep the adapter name
        (``...lora_B.global.weight``); names and shapes are identical on every client. Empty
        for ``local``.
    """
    return _detached(_params_with_role(model, "shared", method))


def get_private_state(
    model: nn.Module, method: str | None = None
) -> dict[str, torch.Tensor]:
    """The trained tensors that never leave the client (local adapter, FedSA's B, private head).

    Keep them in Flower's ``context.state`` between rounds (chapter ``04_med_dual_lora``).
    """
    return _detached(_params_with_role(model, "private", method))


def _load_strict(
    model: nn.Module, state: Mapping[str, torch.Tensor], role: str, method: str | None
) -> None:
    params = _params_with_role(model, role, method)
    missing = [k for k in params if k not in state]
    unexpected = [k for k in state if k not in params]
    if missing or unexpected:
        raise CheckpointError(
            f"the {role} state does not match this model's {role} tensors for method "
            f"{adapter_info(model).method!r}: missing {missing[:5]}"
            f"{' …' if len(missing) > 5 else ''} ({len(missing)}), unexpected "
            f"{unexpected[:5]}{' …' if len(unexpected) > 5 else ''} ({len(unexpected)}); "
            "build the model with the same AdapterConfig and method as the sender."
        )
    for k, p in params.items():
        t = torch.as_tensor(state[k])
        if tuple(t.shape) != tuple(p.shape):
            raise CheckpointError(
                f"{role} tensor {k!r} has shape {tuple(t.shape)}, the model expects "
                f"{tuple(p.shape)}; use the same lora_rank / model size as the sender."
            )
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(torch.as_tensor(state[k]).to(device=p.device, dtype=p.dtype))


def set_shared_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], method: str | None = None
) -> None:
    """Load the shared tensors (e.g. the server's aggregate) into ``model``, strictly.

    Raises:
        CheckpointError: a key is missing or unexpected, or a shape differs.
    """
    _load_strict(model, state, "shared", method)


def set_private_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], method: str | None = None
) -> None:
    """Load the client's private tensors (from :func:`get_private_state`), strictly.

    Raises:
        CheckpointError: a key is missing or unexpected, or a shape differs.
    """
    _load_strict(model, state, "private", method)


def aggregate_shared(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Weighted average of the clients' shared states (FedAvg; chapter ``03_fedavg_lora``).

    Each tensor is averaged separately (for FedAvg-LoRA: mean of A and mean of B). Computed in
    float64, returned in the input dtype, in the key order of the first state.

    Args:
        states: one shared state per client (identical keys and shapes).
        weights: non-negative weights, typically the clients' numbers of training samples.

    Raises:
        ConfigError: no state, mismatched lengths, keys or shapes, or bad weights.
    """
    if len(states) == 0:
        raise ConfigError("aggregate_shared: no client state given; pass at least one.")
    if len(weights) != len(states):
        raise ConfigError(
            f"aggregate_shared: {len(states)} states but {len(weights)} weights; pass one "
            "weight (number of samples) per state."
        )
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if not torch.isfinite(w).all() or (w < 0).any() or float(w.sum()) <= 0:
        raise ConfigError(
            f"aggregate_shared: weights {list(weights)} must be finite, >= 0 and not all 0."
        )
    w = w / w.sum()
    keys = list(states[0].keys())
    for i, s in enumerate(states[1:], start=1):
        if list(s.keys()) != keys:
            diff = sorted(set(s.keys()) ^ set(keys))
            raise ConfigError(
                f"aggregate_shared: state {i} has different keys than state 0 (differences: "
                f"{diff[:5]}; or a different order); all clients must use the same "
                "AdapterConfig and method."
            )
    out: dict[str, torch.Tensor] = {}
    for k in keys:
        ref = states[0][k]
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for wi, s in zip(w, states, strict=True):
            t = s[k]
            if t.shape != ref.shape:
                raise ConfigError(
                    f"aggregate_shared: tensor {k!r} has shape {tuple(t.shape)} in one state "
                    f"and {tuple(ref.shape)} in another; use the same lora_rank everywhere."
                )
            acc += wi * t.detach().to("cpu", torch.float64)
        out[k] = acc.to(ref.dtype)
    return out


def proximal_term(
    model: nn.Module,
    reference_shared: Mapping[str, torch.Tensor],
    mu: float,
    method: str | None = None,
) -> torch.Tensor:
    """FedProx's ``mu/2 * ||w - w_t||^2`` over the shared tensors (chapter ``03_fedavg_lora``).

    Args:
        model: the client model.
        reference_shared: the shared state received at the start of the round.
        mu: proximal coefficient (0 gives a zero tensor).
        method: as in :func:`get_shared_state`.

    Returns:
        A scalar tensor on the model's device, differentiable w.r.t. the shared tensors.

    Raises:
        CheckpointError: ``reference_shared`` does not hold exactly the shared tensors.
    """
    params = _params_with_role(model, "shared", method)
    if set(params) != set(reference_shared):
        missing = sorted(set(params) - set(reference_shared))
        unexpected = sorted(set(reference_shared) - set(params))
        raise CheckpointError(
            f"proximal_term: reference state does not match the shared tensors (missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}); pass get_shared_state(model) as "
            "received at the start of the round."
        )
    device = next(iter(params.values())).device if params else torch.device("cpu")
    total = torch.zeros((), device=device)
    if mu == 0 or not params:
        return total
    for k, p in params.items():
        ref = reference_shared[k].to(device=p.device, dtype=p.dtype)
        total = total + (p - ref).pow(2).sum()
    return 0.5 * mu * total


def lora_delta(model: nn.Module, adapter_name: str, module_name: str) -> torch.Tensor:
    """The weight update ``(alpha/r) B A`` of one adapter on one linear (``(d_out, d_in)``).

    Chapter ``00_foundation_model_and_lora``. ``module_name`` is e.g.
    ``"encoder.blocks.5.attn.q"``.

    Raises:
        ConfigError: the module has no LoRA adapter of that name.
    """
    try:
        module = unwrap_model(model).get_submodule(module_name)
    except AttributeError as e:
        raise ConfigError(
            f"lora_delta: the model has no module {module_name!r}."
        ) from e
    lora_a = getattr(module, "lora_A", None)
    if not isinstance(lora_a, nn.ModuleDict) or adapter_name not in lora_a:
        raise ConfigError(
            f"lora_delta: {module_name!r} has no LoRA adapter {adapter_name!r}; adapted "
            "modules are the target_modules of the adapted_blocks."
        )
    a = lora_a[adapter_name].weight
    b = module.lora_B[adapter_name].weight
    return module.scaling[adapter_name] * (b @ a)


def check_adapter_sum(
    model: nn.Module,
    module_suffix: str = "attn.q",
    n_inputs: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Check on one adapted linear that its output is the frozen layer plus every
    adapter's update: ``h = W0 x + b + sum_k (alpha/r) B_k A_k x``.

    Chapters ``00_foundation_model_and_lora`` and ``04_med_dual_lora``: for Med-DualLoRA
    the global and the local adapter are both active and their outputs add. The module
    is the last adapted one whose name ends with ``module_suffix``; the inputs are
    ``n_inputs`` Gaussian rows from a generator seeded by ``seed``. A freshly built
    model has ``B = 0`` (its updates vanish); the check holds either way.

    Returns:
        ``module`` (name without peft's prefix), ``adapters`` (names on it),
        ``active`` (peft's active adapters), ``max_abs_error`` of the sum, and
        ``update_norms`` (``||Δ_k x||`` per adapter, to see that they are not zero).

    Raises:
        ConfigError: no adapted module ends with ``module_suffix``.
    """
    base = unwrap_model(model)
    names = [
        n
        for n, m in base.named_modules()
        if n.endswith(module_suffix)
        and isinstance(getattr(m, "lora_A", None), nn.ModuleDict)
    ]
    if not names:
        raise ConfigError(
            f"check_adapter_sum: no adapted module ends with {module_suffix!r}; adapted "
            "modules are the target_modules of the adapted_blocks"
        )
    name = names[-1]
    layer = base.get_submodule(name)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_inputs, layer.in_features, generator=gen)
    adapters = sorted(layer.lora_A.keys())
    active = list(getattr(layer, "active_adapters", adapters))
    with torch.no_grad():
        h = layer(x)
        frozen = layer.base_layer(x)
        updates = {a: x @ lora_delta(model, a, name).T for a in active}
        err = (h - (frozen + sum(updates.values()))).abs().max().item()
    return {
        "module": name,
        "adapters": adapters,
        "active": active,
        "max_abs_error": float(err),
        "update_norms": {a: float(u.norm()) for a, u in updates.items()},
    }


# --------------------------------------------------------------------------------------
# Closed-form counts
# --------------------------------------------------------------------------------------


def _cfg_get(model_config: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        if isinstance(model_config, Mapping) and n in model_config:
            return model_config[n]
        if hasattr(model_config, n):
            return getattr(model_config, n)
    return default


def _model_dims(model_config: Any) -> dict[str, int]:
    embed = _cfg_get(model_config, "embed_dim", "enc_embed_dim", "hidden_size")
    depth = _cfg_get(model_config, "depth", "enc_depth")
    if embed is None or depth is None:
        raise ConfigError(
            "closed_form_lora_params: model_config needs 'embed_dim' and 'depth' (pass "
            "model.config of a ConvViT)."
        )
    ratio = _cfg_get(model_config, "mlp_ratio", default=4.0)
    hidden = _cfg_get(model_config, "mlp_hidden_dim", default=None)
    if hidden is None:
        hidden = int(embed * ratio)
    classes = _cfg_get(model_config, "num_classes", "out_chans", default=2)
    views = _cfg_get(model_config, "views", default=("sax",))
    n_views = 1 if isinstance(views, str) else len(views)
    return {
        "embed_dim": int(embed),
        "depth": int(depth),
        "mlp_hidden_dim": int(hidden),
        "num_classes": int(classes),
        "num_views": int(n_views),
    }


def closed_form_lora_params(
    config: AdapterConfig, model_config: Any, method: str | None = None
) -> dict[str, Any]:
    """Parameter counts from the formulas, without building a model (chapter ``06``).

    A LoRA adapter of rank r on a linear ``d_in -> d_out`` has ``r * (d_in + d_out)``
    parameters (A: ``r x d_in``, B: ``d_out x r``). Per block: q ``C->C``, kv ``C->2C``,
    proj ``C->C``, fc1 ``C->hC``, fc2 ``hC->C``. Heads: ``pred_head_dict.sax`` and ``.cls``,
    each ``C*K + K``.

    Args:
        config: adapter settings.
        model_config: the ConvViT config (``model.config``) or a mapping with ``embed_dim``,
            ``depth``, ``mlp_ratio``, ``num_classes``.
        method: overrides ``config.method``.

    Returns:
        A dict with ``blocks``, ``per_block`` (per target, global rank), ``lora_A`` /
        ``lora_B`` / ``total`` per adapter (``adapters``), ``head`` (head + trained norms,
        0 if frozen), and the totals ``trainable``, ``shared``, ``private``, ``fixed``.
    """
    if method is not None and method != config.method:
        config = dataclasses.replace(config, method=method)
    spec = METHODS[config.method]
    d = _model_dims(model_config)
    c, h = d["embed_dim"], d["mlp_hidden_dim"]
    shapes = {
        "attn.q": (c, c),
        "attn.kv": (c, 2 * c),
        "attn.proj": (c, c),
        "mlp.fc1": (c, h),
        "mlp.fc2": (h, c),
    }
    blocks = resolve_adapted_blocks(config.adapted_blocks, d["depth"])
    nb = len(blocks)
    adapters: dict[str, dict[str, int]] = {}
    for a in spec.adapters:
        r = config.rank_of(a)
        n_a = nb * sum(r * shapes[t][0] for t in config.target_modules)
        n_b = nb * sum(r * shapes[t][1] for t in config.target_modules)
        adapters[a] = {"lora_A": n_a, "lora_B": n_b, "total": n_a + n_b}
    head = 2 * (c * d["num_classes"] + d["num_classes"])
    if config.train_final_norms:
        head += 2 * c * (1 + d["num_views"])
    policy = config.head_policy
    counts = {"shared": 0, "private": 0, "fixed": 0}
    for a, n in adapters.items():
        for part, key in (("A", "lora_A"), ("B", "lora_B")):
            tag = f"{a}.{part}"
            role = (
                "fixed"
                if tag in spec.fixed_parts
                else "shared"
                if tag in spec.shared_parts
                else "private"
            )
            counts[role] += n[key]
    if policy != "frozen":
        counts[policy] += head
    return {
        "method": config.method,
        "blocks": blocks,
        "per_block": {
            t: config.lora_rank * (shapes[t][0] + shapes[t][1])
            for t in config.target_modules
        },
        "adapters": adapters,
        "head": head if policy != "frozen" else 0,
        "trainable": counts["shared"] + counts["private"],
        "shared": counts["shared"],
        "private": counts["private"],
        "fixed": counts["fixed"],
    }


def shared_bytes(
    config: AdapterConfig,
    model_config: Any,
    method: str | None = None,
    bytes_per_value: int = 4,
) -> int:
    """Bytes one client sends per round (= bytes it receives), from the closed form.

    Chapter ``06_communication_analysis``. ``bytes_per_value`` is 4 for float32, 2 for
    float16/bfloat16. Payload only: no message framing.
    """
    return closed_form_lora_params(config, model_config, method)["shared"] * int(
        bytes_per_value
    )
