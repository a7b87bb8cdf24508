"""What one client does in one round, shared by the Flower apps and the in-process loop.

Chapters ``notebooks/03_fedavg_lora`` (the federated loop) and ``notebooks/04_med_dual_lora``
(global + local adapters, what stays at the site).

An :class:`ExperimentSpec` is everything a client needs to know about one experiment: the
config, the absolute data folder, the client names and test-only hooks. It travels as a JSON
string in the train / evaluate ``ConfigRecord`` (so the same apps serve several experiments
in one simulation, and the Deployment Runtime needs no extra files).

A :class:`ClientRuntime` holds one client's model (frozen backbone + the method's adapters)
and its data (the frozen-prefix cache when ``train.use_prefix_cache`` and no augmentation).
It is built once per process and experiment (:func:`get_runtime`) and kept in process memory;
the trainable tensors are overwritten from the message (shared) and from ``context.state``
(private) at the start of every call, so reusing it never leaks state between rounds, and
a fresh process (Deployment Runtime) simply rebuilds it.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medlora_lib.config import ExperimentConfig
from medlora_lib.errors import ConfigError, DataError

__all__ = [
    "FEDERATED_METHODS",
    "INPROCESS_METHODS",
    "ExperimentSpec",
    "ClientRuntime",
    "RoundOutput",
    "build_adapted_model",
    "client_names",
    "get_runtime",
    "round_seed",
    "validate_config",
    "clear_runtime_cache",
]

#: Methods that run through Flower (a server aggregates what clients send).
FEDERATED_METHODS = (
    "fedavg_lora",
    "ffa_lora",
    "fedsa_lora",
    "fedprox_lora",
    "med_dual_lora",
)
#: Methods that run in-process (no server): same loop, same evaluation.
INPROCESS_METHODS = ("local", "centralized")


@dataclass
class ExperimentSpec:
    """One experiment as the clients see it (JSON-serialisable).

    Attributes:
        exp_id: unique id inside a simulation (keys the clients' private state).
        config: ``ExperimentConfig.to_dict()``.
        data_dir: absolute path of the prepared data folder.
        clients: client names in partition order (canonical vendor order).
        fail: test hook ``{"partition": p, "round": r, "phase": "train"}``: that client
            raises in that round (used only by the failure tests).
    """

    exp_id: str
    config: dict[str, Any]
    data_dir: str
    clients: list[str]
    fail: dict[str, Any] | None = None

    @property
    def cfg(self) -> ExperimentConfig:
        return ExperimentConfig.from_dict(self.config)

    @property
    def method(self) -> str:
        return str(self.config["method"])

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ExperimentSpec:
        return cls(**json.loads(text))


def round_seed(seed: int, partition: int, rnd: int) -> int:
    """The torch seed of client ``partition`` in round ``rnd`` (same inputs, same numbers)."""
    return zlib.crc32(f"medlora/{seed}/{partition}/{rnd}".encode()) & 0x7FFFFFFF


def client_names(data_dir: str | Path, clients: str = "vendor") -> list[str]:
    """Client names of a prepared folder in partition order (canonical vendor order).

    ``clients`` is ``fed.clients``: ``vendor`` or ``vendor+acdc`` (ACDC as a fifth
    client, last); see :func:`medlora_lib.pipeline.client_of`.
    """
    from medlora_lib.data.manifest import VENDORS, read_manifest
    from medlora_lib.pipeline import client_of

    manifest = read_manifest(data_dir)
    present = set(client_of(manifest, clients))
    return [v for v in VENDORS if v in present] + sorted(present - set(VENDORS))


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
        ConfigError: unknown method, rank <= 0, no adapted block, or blocks out of range
            for the model depth.
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


def _check_shapes(
    cfg: ExperimentConfig, clients: dict[str, Any], data_dir: Path
) -> None:
    want = (2, *cfg.data.image_size)
    for name, cd in clients.items():
        for split, (x, _) in cd.splits.items():
            if tuple(x.shape[1:]) != want:
                raise DataError(
                    f"{data_dir}: client {name} split {split} holds images of shape "
                    f"{tuple(x.shape[1:])} but the config expects {want} "
                    f"(data.image_size={list(cfg.data.image_size)}); prepare the data "
                    "with the same profile or set data.image_size to match"
                )


_DATA_CACHE: dict[str, Any] = {}
_RUNTIMES: dict[tuple[str, int], ClientRuntime] = {}
_PREFIX_CACHE: dict[str, Any] = {}


def clear_runtime_cache() -> None:
    """Forget every runtime, data set and prefix cache held by this process."""
    _DATA_CACHE.clear()
    _RUNTIMES.clear()
    _PREFIX_CACHE.clear()


def _load_data(data_dir: str, clients: str = "vendor") -> dict[str, Any]:
    key = f"{clients}|{data_dir}"
    if key not in _DATA_CACHE:
        from medlora_lib.pipeline import load_client_data

        _DATA_CACHE[key] = load_client_data(data_dir, clients=clients)[0]
    return _DATA_CACHE[key]


@dataclass
class RoundOutput:
    """What a client returns from one training round."""

    shared: dict[str, torch.Tensor]
    private: dict[str, torch.Tensor]
    train_loss: float
    num_examples: int
    seconds: float = 0.0


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
    """One client's model and data for one experiment (kept in process memory).

    ``train_names`` are the clients whose training data this runtime trains on (one for
    every federated method and ``local``, all of them for ``centralized``); ``eval_names``
    are the clients it evaluates (its own, or all of them for ``centralized``).
    """

    spec: ExperimentSpec
    partition: int
    model: nn.Module
    start_block: int | None
    train_inputs: dict[str, torch.Tensor]
    train_labels: torch.Tensor
    eval_sets: dict[str, dict[str, tuple[dict[str, torch.Tensor], torch.Tensor]]]
    initial_private: dict[str, torch.Tensor]
    device: torch.device
    shared_keys: list[str] = field(default_factory=list)
    private_keys: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ building
    @classmethod
    def build(
        cls, spec: ExperimentSpec, partition: int, train_names: list[str] | None = None
    ) -> ClientRuntime:
        from medlora_lib.adapters import (
            first_adapted_block,
            get_private_state,
            get_shared_state,
        )
        from medlora_lib.pipeline import adapter_config
        from medlora_lib.train import resolve_device

        cfg = spec.cfg
        if cfg.train.num_threads > 0:
            torch.set_num_threads(cfg.train.num_threads)
        if not 0 <= partition < len(spec.clients):
            raise ConfigError(
                f"partition-id {partition} is out of range for {len(spec.clients)} "
                f"clients {spec.clients}; start one SuperNode per client with "
                f"--node-config 'partition-id=N num-partitions={len(spec.clients)}'"
            )
        clients = _load_data(spec.data_dir, cfg.fed.clients)
        names = train_names or [spec.clients[partition]]
        missing = [
            n for n in names if n not in clients or "train" not in clients[n].splits
        ]
        if missing:
            raise DataError(
                f"{spec.data_dir}: client(s) {missing} have no training split; check "
                "manifest.csv"
            )
        _check_shapes(cfg, clients, Path(spec.data_dir))
        model = build_adapted_model(cfg)
        device = resolve_device(cfg.train.device)
        use_cache = cfg.train.use_prefix_cache and not cfg.data.augment
        acfg = adapter_config(cfg)
        start = first_adapted_block(acfg, model) if use_cache else None
        model.eval()

        def inputs(name: str, split: str) -> dict[str, torch.Tensor]:
            x = clients[name].splits[split][0]
            if start is None:
                return {"image": x}
            key = json.dumps(
                [
                    cfg.model.__dict__,
                    cfg.data.image_size,
                    spec.data_dir,
                    cfg.seed if cfg.model.pretrained == "none" else None,
                    start,
                    name,
                    split,
                    # the subjects themselves (a client's split depends on fed.clients)
                    zlib.crc32("\n".join(clients[name].subjects[split]).encode()),
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
            return _PREFIX_CACHE[key]

        tr = [inputs(n, "train") for n in names]
        train_inputs = {k: torch.cat([t[k] for t in tr]) for k in tr[0]}
        train_labels = torch.cat([clients[n].splits["train"][1] for n in names])
        eval_names = names if train_names else [spec.clients[partition]]
        eval_sets = {
            n: {
                s: (inputs(n, s), clients[n].splits[s][1])
                for s in ("val", "test")
                if s in clients[n].splits
            }
            for n in eval_names
        }
        model.to(device)
        return cls(
            spec=spec,
            partition=partition,
            model=model,
            start_block=start,
            train_inputs=train_inputs,
            train_labels=train_labels,
            eval_sets=eval_sets,
            initial_private=get_private_state(model),
            device=device,
            shared_keys=list(get_shared_state(model)),
            private_keys=list(get_private_state(model)),
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
    def train_round(
        self,
        shared: dict[str, torch.Tensor],
        private: dict[str, torch.Tensor] | None,
        rnd: int,
        proximal_mu: float = 0.0,
    ) -> RoundOutput:
        """Load state, train ``train.local_epochs`` epochs, return the new state.

        The random state (batch order, dropout) is seeded by
        :func:`round_seed` ``(seed, partition, rnd)``; the optimiser (AdamW) starts afresh
        every round (our choice: optimiser state never crosses rounds or leaves the site).
        """
        import time

        from medlora_lib.adapters import (
            get_private_state,
            get_shared_state,
            proximal_term,
        )
        from medlora_lib.train import class_weights, make_optimizer, train_one_epoch

        t0 = time.perf_counter()
        cfg = self.spec.cfg
        self.load(shared, private)
        seed = round_seed(cfg.seed, self.partition, rnd)
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, cfg.train)
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

        self.model.train()
        losses = []
        for _ in range(cfg.train.local_epochs):
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
                )
            )
        self.model.eval()
        return RoundOutput(
            shared=get_shared_state(self.model),
            private=get_private_state(self.model),
            train_loss=float(losses[-1]),
            num_examples=int(self.train_labels.shape[0]),
            seconds=time.perf_counter() - t0,
        )

    # ------------------------------------------------------------------ evaluate
    def _metrics(self, prefix: str, name: str) -> dict[str, float]:
        from medlora_lib.metrics import METRIC_NAMES, binary_metrics
        from medlora_lib.train import predict_proba

        out: dict[str, float] = {}
        for split, (inp, y) in self.eval_sets[name].items():
            prob = predict_proba(self.forward, inp, device=self.device)
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
    ) -> dict[str, dict[str, float]]:
        """Metrics of each evaluated client's deployed model on its val and test splits.

        The deployed model is the received shared state + this client's private state
        (for Med-DualLoRA: global + local adapter). For methods with a local adapter the
        global-only model (local adapter switched off) is evaluated too, with the prefix
        ``global_only_``.

        Returns:
            ``{client name: {"val_balanced_accuracy": ..., "test_...": ...}}``.
        """
        from medlora_lib.adapters import LOCAL_ADAPTER, METHODS

        self.load(shared, private)
        self.model.eval()
        out = {}
        dual = METHODS[self.spec.method].has_local_adapter
        for name in self.eval_sets:
            m = self._metrics("", name)
            if dual:
                with _local_adapter_off(self.model, LOCAL_ADAPTER):
                    m.update(self._metrics("global_only_", name))
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


def get_runtime(spec: ExperimentSpec, partition: int) -> ClientRuntime:
    """The client's runtime for this experiment, built once per process and kept."""
    key = (spec.exp_id + "/" + spec.to_json(), partition)
    if key not in _RUNTIMES:
        # experiments run one after the other: drop the other experiments' models
        for old in [k for k in _RUNTIMES if k[0] != key[0]]:
            del _RUNTIMES[old]
        _RUNTIMES[key] = ClientRuntime.build(spec, partition)
    return _RUNTIMES[key]
