"""What one site does in one round, shared by the Flower apps and the in-process runner.

Chapters ``notebooks/03_fedavg_lora`` (the federated loop) and ``notebooks/04_med_dual_lora``
(global + local adapters, what stays at the site).

A :class:`ClientRuntime` holds one site's model (frozen backbone + the method's adapters)
and its data (the frozen-prefix cache when ``train.use_prefix_cache`` allows it and
there is no augmentation). It is built once per process and experiment (:func:`get_runtime`) and kept in process
memory; the trainable tensors are overwritten from the message (shared) and from the
site's private state at the start of every call, so reusing it never leaks state between
rounds, and a fresh process (Deployment Runtime) simply rebuilds it.

Memory (``book/gpu_colab.md``, "Memory"): a simulation process serves whichever site a
message names, so what it keeps of the *other* sites (their models, arrays and
prefix-cache entries) is bounded by :func:`site_cache_bytes` (``MEDLORA_SITE_CACHE_GB``,
default 0.5 GB): least recently served first, they are dropped and rebuilt when needed
(same seeds, same numbers). A new experiment drops the previous one's runtimes.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from medlora_lib.config import ExperimentConfig
from medlora_lib.errors import ConfigError, DataError

__all__ = [
    "FEDERATED_METHODS",
    "INPROCESS_METHODS",
    "ClientRuntime",
    "RoundOutput",
    "build_adapted_model",
    "get_runtime",
    "round_seed",
    "validate_config",
    "clear_runtime_cache",
    "site_cache_bytes",
    "held_bytes",
    "trim_caches",
]


#: Methods that run through Flower (a server aggregates what clients send).
def _registry() -> Any:
    from medlora_lib.adapters import METHODS

    return METHODS


FEDERATED_METHODS = tuple(n for n, m in _registry().items() if m.federated)
#: Methods that run in-process (no server): same loop, same evaluation.
INPROCESS_METHODS = tuple(n for n, m in _registry().items() if not m.federated)


def round_seed(seed: int, site: str, rnd: int) -> int:
    """The torch seed of ``site`` in round ``rnd``: the same in every runtime (keyed by
    the site's name, not by a SuperNode's position)."""
    return zlib.crc32(f"medlora/{seed}/{site}/{rnd}".encode()) & 0x7FFFFFFF


def build_adapted_model(cfg: ExperimentConfig, method: str | None = None) -> nn.Module:
    """The config's ConvViT (weights loaded) with the method's adapters.

    The backbone is built under ``torch.manual_seed(cfg.seed)`` so that with
    ``model.pretrained="none"`` every client and the server hold the same random backbone;
    every ``lora_A`` is seeded by :func:`medlora_lib.adapters.apply_adapters`.
    """
    from medlora_lib.adapters import apply_adapters
    from medlora_lib.pipeline import adapter_config, build_model

    method = method or cfg.method
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model, _ = build_model(cfg)
    return apply_adapters(model, adapter_config(cfg, method), method, seed=cfg.seed)


def validate_config(cfg: ExperimentConfig) -> None:
    """Refuse a config that cannot run, before anything starts.

    Raises:
        ConfigError: unknown method, rank <= 0, no adapted block, blocks out of range
            for the model depth, or DP-SGD without a guarantee
            (:func:`medlora_lib.privacy.dp_sgd.check_dp_sgd`).
    """
    from medlora_lib.adapters import METHODS, resolve_adapted_blocks
    from medlora_lib.pipeline import adapter_config

    if cfg.method not in METHODS:
        raise ConfigError(
            f"config field `method`: unknown method {cfg.method!r}; choose one of "
            f"{', '.join(METHODS)}"
        )
    acfg = adapter_config(cfg)  # validates rank, alpha, blocks syntax, targets
    from medlora_lib.models.convvit import SIZES

    depth = int(cfg.model.overrides.get("depth", SIZES[cfg.model.size]["depth"]))
    resolve_adapted_blocks(acfg.adapted_blocks, depth)
    if cfg.privacy.dp_sgd:
        from medlora_lib.privacy.dp_sgd import check_dp_sgd

        check_dp_sgd(cfg)
    if cfg.privacy.site_dp != "off":  # before Flower starts, not inside the ServerApp
        from medlora_lib.fl.site_dp import check_site_dp_budget

        check_site_dp_budget(cfg)


_SAID: set[str] = set()


def _say_once(text: str) -> None:
    if text not in _SAID:
        _SAID.add(text)
        print(text, flush=True)


#: (experiment, site) -> runtime, least recently served first.
_RUNTIMES: dict[tuple[str, str], ClientRuntime] = {}
#: prefix-cache key -> cached inputs, least recently used first.
_PREFIX_CACHE: dict[str, Any] = {}
SITE_CACHE_ENV = "MEDLORA_SITE_CACHE_GB"
#: keeps a whole cpu-profile federation (at most ~50 MB a site: small FM, 48x48x8 arrays
#: and their prefix cache) and lets the paper protocol
#: fit 12 GB of host RAM on one GPU (benchmarks/bench_memory.py)
_DEFAULT_SITE_CACHE_GB = 0.5


def clear_runtime_cache() -> None:
    """Forget every runtime and prefix cache held by this process."""
    _RUNTIMES.clear()
    _PREFIX_CACHE.clear()
    _release_memory()


def site_cache_bytes() -> int:
    """How many bytes a process may keep of sites it is not serving right now.

    ``MEDLORA_SITE_CACHE_GB`` (decimal GB, default 0.5): models, arrays and
    prefix-cache entries of the other sites of the experiment (and prefix-cache entries
    of earlier experiments that a later one may reuse). ``0`` keeps only the site being
    served. A cpu-profile federation fits whole; a CineMA-base site does not (4.7 MB of
    arrays per subject, 14 MB as prefix cache).

    Raises:
        ConfigError: the variable is not a number >= 0.
    """
    text = os.environ.get(SITE_CACHE_ENV, "")
    try:
        gb = float(text) if text.strip() else _DEFAULT_SITE_CACHE_GB
    except ValueError:
        gb = -1.0
    if not gb >= 0:
        raise ConfigError(
            f"environment variable {SITE_CACHE_ENV}={text!r}: expected a number of GB "
            f">= 0 (e.g. {SITE_CACHE_ENV}=0.5; 0 keeps only the site being served)"
        )
    return int(gb * 1e9)


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, nn.Module):
        return [*obj.parameters(), *obj.buffers()]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in _tensors(v)]
    if isinstance(obj, ClientRuntime):
        if obj._held is None:
            obj._held = _tensors(
                [obj.model, obj.train_inputs, obj.train_labels, obj.eval_sets]
            )
        return obj._held
    return []


def held_bytes(*objs: Any) -> int:
    """Bytes of the distinct tensor storages reachable from ``objs`` (runtimes, prefix
    cache entries, dicts of tensors): a storage shared by several counts once."""
    seen: dict[tuple[str, int], int] = {}
    for t in _tensors(list(objs)):
        st = t.untyped_storage()
        seen[(str(t.device), st.data_ptr())] = st.nbytes()
    return sum(seen.values())


def _release_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def trim_caches(serving: tuple[str, str] | None = None) -> None:
    """Drop what this process keeps beyond :func:`site_cache_bytes`.

    The runtime ``serving`` (and the prefix-cache entries it uses) always stays. Of the
    rest, prefix-cache entries no runtime uses go first (oldest first), then the least
    recently served runtimes with the entries only they use.
    """
    budget = site_cache_bytes()
    keep = _RUNTIMES.get(serving) if serving is not None else None
    protected = set(keep.prefix_keys) if keep is not None else set()

    def others() -> list[Any]:
        held = [rt for k, rt in _RUNTIMES.items() if k != serving]
        return held + [v for k, v in _PREFIX_CACHE.items() if k not in protected]

    dropped = False
    while held_bytes(*others()) > budget:
        used = {k for rt in _RUNTIMES.values() for k in rt.prefix_keys}
        loose = [k for k in _PREFIX_CACHE if k not in used]
        if loose:
            del _PREFIX_CACHE[loose[0]]
        else:
            victims = [k for k in _RUNTIMES if k != serving]
            if not victims:
                break
            rt = _RUNTIMES.pop(victims[0])
            still = {k for r in _RUNTIMES.values() for k in r.prefix_keys}
            for k in rt.prefix_keys:
                if k not in still:
                    _PREFIX_CACHE.pop(k, None)
            del rt
        dropped = True
    if dropped:
        _release_memory()


@dataclass
class RoundOutput:
    """What a client returns from one training round."""

    shared: dict[str, torch.Tensor]
    private: dict[str, torch.Tensor]
    train_loss: float
    num_examples: int
    seconds: float = 0.0
    #: DP-SGD only (``privacy.dp_sgd``): the ε the site's records have spent so far
    #: (after this round) at ``privacy.delta``, and the JSON state the site keeps with
    #: its private tensors (accountant history, σ, q, steps; chapter ``08_privacy``).
    epsilon: float | None = None
    dp_state: dict[str, Any] | None = None
    #: ``train.optimizer_state`` not ``reset``: AdamW's moments of the tensors the site
    #: keeps (:func:`medlora_lib.recipe.optimizer_state`), saved with its private state.
    optimizer: dict[str, torch.Tensor] | None = None


def _confusion(y: np.ndarray, prob: np.ndarray) -> dict[str, int]:
    pred = (prob >= 0.5).astype(int)
    y = y.astype(int)
    return {
        "tp": int(((pred == 1) & (y == 1)).sum()),
        "tn": int(((pred == 0) & (y == 0)).sum()),
        "fp": int(((pred == 1) & (y == 0)).sum()),
        "fn": int(((pred == 0) & (y == 1)).sum()),
    }


@dataclass
class ClientRuntime:
    """One site's model and data for one experiment (kept in process memory).

    ``site`` is the site this runtime trains for (its name keys the round seeds);
    ``train_inputs`` hold the training data of ``site`` — or of every site for
    ``centralized``, where one runtime stands for the pooled data; ``eval_sets`` are
    the sites it evaluates (its own, or every site for ``centralized``).
    """

    cfg: ExperimentConfig
    site: str
    model: nn.Module
    start_block: int | None
    train_inputs: dict[str, torch.Tensor]
    train_labels: torch.Tensor
    eval_sets: dict[str, dict[str, tuple[dict[str, torch.Tensor], torch.Tensor]]]
    initial_private: dict[str, torch.Tensor]
    device: torch.device
    shared_keys: list[str] = field(default_factory=list)
    private_keys: list[str] = field(default_factory=list)
    #: CineMA's recipe (medlora_lib.recipe): the batch augmentation (data.augment) and
    #: the precision of every step (train.amp)
    augment: Any = None
    precision: Any = None
    #: the ``_PREFIX_CACHE`` entries this runtime's inputs are (freed with it)
    prefix_keys: list[str] = field(default_factory=list)
    #: the tensors it holds, listed once (:func:`held_bytes` runs on every message;
    #: walking the model's modules each time cost ~15 ms a message at the cpu profile)
    _held: list[torch.Tensor] | None = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        cfg: ExperimentConfig,
        sites: dict[str, Any],
        site: str | None = None,
        data_key: str = "",
    ) -> ClientRuntime:
        """Build the runtime of ``site`` (``None``: one pooled runtime over ``sites``).

        Args:
            cfg: the experiment.
            sites: ``{site: ClientData}`` already loaded (only what this runtime needs).
            site: the site to train for; ``None`` pools every site (``centralized``).
            data_key: identifies the data folder in the prefix-cache key.
        """
        from medlora_lib.adapters import (
            first_adapted_block,
            get_private_state,
            get_shared_state,
        )
        from medlora_lib.train import resolve_device

        if cfg.train.num_threads > 0:
            torch.set_num_threads(cfg.train.num_threads)
        names = list(sites) if site is None else [site]
        missing = [n for n in names if n not in sites or "train" not in sites[n].splits]
        if missing:
            raise DataError(
                f"site(s) {missing} have no training split; check manifest.csv"
            )
        from medlora_lib.recipe import (
            BatchAugmenter,
            resolve_precision,
            set_grad_checkpointing,
        )

        model = build_adapted_model(cfg)
        device = resolve_device(cfg.train.device)
        use_cache = cfg.uses_prefix_cache
        start = first_adapted_block(cfg.adapter_config(), model) if use_cache else None
        set_grad_checkpointing(model, cfg.train.grad_checkpointing)
        if cfg.data.augment and cfg.train.use_prefix_cache == "auto":
            _say_once(
                "data.augment=true: the frozen-prefix cache is off (an augmented "
                "subject's prefix output changes every epoch), so every step runs the "
                "whole model"
            )
        model.eval()
        used: list[str] = []

        def inputs(name: str, split: str) -> dict[str, torch.Tensor]:
            x = sites[name].splits[split][0]
            if start is None:
                return {"image": x}
            key = json.dumps(
                [
                    cfg.model.__dict__,
                    cfg.data.image_size,
                    data_key,
                    cfg.seed if cfg.model.pretrained == "none" else None,
                    start,
                    name,
                    split,
                    # the subjects themselves (a site's split depends on partition_by)
                    zlib.crc32("\n".join(sites[name].subjects[split]).encode()),
                    int(x.shape[0]),
                ],
                default=str,
                sort_keys=True,
            )
            if key not in _PREFIX_CACHE:
                from medlora_lib.models.prefix_cache import build_prefix_cache

                _PREFIX_CACHE[key] = build_prefix_cache(
                    model, x, start, batch_size=max(cfg.train.batch_size, 32)
                ).as_inputs()
            _PREFIX_CACHE[key] = _PREFIX_CACHE.pop(key)  # most recently used last
            used.append(key)
            return _PREFIX_CACHE[key]

        tr = [inputs(n, "train") for n in names]
        # one site: its arrays (or cache entry) as they are, not a concatenated copy
        train_inputs = (
            dict(tr[0])
            if len(tr) == 1
            else {k: torch.cat([t[k] for t in tr]) for k in tr[0]}
        )
        train_labels = torch.cat([sites[n].splits["train"][1] for n in names])
        eval_sets = {
            n: {
                s: (inputs(n, s), sites[n].splits[s][1])
                for s in ("val", "test")
                if s in sites[n].splits
            }
            for n in names
        }
        model.to(device)
        return cls(
            cfg=cfg,
            site=site if site is not None else "pooled",
            model=model,
            start_block=start,
            train_inputs=train_inputs,
            train_labels=train_labels,
            eval_sets=eval_sets,
            initial_private=get_private_state(model),
            device=device,
            shared_keys=list(get_shared_state(model)),
            private_keys=list(get_private_state(model)),
            augment=BatchAugmenter(cfg.data.spacing) if cfg.data.augment else None,
            precision=resolve_precision(cfg.train.amp, device),
            prefix_keys=used,
        )

    # ------------------------------------------------------------------ helpers
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.start_block is None:
            return self.model(batch["image"])
        return self.model.forward_suffix(batch, self.start_block)

    def load(
        self,
        shared: dict[str, torch.Tensor],
        private: dict[str, torch.Tensor] | None,
    ) -> None:
        """Put the received shared tensors and the client's private tensors in the model."""
        from medlora_lib.adapters import set_private_state, set_shared_state

        set_shared_state(self.model, shared)
        set_private_state(
            self.model, self.initial_private if private is None else private
        )

    # ------------------------------------------------------------------ train
    def kept_optimizer_names(self) -> list[str]:
        """The tensors whose AdamW moments cross rounds (``train.optimizer_state``):
        none (``reset``), the private ones (``private``; every tensor for a method
        without a server), or every trainable one (``all``)."""
        from medlora_lib.adapters import METHODS, _named_params

        mode = self.cfg.train.optimizer_state
        trainable = [n for n, p in _named_params(self.model) if p.requires_grad]
        if mode == "reset":
            return []
        if mode == "all" or not METHODS[self.cfg.method].federated:
            return trainable
        return [n for n in trainable if n in set(self.private_keys)]

    def train_round(
        self,
        shared: dict[str, torch.Tensor],
        private: dict[str, torch.Tensor] | None,
        rnd: int,
        proximal_mu: float = 0.0,
        lr: float | None = None,
        dp_state: dict[str, Any] | None = None,
        fresh_randomness: bool = False,
        optimizer_state: dict[str, torch.Tensor] | None = None,
    ) -> RoundOutput:
        """Load state, train ``train.local_epochs`` epochs, return the new state.

        The random state (batch order, dropout, augmentation) is seeded by
        :func:`round_seed` ``(seed, site, rnd)``. ``lr`` is the server's base rate of
        the round (default ``train.lr``); CineMA's recipe (:mod:`medlora_lib.recipe`)
        applies as configured: the schedule over the federation's steps
        (``train.schedule``; this round covers ``(rnd - 1, rnd] / fed.num_rounds``),
        layer-wise decay, augmentation, mixed precision. The optimiser (AdamW) starts
        afresh every round unless ``train.optimizer_state`` keeps the moments of some
        tensors: they come in as ``optimizer_state`` (the site's saved state) and go out
        in :attr:`RoundOutput.optimizer`, never in a message.

        With ``privacy.dp_sgd`` the epochs are DP-SGD
        (:func:`medlora_lib.privacy.dp_sgd.train_dp_sgd`: Poisson-sampled batches,
        per-sample clipping instead of ``train.grad_clip``, Gaussian noise, FedProx's
        term added after the DP step, fp32), continuing the site's accountant from
        ``dp_state``; ``fresh_randomness`` (a deployed site) draws its batches and
        noise from the OS instead of the round seed. Without it nothing changes.
        """
        import time

        from medlora_lib.adapters import (
            _named_params,
            get_private_state,
            get_shared_state,
            proximal_term,
        )
        from medlora_lib.recipe import (
            load_optimizer_state,
            lr_at,
            model_depth,
            set_lr,
        )
        from medlora_lib.recipe import optimizer_state as export_optimizer
        from medlora_lib.train import class_weights, make_optimizer, train_one_epoch

        t0 = time.perf_counter()
        cfg = self.cfg
        self.load(shared, private)
        seed = round_seed(cfg.seed, self.site, rnd)
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        if self.augment is not None:
            self.augment.seed(seed)
        named = [(n, p) for n, p in _named_params(self.model) if p.requires_grad]
        params = [p for _, p in named]
        optimizer = make_optimizer(named, cfg.train, model_depth(self.model))
        keep = self.kept_optimizer_names()
        if keep:
            load_optimizer_state(
                optimizer, [(n, p) for n, p in named if n in set(keep)], optimizer_state
            )
        base_lr = float(cfg.train.lr if lr is None else lr)
        total = max(int(cfg.fed.num_rounds), 1)

        def schedule(done: float) -> None:  # done: fraction of this round
            set_lr(optimizer, lr_at((rnd - 1 + done) / total, base_lr, cfg.train))

        schedule(0.0)
        weight = (
            class_weights(self.train_labels)
            if cfg.train.class_weighting == "balanced"
            else None
        )
        loss_fn = nn.CrossEntropyLoss(
            weight=weight.to(self.device) if weight is not None else None,
            label_smoothing=cfg.train.label_smoothing,
        )
        extra = None
        if proximal_mu > 0 and shared:
            ref = {k: v.to(self.device) for k, v in shared.items()}

            def extra() -> torch.Tensor:
                return proximal_term(self.model, ref, proximal_mu)

        scheduled = cfg.train.schedule != "constant"
        self.model.train()
        losses = []
        dp = None
        if cfg.privacy.dp_sgd:
            from medlora_lib.privacy.dp_sgd import train_dp_sgd

            dp = train_dp_sgd(
                self.forward,
                self.model,
                optimizer,
                self.train_inputs,
                self.train_labels,
                cfg,
                seed=seed,
                class_weight=weight,
                state=dp_state,
                extra_loss=extra,
                fresh_randomness=fresh_randomness,
                device=self.device,
                on_step=schedule if scheduled else None,
                augment=self.augment,
            )
            losses = dp.losses
        else:
            epochs = cfg.train.local_epochs
            for e in range(epochs):

                def on_step(i: int, n: int, e: int = e) -> None:
                    schedule((e + i / n) / epochs)

                losses.append(
                    train_one_epoch(
                        self.forward,
                        params,
                        optimizer,
                        self.train_inputs,
                        self.train_labels,
                        loss_fn,
                        cfg.train,
                        gen,
                        self.device,
                        extra_loss=extra,
                        on_step=on_step if scheduled else None,
                        augment=self.augment,
                        precision=self.precision,
                    )
                )
        self.model.eval()
        return RoundOutput(
            shared=get_shared_state(self.model),
            private=get_private_state(self.model),
            train_loss=float(losses[-1]),
            num_examples=int(self.train_labels.shape[0]),
            seconds=time.perf_counter() - t0,
            epsilon=None if dp is None else dp.epsilon,
            dp_state=None if dp is None else dp.state,
            optimizer=export_optimizer(optimizer, named, keep) if keep else None,
        )

    # ------------------------------------------------------------------ evaluate
    def _metrics(
        self, prefix: str, name: str, test_above: float | None = None
    ) -> dict[str, float]:
        """``prefix`` + split metrics of client ``name``; the test split only when
        ``test_above`` is ``None`` or the validation selection metric exceeds it."""
        from medlora_lib.metrics import METRIC_NAMES, binary_metrics
        from medlora_lib.train import predict_proba

        out: dict[str, float] = {}
        for split, (inp, y) in self.eval_sets[name].items():
            if split == "test" and test_above is not None:
                v = out.get(f"{prefix}val_{self.cfg.train.selection_metric}")
                if v is None or not v > test_above:  # NaN: not selectable
                    continue
            prob = predict_proba(
                self.forward, inp, device=self.device, precision=self.precision
            )
            m = binary_metrics(y.numpy(), prob)
            for k in (*METRIC_NAMES, "n", "n_pos", "n_neg"):
                out[f"{prefix}{split}_{k}"] = float(m[k])
            for k, v in _confusion(y.numpy(), prob).items():
                out[f"{prefix}{split}_{k}"] = float(v)
        return out

    def evaluate_round(
        self,
        shared: dict[str, torch.Tensor],
        private: dict[str, torch.Tensor] | None,
        test_above: Mapping[str, Mapping[str, float]] | None = None,
    ) -> dict[str, dict[str, float]]:
        """Metrics of each evaluated client's deployed model on its val and test splits.

        The deployed model is the received shared state + this client's private state
        (for Med-DualLoRA: global + local adapter). For methods with a local adapter the
        global-only model (local adapter switched off) is evaluated too, with the prefix
        ``global_only_``.

        Args:
            test_above: the round loop's plan
                (:func:`~medlora_lib.fl.federation.plan_test_evaluations`): per client
                and variant prefix (``""``, ``"global_only_"``) the best validation
                ``train.selection_metric`` of its earlier rounds;
                that variant's test split is then evaluated only when this round's
                validation value beats it (only such a round can be selected). A
                client or variant it does not name, or ``None``, is tested always.

        Returns:
            ``{client name: {"val_balanced_accuracy": ..., "test_...": ...}}``.
        """
        from medlora_lib.adapters import LOCAL_ADAPTER, METHODS

        self.load(shared, private)
        self.model.eval()
        out = {}
        dual = METHODS[self.cfg.method].has_local_adapter
        plan = test_above or {}
        for name in self.eval_sets:
            above = plan.get(name, {})
            m = self._metrics("", name, above.get(""))
            if dual:
                with _local_adapter_off(self.model, LOCAL_ADAPTER):
                    m.update(
                        self._metrics("global_only_", name, above.get("global_only_"))
                    )
            out[name] = m
        return out


class _local_adapter_off:
    """Context manager: zero the local adapter's ``lora_B`` (its output is then 0)."""

    def __init__(self, model: nn.Module, adapter: str) -> None:
        self.params = [
            p for n, p in model.named_parameters() if f".lora_B.{adapter}." in n
        ]
        self.saved: list[torch.Tensor] = []

    def __enter__(self) -> None:
        self.saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p in self.params:
                p.zero_()

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for p, s in zip(self.params, self.saved, strict=True):
                p.copy_(s)


def get_runtime(experiment: str, site: str, build: Any) -> ClientRuntime:
    """The runtime of ``site`` in ``experiment``, built by ``build()`` when this process
    does not hold it.

    A simulation process serves several sites in turn: the sites of the current
    experiment it served before are kept within :func:`site_cache_bytes` (least recently
    served dropped first, before the new one is built, so the peak is the budget plus
    one site). Experiments run one after the other, so starting a new one drops the
    previous one's runtimes (its prefix-cache entries stay within the budget, for a
    later experiment with the same frozen prefix).
    """
    key = (experiment, site)
    if key in _RUNTIMES:
        _RUNTIMES[key] = _RUNTIMES.pop(key)  # most recently served last
    else:
        for old in [k for k in _RUNTIMES if k[0] != experiment]:
            del _RUNTIMES[old]
        trim_caches()
        _RUNTIMES[key] = build()
    trim_caches(serving=key)
    return _RUNTIMES[key]
