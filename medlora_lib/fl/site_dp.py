"""Site-level (central) differential privacy on the shared update, with Flower's own
strategy wrappers and RDP accountant (chapter ``notebooks/08_privacy``,
``book/deployment.md``).

``privacy.site_dp`` chooses one of Flower 1.42's Message-API wrappers around the
project's :class:`~medlora_lib.fl.strategies.MedloraFedAvg`:

========================  ======================================================
``server_fixed``          ``DifferentialPrivacyServerSideFixedClipping``
``client_fixed``          ``DifferentialPrivacyClientSideFixedClipping`` + ``fixedclipping_mod``
``server_adaptive``       ``DifferentialPrivacyServerSideAdaptiveClipping``
``client_adaptive``       ``DifferentialPrivacyClientSideAdaptiveClipping`` + ``adaptiveclipping_mod``
========================  ======================================================

Each site's update of the shared tensors (received -> trained) is clipped to
``privacy.clipping_norm`` in L2 and Gaussian noise of standard deviation
``z · C / m`` is added to the *unweighted* mean of the ``m`` updates (so the noise
matches the sensitivity ``C / m`` of one site; the sample-weighted mean of the
non-private runs would give a large site more influence than the noise covers).

What it protects is a whole site: the released global adapter changes by little
whether or not any one hospital took part. With four sites that is expensive: the
noise on the mean is ``z·C/4`` while the signal is the mean of four clipped updates.

The ε spent so far (at ``privacy.delta``) is composed with Flower's
:class:`~flwr.supercore.privacy_accounting.rdp_accountant.RdpAccountant` (Google's
``dp-accounting`` underneath): one Gaussian release of noise multiplier ``z`` per round,
without amplification (every site takes part in every round). Adaptive clipping
spends the same: its noisy count and noisy mean together are a Gaussian mechanism of
multiplier ``z`` (Andrew et al. 2021, Thm. 1). Flower's wrappers can take this
accountant themselves only around ``FedAvg.aggregate_train``; the project's strategy
averages in float64 in site order, so the server composes the same events itself.

In the Simulation Runtime the noise is seeded per round (``seed``, round) so that the
book's results are reproducible; in a deployment it is not (a noise seed known to
anyone would let them subtract the noise).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from medlora_lib.errors import ConfigError

__all__ = [
    "wrap_strategy",
    "SiteDPAccountant",
    "site_dp_epsilon",
    "check_site_dp_budget",
    "seeded_noise",
]


def wrap_strategy(strategy: Any, privacy: Any, num_sites: int) -> Any:
    """``strategy`` inside the Flower DP wrapper chosen by ``privacy.site_dp``."""
    from flwr.serverapp import strategy as fs

    z, c = float(privacy.noise_multiplier), float(privacy.clipping_norm)
    mode = privacy.site_dp
    if mode == "server_fixed":
        return fs.DifferentialPrivacyServerSideFixedClipping(strategy, z, c, num_sites)
    if mode == "client_fixed":
        return fs.DifferentialPrivacyClientSideFixedClipping(strategy, z, c, num_sites)
    klass = {
        "server_adaptive": fs.DifferentialPrivacyServerSideAdaptiveClipping,
        "client_adaptive": fs.DifferentialPrivacyClientSideAdaptiveClipping,
    }[mode]
    # Flower's default noise on the clipped count (num_sites / 20) is far too small
    # for four sites (it must exceed z / 2); z on the count keeps the update's
    # effective multiplier at z / sqrt(3/4) ~ 1.15 z.
    return klass(
        strategy,
        z,
        num_sites,
        initial_clipping_norm=c,
        target_clipped_quantile=float(privacy.target_quantile),
        clip_norm_lr=float(privacy.clip_lr),
        clipped_count_stddev=max(num_sites / 20.0, z),
    )


def _accountant(delta: float, population: int) -> Any:
    from flwr.supercore.privacy_accounting import (
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    return RdpAccountant(
        PrivacyConfig(
            target_delta=float(delta),
            population_size=max(1, int(population)),
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )


class SiteDPAccountant:
    """ε of the site-level releases so far (Flower's RDP accountant).

    ``releases`` (one ``[round, sites]`` pair per released aggregate) is all the state:
    it goes into the server's checkpoint, and a resumed run composes the same events.
    """

    def __init__(
        self,
        noise_multiplier: float,
        delta: float,
        population: int,
        releases: list[list[int]] | None = None,
    ) -> None:
        self.z = float(noise_multiplier)
        self.delta = float(delta)
        self.population = int(population)
        self.releases: list[list[int]] = []
        self._acc = _accountant(delta, population)
        for rnd, m in releases or []:
            self.compose(int(rnd), int(m))

    def compose(self, rnd: int, sites: int) -> float:
        """Account one released aggregate of ``sites`` sites; return ε so far."""
        from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

        m = max(1, min(int(sites), self.population))
        self._acc.compose(
            GaussianPrivacyEvent(
                noise_multiplier=self.z,
                sample_size=m,
                population_size=self.population,
            )
        )
        self.releases.append([int(rnd), int(sites)])
        return self.epsilon()

    def epsilon(self) -> float:
        """ε spent so far at ``delta`` (0 before the first release)."""
        if not self.releases:
            return 0.0
        return float(self._acc.get_epsilon(self.delta))


def site_dp_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """ε after ``rounds`` site-level releases of multiplier ``noise_multiplier``."""
    acc = SiteDPAccountant(noise_multiplier, delta, 1)
    for r in range(1, int(rounds) + 1):
        acc.compose(r, 1)
    return acc.epsilon()


def _noise_for(target: float, rounds: int, delta: float) -> float:
    lo, hi = 0.05, 1.0
    while site_dp_epsilon(hi, rounds, delta) > target:
        hi *= 2.0
        if hi > 1e4:
            return math.inf
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        if site_dp_epsilon(mid, rounds, delta) > target:
            lo = mid
        else:
            hi = mid
    return hi


def check_site_dp_budget(cfg: Any) -> None:
    """Refuse a site-level DP run whose rounds would spend more than
    ``privacy.target_epsilon`` (names the fields and what would fit).

    Raises:
        ConfigError: the target cannot be met with ``fed.num_rounds`` rounds at
            ``privacy.noise_multiplier``.
    """
    p = cfg.privacy
    if p.site_dp == "off" or p.target_epsilon <= 0:
        return
    rounds = int(cfg.fed.num_rounds)
    eps = site_dp_epsilon(p.noise_multiplier, rounds, p.delta)
    if eps <= p.target_epsilon:
        return
    z = _noise_for(p.target_epsilon, rounds, p.delta)
    if math.isfinite(z):  # printed rounded up, so that the value given fits
        step = 10 ** (math.floor(math.log10(z)) - 2)
        z = math.ceil(z / step) * step
    fit = 0
    while fit < rounds and (
        site_dp_epsilon(p.noise_multiplier, fit + 1, p.delta) <= p.target_epsilon
    ):
        fit += 1
    raise ConfigError(
        f"config field `privacy.target_epsilon`: {p.target_epsilon:g} cannot be met: "
        f"fed.num_rounds={rounds} site-level releases at privacy.noise_multiplier="
        f"{p.noise_multiplier:g} spend ε={eps:.3g} at δ={p.delta:g}. Raise "
        f"privacy.noise_multiplier to at least {z:.4g}"
        + (f", or lower fed.num_rounds to {fit}" if fit >= 1 else "")
        + ", or raise privacy.target_epsilon"
    )


@contextlib.contextmanager
def seeded_noise(seed: int | None) -> Iterator[None]:
    """Seed NumPy's global generator (which Flower's wrappers draw their noise from)
    for one aggregation and restore it afterwards; ``None``: leave it alone."""
    if seed is None:
        yield
        return
    state = np.random.get_state()
    np.random.seed(int(seed) % (2**32))
    try:
        yield
    finally:
        np.random.set_state(state)
