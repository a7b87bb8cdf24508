"""The book's shared experiments: one definition, reused by every chapter through the cache.

Chapters ``notebooks/03_fedavg_lora`` (runs the main comparison), ``04_med_dual_lora``,
``05_block_ablation`` and ``06_communication_analysis`` (read it back).

:func:`comparison_configs` builds the configs of the **main comparison** — every method
of :data:`ALL_METHODS` × several seeds, on the same data, model, budget, optimiser, class
weighting and selection rule — and :func:`run_comparison` runs them through
:func:`medlora_lib.fl.simulate` with ``use_cache=True`` (all federated runs inside one
Flower simulation, ``local`` / ``centralized`` in-process). A later chapter that calls
:func:`run_comparison` with the same arguments reads the cached results in seconds instead
of training again. ``seed`` seeds the adapters' initialisation, the batch order and — with
``data.split="per_seed"`` (the default) — every site's train / val / test split, so a seed
is a replicate that includes the sampling of the test set; the data set itself is fixed by
``data.synth_seed`` (or is the real data).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from medlora_lib.adapters import METHODS
from medlora_lib.config import ExperimentConfig, get_config
from medlora_lib.errors import ConfigError

__all__ = [
    "ALL_METHODS",
    "BASELINES",
    "DEFAULT_SEEDS",
    "comparison_configs",
    "run_comparison",
    "capacity_control_configs",
    "run_capacity_controls",
]

#: Every method of the book, in the order tables and figures show them: the registry's.
ALL_METHODS: tuple[str, ...] = tuple(METHODS)
#: What Med-DualLoRA is compared against (``centralized`` is a reference, not a rival).
BASELINES: tuple[str, ...] = (
    "local",
    "fedavg_lora",
    "ffa_lora",
    "fedsa_lora",
    "fedprox_lora",
)
#: Seeds of the main comparison at the ``cpu`` profile (at least five, for the statistics).
DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)


def comparison_configs(
    profile: str = "cpu",
    methods: Iterable[str] = ALL_METHODS,
    seeds: Iterable[int] = DEFAULT_SEEDS,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
) -> list[ExperimentConfig]:
    """Configs of ``methods`` × ``seeds``, identical in everything else.

    Raises:
        ConfigError: no method or no seed, or an invalid override / method.
    """
    methods, seeds = list(methods), [int(s) for s in seeds]
    if not methods or not seeds:
        raise ConfigError(
            "comparison_configs: give at least one method and one seed "
            f"(got methods={methods}, seeds={seeds})"
        )
    ov: Any = dict(overrides) if isinstance(overrides, Mapping) else overrides
    return [
        get_config(profile, overrides=ov, method=m, seed=s)
        for s in seeds
        for m in methods
    ]


def run_comparison(
    profile: str = "cpu",
    methods: Iterable[str] = ALL_METHODS,
    seeds: Iterable[int] = DEFAULT_SEEDS,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    verbose: bool = False,
) -> list[Any]:
    """Run (or read back from the cache) the comparison; one ``RunResult`` per config.

    The order is that of :func:`comparison_configs` (seed-major, then method).
    """
    from medlora_lib.fl import simulate

    configs = comparison_configs(profile, methods, seeds, overrides)
    return list(simulate(configs, use_cache=True, verbose=verbose))


def capacity_control_configs(
    profile: str = "cpu",
    seeds: Iterable[int] = DEFAULT_SEEDS,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
) -> dict[str, list[ExperimentConfig]]:
    """The capacity-matched controls of the main comparison (chapter ``04_med_dual_lora``).

    Med-DualLoRA trains two rank-r adapters where every baseline trains one. With r the
    comparison's ``adapter.lora_rank``:

    * ``fedavg_lora_2r`` — FedAvg-LoRA at rank 2r: Med-DualLoRA's trainable count;
    * ``med_dual_lora_half`` — Med-DualLoRA at r/2 (global) + r/2 (local): the
      baselines' trainable count.

    ``adapter.lora_alpha`` stays the comparison's, as when a user changes the rank.

    Returns:
        ``{label: configs over seeds}``.

    Raises:
        ConfigError: r is odd (no r/2).
    """
    seeds = [int(s) for s in seeds]
    base = comparison_configs(profile, ["fedavg_lora"], seeds[:1], overrides)[0]
    r = base.adapter.lora_rank
    if r % 2:
        raise ConfigError(
            f"capacity controls need an even adapter.lora_rank (r/2 + r/2); got {r}. "
            "Set adapter.lora_rank to an even value"
        )
    extra = {
        "fedavg_lora_2r": ("fedavg_lora", {"adapter.lora_rank": 2 * r}),
        "med_dual_lora_half": (
            "med_dual_lora",
            {"adapter.lora_rank": r // 2, "adapter.local_lora_rank": r // 2},
        ),
    }
    out = {}
    for label, (method, ov) in extra.items():
        merged: Any = (
            [*overrides, *(f"{k}={v}" for k, v in ov.items())]
            if isinstance(overrides, Sequence) and not isinstance(overrides, str)
            else {**dict(overrides or {}), **ov}
        )
        out[label] = comparison_configs(profile, [method], seeds, merged)
    return out


def run_capacity_controls(
    profile: str = "cpu",
    seeds: Iterable[int] = DEFAULT_SEEDS,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    verbose: bool = False,
) -> Any:
    """Run (or read back) :func:`capacity_control_configs`; a results frame whose
    ``method`` column holds the controls' labels (chapter ``04_med_dual_lora``)."""
    import pandas as pd

    from medlora_lib.fl import simulate
    from medlora_lib.stats import collect

    controls = capacity_control_configs(profile, seeds, overrides)
    configs = [c for cfgs in controls.values() for c in cfgs]
    labels = [label for label, cfgs in controls.items() for _ in cfgs]
    results = simulate(configs, use_cache=True, verbose=verbose)
    return pd.concat(
        [
            collect([r]).assign(method=label)
            for label, r in zip(labels, results, strict=True)
        ],
        ignore_index=True,
    )
