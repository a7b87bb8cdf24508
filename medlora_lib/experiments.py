"""The book's shared experiments: one definition, reused by every chapter through the cache.

Chapters ``notebooks/03_fedavg_lora`` (runs the main comparison), ``04_med_dual_lora``,
``05_block_ablation`` (:func:`ablation_configs`) and ``06_communication_analysis`` (read it back).

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
    "ABLATION_BLOCKS",
    "ABLATION_RANKS",
    "ablation_configs",
    "capacity_control_configs",
    "run_capacity_controls",
    "PRIVACY_METHODS",
    "PRIVACY_SETTINGS",
    "privacy_configs",
    "run_privacy_grid",
    "SHIFT_SETTINGS",
    "SHIFT_METHODS",
    "real_data_dir",
    "shift_sweep_configs",
    "run_shift_sweep",
    "JOIN_SETTINGS",
    "new_site_join_configs",
    "run_new_site_joins",
    "join_differences",
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


#: Chapter ``05_block_ablation``'s defaults: which blocks, and which ranks at the last two.
ABLATION_BLOCKS: tuple[str, ...] = ("last1", "last2", "last4", "all", "first2")
ABLATION_RANKS: tuple[int, ...] = (4, 8, 16)


def ablation_configs(
    profile: str = "cpu",
    method: str = "med_dual_lora",
    seeds: Iterable[int] = (0, 1, 2),
    block_choices: Iterable[str] = ABLATION_BLOCKS,
    rank_choices: Iterable[int] = ABLATION_RANKS,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], list[ExperimentConfig], list[dict[str, Any]]]:
    """The block / rank ablation of chapter ``05_block_ablation``.

    The block study adapts each of ``block_choices`` at rank 8; the rank study adapts the
    last two blocks at each rank of ``rank_choices`` but 8 (``lora_alpha`` = 2 × rank).
    Only what differs from the profile's adapter is overridden, so the default variant
    *is* the main comparison's config (same hash: read from chapter 03's cache).

    Returns:
        ``(variants, configs, keys)``: one dict per variant (``study``, ``blocks``,
        ``rank``), the configs variant-major then seed, and for each config its
        variant's dict with its ``seed``.

    Raises:
        ConfigError: no seed, no variant, or an invalid block choice / rank.
    """
    seeds = [int(s) for s in seeds]
    base = dict(overrides or {})
    base_cfg = get_config(profile, method=method, overrides=base)
    default = base_cfg.adapter_config()
    from medlora_lib.adapters import resolve_adapted_blocks
    from medlora_lib.models.convvit import SIZES

    depth = int(
        base_cfg.model.overrides.get("depth", SIZES[base_cfg.model.size]["depth"])
    )
    variants = [{"study": "blocks", "blocks": b, "rank": 8} for b in block_choices]
    variants += [
        {"study": "rank", "blocks": "last2", "rank": int(r)}
        for r in rank_choices
        if int(r) != 8
    ]
    if not seeds or not variants:
        raise ConfigError(
            f"ablation_configs: give at least one seed and one variant (got seeds="
            f"{seeds}, block_choices={list(block_choices)}, "
            f"rank_choices={list(rank_choices)})"
        )
    for v in variants:  # a block choice the model cannot take fails here, named
        resolve_adapted_blocks(v["blocks"], depth)
    configs, keys = [], []
    for v in variants:
        ov = dict(base)
        if v["blocks"] != default.adapted_blocks:
            ov["adapter.adapted_blocks"] = v["blocks"]
        if v["rank"] != default.lora_rank:
            ov["adapter.lora_rank"] = v["rank"]
            ov["adapter.lora_alpha"] = 2 * v["rank"]
        for s in seeds:
            configs.append(get_config(profile, method=method, seed=s, overrides=ov))
            keys.append({**v, "seed": s})
    return variants, configs, keys


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


# ---------------------------------------------------------------- chapter 07: two shifts
#: Chapter ``07_beyond_the_paper``'s sweep: ``(label, data.appearance_shift,
#: data.label_shift)``. The default (both shifts, the main comparison's runs, read from
#: its cache) and each shift removed in turn, so the chapter can say which shift the
#: local adapter answers. Each knob is chapter 01's (``medlora_lib.data.vendors``).
SHIFT_SETTINGS: tuple[tuple[str, float, float], ...] = (
    ("both shifts", 1.0, 1.0),
    ("label shift only", 0.0, 1.0),
    ("appearance shift only", 1.0, 0.0),
)
#: The methods the sweep compares: each site alone, one shared adapter, shared + local.
SHIFT_METHODS: tuple[str, ...] = ("local", "fedavg_lora", "med_dual_lora")


def real_data_dir(cfg: ExperimentConfig) -> str | None:
    """The real-data folder ``cfg`` would train on (``data.data_dir`` or
    ``$MEDLORA_DATA_DIR``), or None for the profile's synthetic data."""
    import os

    return cfg.data.data_dir or os.environ.get("MEDLORA_DATA_DIR") or None


def shift_sweep_configs(
    profile: str = "cpu",
    seeds: Iterable[int] = (0, 1, 2),
    methods: Iterable[str] = SHIFT_METHODS,
    settings: Iterable[tuple[str, float, float]] = SHIFT_SETTINGS,
    overrides: Mapping[str, Any] | None = None,
) -> list[tuple[str, ExperimentConfig]]:
    """``(setting label, config)`` for every setting × seed × method of chapter
    ``07_beyond_the_paper``'s shift sweep.

    A setting at ``(1.0, 1.0)`` leaves both knobs unset, so its configs *are* those of
    the main comparison (same hash, read from its cache).

    Raises:
        ConfigError: the configs would train on real data (``data.data_dir`` or
            ``$MEDLORA_DATA_DIR``): the knobs belong to the synthetic generator, so
            every setting would train the same runs; or a level outside [0, 1].
    """
    out = []
    for label, appearance, label_level in settings:
        extra: dict[str, Any] = {}
        if (appearance, label_level) != (1.0, 1.0):
            extra = {
                "data.appearance_shift": appearance,
                "data.label_shift": label_level,
            }
        merged = {**dict(overrides or {}), **extra}
        for cfg in comparison_configs(profile, methods, seeds, merged):
            real = real_data_dir(cfg)
            if real:
                raise ConfigError(
                    f"the shift sweep moves the synthetic generator's knobs "
                    f"(data.appearance_shift, data.label_shift), but this config trains "
                    f"on the real data in {real} (data.data_dir or $MEDLORA_DATA_DIR), "
                    "where every setting would train the same runs. Unset "
                    "MEDLORA_DATA_DIR / data.data_dir to run the sweep on synthetic "
                    "data, or skip it (chapter 07: run_sweep=False)"
                )
            out.append((label, cfg))
    return out


def run_shift_sweep(
    profile: str = "cpu",
    seeds: Iterable[int] = (0, 1, 2),
    methods: Iterable[str] = SHIFT_METHODS,
    settings: Iterable[tuple[str, float, float]] = SHIFT_SETTINGS,
    overrides: Mapping[str, Any] | None = None,
    verbose: bool = False,
    runtime: str = "flower",
    on_real_data: str = "raise",
) -> Any:
    """Run (or read back) :func:`shift_sweep_configs` (chapter ``07_beyond_the_paper``).

    Args:
        on_real_data: ``"raise"`` (default) or ``"skip"``: print why and return None
            (the chapter then runs only the part that makes sense on real data, the
            late site).

    Returns:
        The results frame of :func:`medlora_lib.stats.collect` (one row per setting,
        method, seed, client) with ``setting``, ``appearance_shift`` and
        ``label_shift`` columns; None when skipped.

    Raises:
        ConfigError: as :func:`shift_sweep_configs` (real data among them, unless
            ``on_real_data="skip"``).
    """
    import pandas as pd

    from medlora_lib.fl import simulate
    from medlora_lib.stats import collect

    if on_real_data not in ("raise", "skip"):
        raise ConfigError(
            f"run_shift_sweep: on_real_data={on_real_data!r}; use 'raise' or 'skip'"
        )
    settings = list(settings)
    try:
        planned = shift_sweep_configs(profile, seeds, methods, settings, overrides)
    except ConfigError as err:
        if on_real_data == "skip" and "same runs" in str(err):
            print(f"shift sweep skipped: {err}")
            return None
        raise
    levels = {label: (a, lab) for label, a, lab in settings}
    results = simulate(
        [c for _, c in planned], use_cache=True, verbose=verbose, runtime=runtime
    )
    return pd.concat(
        [
            collect([r]).assign(
                setting=label,
                appearance_shift=levels[label][0],
                label_shift=levels[label][1],
            )
            for (label, _), r in zip(planned, results, strict=True)
        ],
        ignore_index=True,
    )


#: The four ways a late site can be served, in the order chapter 07 shows them.
JOIN_SETTINGS: tuple[str, ...] = (
    "alone (local)",
    "zero-shot global",
    "join (local adapter on global)",
    "member from the start",
)


def new_site_join_configs(
    profile: str = "cpu",
    newcomers: Iterable[str] = ("Siemens", "Philips", "GE", "Canon"),
    seeds: Iterable[int] = (0, 1, 2),
    overrides: Mapping[str, Any] | None = None,
) -> tuple[list[ExperimentConfig], list[ExperimentConfig]]:
    """The federations of :func:`run_new_site_joins` (chapter ``07_beyond_the_paper``):
    Med-DualLoRA with each newcomer held out (``fed.exclude``, newcomer-major then
    seed), and the references ``local`` / ``med_dual_lora`` of the main comparison.

    Raises:
        ConfigError: no newcomer.
    """
    newcomers, seeds = list(newcomers), [int(s) for s in seeds]
    if not newcomers:
        raise ConfigError("run_new_site_joins: give at least one newcomer")
    base = dict(overrides or {})
    held_out = [
        get_config(
            profile,
            method="med_dual_lora",
            seed=s,
            overrides={**base, "fed.exclude": [v]},
        )
        for v in newcomers
        for s in seeds
    ]
    refs = comparison_configs(profile, ["local", "med_dual_lora"], seeds, base)
    return held_out, refs


def run_new_site_joins(
    profile: str = "cpu",
    newcomers: Iterable[str] = ("Siemens", "Philips", "GE", "Canon"),
    seeds: Iterable[int] = (0, 1, 2),
    overrides: Mapping[str, Any] | None = None,
    verbose: bool = False,
    runtime: str = "flower",
) -> Any:
    """Each newcomer in turn held out of a Med-DualLoRA federation, then served four ways
    (chapter ``07_beyond_the_paper``): trained **alone** (``local`` of the main
    comparison), the final global adapter and head deployed as they are (**zero-shot**),
    its own local adapter and head trained on the frozen global adapter (**join**,
    :func:`medlora_lib.fl.newsite.join_new_site`; the joins in worker processes,
    :func:`~medlora_lib.fl.newsite.join_new_sites`), and Med-DualLoRA with it a
    **member from the start** (main comparison). Works on real data too (the sites are
    those of the prepared folder).

    All federations (the held-out ones and the references) run in one
    :func:`~medlora_lib.fl.simulate` call, through the cache.

    Returns:
        A frame with one row per (vendor, seed, setting of :data:`JOIN_SETTINGS`):
        ``vendor``, ``seed``, ``setting``, ``balanced_accuracy``, ``specificity``
        (test split; the selected round, zero-shot: the final global state).

    Raises:
        ConfigError: no newcomer, or a newcomer that is not a site of the data.
    """
    import pandas as pd

    from medlora_lib.fl import simulate
    from medlora_lib.fl.newsite import join_new_sites

    fed_cfgs, ref_cfgs = new_site_join_configs(profile, newcomers, seeds, overrides)
    results = list(
        simulate(
            [*fed_cfgs, *ref_cfgs], use_cache=True, verbose=verbose, runtime=runtime
        )
    )
    feds, refs = results[: len(fed_cfgs)], results[len(fed_cfgs) :]
    ref = {
        (r.config.method, r.config.seed): r.selected().set_index("client") for r in refs
    }
    # the joins in worker processes: one core would idle otherwise (issue 12)
    joined_all = join_new_sites(
        [(fed, cfg.fed.exclude[0]) for cfg, fed in zip(fed_cfgs, feds, strict=True)],
        verbose=verbose,
    )
    rows = []
    for cfg, (joined, zero) in zip(fed_cfgs, joined_all, strict=True):
        v, s = cfg.fed.exclude[0], cfg.seed
        sel = joined.selected().set_index("client").loc[v]
        alone = ref[("local", s)].loc[v]
        member = ref[("med_dual_lora", s)].loc[v]
        values = (
            (alone["balanced_accuracy"], alone["specificity"]),
            (zero["test_balanced_accuracy"], zero["test_specificity"]),
            (sel["balanced_accuracy"], sel["specificity"]),
            (member["balanced_accuracy"], member["specificity"]),
        )
        for setting, (ba, spec) in zip(JOIN_SETTINGS, values, strict=True):
            rows.append(
                {
                    "vendor": v,
                    "seed": s,
                    "setting": setting,
                    "balanced_accuracy": float(ba),
                    "specificity": float(spec),
                }
            )
    return pd.DataFrame(rows)


def join_differences(joins: Any) -> Any:
    """Paired differences of chapter 07's join table, per (vendor, seed): join − alone,
    join − zero-shot, join − member; mean, sd, count, wins and losses (|d| > 1e-12)
    over the pairs. ``joins`` is :func:`run_new_site_joins`'s frame."""
    import pandas as pd

    pair = joins.pivot_table(
        index=["vendor", "seed"], columns="setting", values="balanced_accuracy"
    )
    join = pair["join (local adapter on global)"]
    diff = pd.DataFrame(
        {
            "join − alone": join - pair["alone (local)"],
            "join − zero-shot": join - pair["zero-shot global"],
            "join − member": join - pair["member from the start"],
        }
    )
    summary = diff.agg(["mean", "std", "count"]).T
    summary["wins"] = (diff > 1e-12).sum()
    summary["losses"] = (diff < -1e-12).sum()
    return summary
