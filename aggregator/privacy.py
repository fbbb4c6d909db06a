"""Client-level differential privacy for the FedAvg family, with privacy accounting.

DP-FedAvg (McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private Recurrent
Language Models", ICLR 2018): every site's delta (its update minus the global model it
started from) is clipped to L2 norm C; the clipped deltas are summed, Gaussian noise
N(0, (sigma C)^2) is added to the sum, and the sum is divided by a fixed denominator (the
number of sites expected per round, not the number that answered, so one site more or less
changes the result by at most C / n). Every site weighs the same: sample counts are not
used, since a site could claim any count. The noised mean delta then goes through the
configured server step (FedAvg: applied as it is; FedAvgM, FedAdam: their optimiser).

Only the FedAvg family is allowed: median, Krum, trimmed mean and the filtered strategies
look at individual updates, so their output's sensitivity to one site is not bounded by C
and the Gaussian mechanism's guarantee would not hold (`private_strategy` refuses them).

Modes: "central" (the aggregator clips and adds all the noise; it sees every delta) and
"distributed" (the round announcement asks each site to clip its own delta and add
N(0, sigma^2 C^2 / n) to it, `site_noise`, so that the n expected sites' noises sum to
N(0, sigma^2 C^2); the aggregator adds the share of the sites that did not answer, so the
sum always carries the full noise, and clips nothing: the guarantee then rests on the sites
following the announcement. It is meant for secure aggregation (`aggregate_sum`: the
aggregator gets only the sum of the noised deltas); without it, the aggregator still sees
each site's noised delta).

Accounting (Google's dp-accounting): every noised round is one Gaussian mechanism with
noise multiplier sigma, every site taking part (sampling q = 1); rounds compose. RDP
accounting by default (Mironov, "Renyi Differential Privacy", 2017: fast at any number of
rounds, a little loose); PLD (privacy loss distributions, tighter, seconds per evaluation)
with `accountant = "pld"`. The accountant's only state is the number of noised rounds, which the strategy
state keeps in every checkpoint, so epsilon is recomputed after a restart.

The noise comes from numpy's Generator seeded from os.urandom (16 bytes) unless a seed is
given; a seed is for benchmarks and tests only: whoever knows it can subtract the noise.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from turbofed.aggregator.strategies import STRATEGIES, ServerOptimizer, SiteUpdate, Strategy, site_report, stacked_deltas
from turbofed.codec import Weights, flatten, unflatten
from turbofed.config import PrivacySettings
from turbofed.dpnoise import clip, unseeded_rng
from turbofed.errors import ConfigError
from turbofed.messages.fleet import SiteNoise

ROUNDS_KEY = "privacy/dp_rounds"  # in the strategy state of every checkpoint


def _accounting() -> Any:
    try:
        import dp_accounting
    except ImportError:
        raise ConfigError("[privacy] needs the dp-accounting package: pip install 'turbofed[privacy]'") from None
    return dp_accounting


def gaussian_epsilon(noise_multiplier: float, rounds: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon at `delta` after `rounds` Gaussian mechanisms of noise multiplier sigma over
    every site (q = 1), by dp-accounting's PLD or RDP accountant; 0 for no rounds."""
    if rounds <= 0:
        return 0.0
    dp = _accounting()
    acc = dp.pld.PLDAccountant() if accountant == "pld" else dp.rdp.RdpAccountant()
    acc.compose(dp.GaussianDpEvent(noise_multiplier), rounds)
    return float(acc.get_epsilon(delta))


def calibrate_noise(target_epsilon: float, rounds: int, delta: float, accountant: str = "rdp") -> float:
    """The smallest sigma whose `rounds` rounds stay within `target_epsilon` at `delta`
    (dp_accounting.calibrate_dp_mechanism, a bisection on sigma)."""
    dp = _accounting()
    fresh = (lambda: dp.pld.PLDAccountant()) if accountant == "pld" else (lambda: dp.rdp.RdpAccountant())
    return float(dp.calibrate_dp_mechanism(fresh, lambda s: dp.SelfComposedDpEvent(dp.GaussianDpEvent(s), rounds),
                                           target_epsilon, delta, bracket_interval=dp.LowerEndpointAndGuess(0.05, 1.0),
                                           tol=1e-4))


def noised_mean(clipped: np.ndarray, noise_std: float, denominator: int, rng: np.random.Generator) -> np.ndarray:
    """(sum of the clipped deltas + N(0, noise_std^2) per coordinate) / denominator."""
    total = clipped.sum(axis=0)
    return (total + rng.normal(0.0, noise_std, total.shape)) / denominator


class DPFedAvg(Strategy):
    """A FedAvg-family strategy with client-level DP (McMahan et al. 2018) in front: the
    wrapped strategy sees one update, the global model plus the noised mean delta."""

    def __init__(self, inner: Strategy, settings: PrivacySettings, noise_multiplier: float, expected_sites: int) -> None:
        self.inner, self.settings = inner, settings
        self.name = inner.name  # what rounds are announced and recorded as
        self.noise_multiplier, self.expected_sites = noise_multiplier, expected_sites
        self.rng = np.random.default_rng(settings.seed) if settings.seed is not None else unseeded_rng()
        self.dp_rounds = 0
        self.last_report: dict[str, dict[str, Any]] = {}
        self.last_mean = np.zeros(0)  # the noised mean delta of the last round

    def aggregate(self, current: Weights, updates: list[SiteUpdate]) -> Weights:
        if not updates:
            raise ValueError("no updates to aggregate")
        _, base, deltas = stacked_deltas(current, updates)
        if self.settings.mode == "distributed":  # sites clipped and noised: nothing to clip here
            pairs = [(d, 1.0) for d in deltas]
        else:
            pairs = [clip(d, self.settings.clip_norm) for d in deltas]
        clipped = np.stack([c for c, _ in pairs])
        merged = self._noised_step(current, base, clipped.sum(axis=0), len(updates))
        self.last_report = site_report(updates, deltas, self.last_mean, ["clipped" if s < 1.0 else "kept" for _, s in pairs])
        return merged

    def aggregate_sum(self, current: Weights, delta_sum: np.ndarray, count: int) -> Weights:
        """The sum of `count` sites' deltas, each already clipped to C: at the sites, and noised
        there, in distributed mode (all a secure sum gives the aggregator); as they arrived in
        central mode (streaming aggregation, aggregator/streaming.py)."""
        self.last_report = {}
        return self._noised_step(current, flatten(current, list(current)), np.asarray(delta_sum, dtype=np.float64), count)

    def _noised_step(self, current: Weights, base: np.ndarray, total: np.ndarray, count: int) -> Weights:
        """The wrapped strategy's step on base + (total + noise) / n: the noise is the full
        N(0, (sigma C)^2) centrally, and in distributed mode the share of the n - count
        expected sites that sent nothing; n is never below `count` (never amplify one site)."""
        denominator = max(self.expected_sites, count)
        noise_std = self.noise_multiplier * self.settings.clip_norm
        if self.settings.mode == "distributed":
            noise_std *= math.sqrt((denominator - count) / denominator)
        self.last_mean = noised_mean(total[None, :], noise_std, denominator, self.rng)
        self.dp_rounds += 1
        return self.inner.aggregate(current, [SiteUpdate("dp-mean", unflatten(base + self.last_mean, current), 1)])

    def parameters(self) -> dict[str, Any]:
        return self.inner.parameters()

    def site_noise(self) -> SiteNoise | None:
        """What a round announcement asks of each site in distributed mode (None: central)."""
        if self.settings.mode != "distributed":
            return None
        s = self.settings
        return SiteNoise(s.clip_norm, self.noise_multiplier * s.clip_norm / math.sqrt(self.expected_sites))

    def privacy_record(self) -> dict[str, Any]:
        """What this run's DP is, for the "started" event and the round events."""
        s = self.settings
        return {"mode": s.mode, "clip_norm": s.clip_norm, "noise_multiplier": self.noise_multiplier, "delta": s.delta,
                "expected_sites": self.expected_sites, "accountant": s.accountant, "epsilon_budget": self.budget_or_none,
                "target_epsilon": s.target_epsilon, "seeded": s.seed is not None}

    @property
    def budget(self) -> float:
        """The epsilon the fleet may spend: epsilon_budget, else target_epsilon, else infinite."""
        s = self.settings
        return s.epsilon_budget if s.epsilon_budget is not None else (s.target_epsilon if s.target_epsilon is not None else math.inf)

    @property
    def budget_or_none(self) -> float | None:
        """The budget for records (JSON has no infinity): None when unlimited."""
        return None if math.isinf(self.budget) else self.budget

    def epsilon(self, rounds: int | None = None) -> float:
        """Epsilon at the configured delta after `rounds` noised rounds (default: those done)."""
        n = self.dp_rounds if rounds is None else rounds
        return gaussian_epsilon(self.noise_multiplier, n, self.settings.delta, self.settings.accountant)

    def budget_allows_another(self) -> bool:
        """True if one more noised round keeps epsilon within the budget."""
        return self.epsilon(self.dp_rounds + 1) <= self.budget * (1 + 1e-9)

    def state(self) -> dict[str, np.ndarray]:
        return {**self.inner.state(), ROUNDS_KEY: np.array(self.dp_rounds, dtype=np.int64)}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.dp_rounds = int(state[ROUNDS_KEY]) if ROUNDS_KEY in state else 0
        self.inner.load_state({k: v for k, v in state.items() if k != ROUNDS_KEY})


def private_strategy(inner: Strategy, settings: PrivacySettings, rounds: int, n_sites: int, where: str = "[privacy]") -> DPFedAvg:
    """`inner` wrapped with DP-FedAvg per `settings`; sigma calibrated to target_epsilon over
    `rounds` if no noise_multiplier is given. One-line ConfigErrors start with `where`."""
    if type(inner) not in STRATEGIES.values():
        raise ConfigError(f"{where}: differential privacy needs the sum of clipped updates, so it runs only with the "
                          f"FedAvg family ({', '.join(STRATEGIES)}), not strategy {inner.name!r}")
    if isinstance(inner, ServerOptimizer) and inner.clip:
        raise ConfigError(f"{where}: strategy {inner.name!r} clip = {inner.clip:g} must be 0 with [privacy] (clip_norm bounds every site)")
    sigma = settings.noise_multiplier
    if sigma is None:
        sigma = calibrate_noise(settings.target_epsilon, rounds, settings.delta, settings.accountant)
    return DPFedAvg(inner, settings, sigma, settings.expected_sites or n_sites)
