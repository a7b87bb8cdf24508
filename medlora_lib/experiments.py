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
    "PRIVACY_METHODS",
    "PRIVACY_SETTINGS",
    "privacy_configs",
    "run_privacy_grid",
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


# ------------------------------------------------------------------------------ privacy
#: The methods of chapter ``08_privacy``: the plain baseline and the paper's method.
PRIVACY_METHODS: tuple[str, ...] = ("fedavg_lora", "med_dual_lora")

#: Chapter ``08_privacy``'s settings at the ``cpu`` profile: ``(label, kind, overrides)``.
#: ``kind`` is ``none``, ``dp_sgd`` (sample-level, Opacus, at each site) or ``site_dp``
#: (site-level, Flower's server-side adaptive clipping: the norm follows the median
#: update norm, so no clipping norm has to be tuned on the data). Two noise levels each,
#: fixed before any run (a weak and a moderate guarantee over 20 rounds: at the ``cpu``
#: profile DP-SGD z=1 / 3 spend ε ≈ 11-18 / 2-4, site DP z=1 / 5 spend ε ≈ 30 / 4 at
#: δ = 1e-5); the ε each run spends is measured.
PRIVACY_SETTINGS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("no DP", "none", {}),
    (
        "DP-SGD z=1",
        "dp_sgd",
        {"privacy.dp_sgd": True, "privacy.sgd_noise_multiplier": 1.0},
    ),
    (
        "DP-SGD z=3",
        "dp_sgd",
        {"privacy.dp_sgd": True, "privacy.sgd_noise_multiplier": 3.0},
    ),
    (
        "site DP z=1",
        "site_dp",
        {
            "privacy.site_dp": "server_adaptive",
            "privacy.noise_multiplier": 1.0,
            "privacy.clipping_norm": 0.1,
        },
    ),
    (
        "site DP z=5",
        "site_dp",
        {
            "privacy.site_dp": "server_adaptive",
            "privacy.noise_multiplier": 5.0,
            "privacy.clipping_norm": 0.1,
        },
    ),
)


def privacy_configs(
    profile: str = "cpu",
    methods: Iterable[str] = PRIVACY_METHODS,
    seeds: Iterable[int] = (0, 1, 2),
    settings: Iterable[tuple[str, str, Mapping[str, Any]]] = PRIVACY_SETTINGS,
    overrides: Mapping[str, Any] | None = None,
) -> list[tuple[str, str, ExperimentConfig]]:
    """``(setting label, kind, config)`` for every setting × method × seed
    (chapter ``08_privacy``); the ``no DP`` configs are those of the main comparison,
    so they are read from its cache.

    Raises:
        ConfigError: an invalid override or privacy value (named by the config).
    """
    out = []
    for label, kind, extra in settings:
        merged = {**dict(overrides or {}), **dict(extra)}
        for cfg in comparison_configs(profile, methods, seeds, merged):
            out.append((label, kind, cfg))
    return out


def _epsilon(result: Any, kind: str) -> float:
    p = result.privacy or {}
    if kind == "dp_sgd":
        return float(p.get("dp_sgd_epsilon_max", float("nan")))
    if kind == "site_dp":
        return float(p.get("site_dp_epsilon", float("nan")))
    return float("inf")


def run_privacy_grid(
    profile: str = "cpu",
    methods: Iterable[str] = PRIVACY_METHODS,
    seeds: Iterable[int] = (0, 1, 2),
    settings: Iterable[tuple[str, str, Mapping[str, Any]]] = PRIVACY_SETTINGS,
    overrides: Mapping[str, Any] | None = None,
    verbose: bool = False,
) -> tuple[Any, list[Any]]:
    """Run (or read back) :func:`privacy_configs` (chapter ``08_privacy``).

    Returns:
        ``(frame, results)``: the results frame of :func:`medlora_lib.stats.collect`
        (one row per method, seed, client) with ``setting``, ``kind``, ``epsilon``
        (ε spent at ``privacy.delta``: site-level — the same for every site — or the
        largest DP-SGD ε of any site; ``inf`` without DP), ``seconds_per_round`` and
        ``MB`` (all traffic of the run) columns, and ``(label, kind, RunResult)`` for
        every run, in the order of :func:`privacy_configs`.
    """
    import pandas as pd

    from medlora_lib.fl import simulate
    from medlora_lib.stats import collect

    planned = privacy_configs(profile, methods, seeds, settings, overrides)
    results = list(
        simulate([c for _, _, c in planned], use_cache=True, verbose=verbose)
    )
    frames = []
    for (label, kind, _), r in zip(planned, results, strict=True):
        traffic = r.comm.get("total_bytes_up", 0) + r.comm.get("total_bytes_down", 0)
        frames.append(
            collect([r]).assign(
                setting=label,
                kind=kind,
                epsilon=_epsilon(r, kind),
                seconds_per_round=r.seconds_per_round(),
                MB=traffic / 1e6,
            )
        )
    runs = [
        (label, kind, r) for (label, kind, _), r in zip(planned, results, strict=True)
    ]
    return pd.concat(frames, ignore_index=True), runs
