"""Byzantine-robust strategies: a compromised (or broken) site cannot drag the global model
where it likes.

All of them work on update *deltas* (an update minus the global model it started from),
flattened to one vector per site, and record for every site what they did with it
(`last_report`: the delta's norm, its cosine to the aggregate delta, and the action: kept,
clipped, trimmed or excluded), which the aggregator stores per round.

- `Median`: coordinate-wise median (Yin et al., "Byzantine-Robust Distributed Learning:
  Towards Optimal Statistical Rates", ICML 2018).
- `TrimmedMean`: coordinate-wise beta-trimmed mean (same paper).
- `MultiKrum`: the m updates closest to their n - f - 2 nearest neighbours, averaged
  (Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient
  Descent", NeurIPS 2017; multi-Krum as in El Mhamdi et al., ICML 2018).
- `FilteredFedAvg`: updates far from the round's coordinate-wise median delta are excluded
  (the filtering step of FLAME, Nguyen et al., USENIX Security 2022, with the median as the
  centre, Yin et al. 2018), the rest clipped to the same distance bound and averaged
  FedAvg-style with capped sample shares.
- `ClippedFedAvg`: every delta clipped to `clip` x the round's median delta norm (norm
  bounding, Sun et al., "Can You Really Backdoor Federated Learning?", 2019), and no site
  weighted above `max_share` of the round's samples, then FedAvg.

Sample counts are what each site says; the median, trimmed mean and Krum ignore them, and
`ClippedFedAvg` caps them, so an inflated count buys nothing.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from turbofed.aggregator.strategies import POSITIVE, Range, SiteUpdate, Strategy, clip_scales, site_report, stacked_deltas
from turbofed.codec import Weights, unflatten


class DeltaStrategy(Strategy):
    """Base: deltas in, one aggregate delta out, applied with `server_lr`."""

    name = "delta-base"

    def __init__(self, server_lr: float = 1.0) -> None:
        self.server_lr = server_lr
        self.last_report: dict[str, dict[str, Any]] = {}

    def combine(self, deltas: np.ndarray, samples: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """(n, d) deltas and (n,) claimed sample counts -> aggregate delta and one action per site."""
        raise NotImplementedError

    def aggregate(self, current: Weights, updates: list[SiteUpdate]) -> Weights:
        if not updates:
            raise ValueError("no updates to aggregate")
        names, base, deltas = stacked_deltas(current, updates)
        samples = np.array([max(int(u.samples), 0) for u in updates], dtype=np.float64)
        combined, actions = self.combine(deltas, samples)
        self.last_report = site_report(updates, deltas, combined, actions)
        return unflatten(base + self.server_lr * combined, current)


class Median(DeltaStrategy):
    """Coordinate-wise median of the deltas (Yin et al., ICML 2018). Tolerates up to half
    the sites minus one being arbitrary. Sample counts are ignored. A site is reported
    'trimmed' when it sat in the lowest or highest fifth of the sites in most coordinates.

    Parameters:
        server_lr: step applied to the median delta, > 0 (default 1.0).
    """

    name = "median"
    ranges = {"server_lr": POSITIVE}

    def combine(self, deltas: np.ndarray, samples: np.ndarray) -> tuple[np.ndarray, list[str]]:
        n = len(deltas)
        k = max(1, n // 5) if n >= 3 else 0  # report as a 0.2-trimmed mean would
        return np.median(deltas, axis=0), _trim_actions(deltas, keep_low=k, keep_high=n - k - 1) if k else ["kept"] * n


class TrimmedMean(DeltaStrategy):
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018): per coordinate, the lowest and
    highest `beta` fraction of the sites' values are dropped and the rest averaged.

    Parameters:
        beta: fraction trimmed at each end, in [0, 0.5) (default 0.2; with 5 sites it drops one
            value at each end).
        server_lr: step applied to the trimmed-mean delta, > 0 (default 1.0).
    """

    name = "trimmed-mean"
    ranges = {"beta": Range(0.0, 0.5, high_open=True), "server_lr": POSITIVE}

    def __init__(self, beta: float = 0.2, server_lr: float = 1.0) -> None:
        super().__init__(server_lr)
        self.beta = beta

    def combine(self, deltas: np.ndarray, samples: np.ndarray) -> tuple[np.ndarray, list[str]]:
        n = len(deltas)
        k = int(math.floor(self.beta * n))
        if n - 2 * k < 1:
            k = (n - 1) // 2
        ordered = np.sort(deltas, axis=0)
        mean = ordered[k:n - k].mean(axis=0)
        return mean, _trim_actions(deltas, keep_low=k, keep_high=n - k - 1) if k else ["kept"] * n


def _trim_actions(deltas: np.ndarray, keep_low: int, keep_high: int) -> list[str]:
    """'trimmed' for a site whose value ranked outside [keep_low, keep_high] in more than half
    of the coordinates: an honest site lands at an end now and then, a site pushing one
    direction lands there almost always."""
    n = len(deltas)
    ranks = np.argsort(np.argsort(deltas, axis=0, kind="stable"), axis=0, kind="stable")
    outside = ((ranks < keep_low) | (ranks > keep_high)).mean(axis=1)
    return ["trimmed" if outside[i] > 0.5 else "kept" for i in range(n)]


class MultiKrum(DeltaStrategy):
    """Multi-Krum (Blanchard et al., NeurIPS 2017; El Mhamdi et al., ICML 2018): each delta
    is scored by the summed squared distance to its n - f - 2 nearest others; the `m` best
    (default n - f) are averaged, the rest excluded. Sample counts are ignored.

    Parameters:
        f: how many sites may be Byzantine, >= 0 (default 1); needs n > 2f + 2 sites to hold.
        m: how many deltas to average, 0 = n - f (default 0).
        server_lr: step applied to the averaged delta, > 0 (default 1.0).
    """

    name = "multi-krum"
    ranges = {"f": Range(0, math.inf), "m": Range(0, math.inf), "server_lr": POSITIVE}

    def __init__(self, f: int = 1, m: int = 0, server_lr: float = 1.0) -> None:
        super().__init__(server_lr)
        self.f, self.m = f, m

    def combine(self, deltas: np.ndarray, samples: np.ndarray) -> tuple[np.ndarray, list[str]]:
        n = len(deltas)
        chosen_count = min(n, self.m or max(n - self.f, 1))
        if n <= 2:
            return deltas.mean(axis=0), ["kept"] * n
        squared = np.sum(deltas * deltas, axis=1)
        dist = np.maximum(squared[:, None] + squared[None, :] - 2.0 * deltas @ deltas.T, 0.0)
        neighbours = max(n - self.f - 2, 1)
        scores = np.array([np.sort(np.delete(dist[i], i))[:neighbours].sum() for i in range(n)])
        chosen = np.argsort(scores, kind="stable")[:chosen_count]
        actions = ["kept" if i in set(chosen.tolist()) else "excluded" for i in range(n)]
        return deltas[chosen].mean(axis=0), actions


class ClippedFedAvg(DeltaStrategy):
    """FedAvg behind a norm bound: each delta longer than `clip` x the round's median delta
    norm is scaled down to it (Sun et al., 2019), and no site counts for more than
    `max_share` of the round's samples, then the sample-weighted mean is applied.

    Parameters:
        clip: the bound as a multiple of the median delta norm, > 0 (default 2.0).
        max_share: the largest share of the round's weight one site may have, in (0, 1]
            (default 0.5).
        server_lr: step applied to the mean delta, > 0 (default 1.0).
    """

    name = "clipped-fedavg"
    ranges = {"clip": POSITIVE, "max_share": Range(0.0, 1.0, low_open=True), "server_lr": POSITIVE}

    def __init__(self, clip: float = 2.0, max_share: float = 0.5, server_lr: float = 1.0) -> None:
        super().__init__(server_lr)
        self.clip, self.max_share = clip, max_share

    def combine(self, deltas: np.ndarray, samples: np.ndarray) -> tuple[np.ndarray, list[str]]:
        scale = clip_scales(np.linalg.norm(deltas, axis=1), self.clip)
        clipped = deltas * scale[:, None]
        weights = capped_shares(samples, self.max_share)
        actions = ["clipped" if s < 1.0 else "kept" for s in scale]
        return weights @ clipped, actions


class FilteredFedAvg(DeltaStrategy):
    """FedAvg over the updates that look like the round: each delta's distance to the
    coordinate-wise median delta (a centre no minority can move far, Yin et al. 2018) is
    compared with the median of those distances; a delta more than `radius` times farther is
    excluded (the filtering idea of FLAME, Nguyen et al., "FLAME: Taming Backdoors in Federated
    Learning", USENIX Security 2022), at most the minority `(n - 1) // 2` farthest. The kept
    deltas are clipped to that distance bound around the centre and averaged with their
    sample shares, no site above `max_share`. Without an attack every site is usually kept and
    this is FedAvg; a scaled, sign-flipped, noisy or wrongly-labelled update lands far away and
    is excluded; one that hides near the mean ("a little is enough") can only move the model
    as far as an honest site could.

    Parameters:
        radius: the exclusion bound as a multiple of the median distance to the centre, > 1
            (default 3.0).
        max_share: the largest share of the round's weight one site may have, in (0, 1]
            (default 0.5).
        server_lr: step applied to the mean delta, > 0 (default 1.0).
    """

    name = "filtered-fedavg"
    ranges = {"radius": Range(1.0, math.inf, low_open=True), "max_share": Range(0.0, 1.0, low_open=True), "server_lr": POSITIVE}

    def __init__(self, radius: float = 3.0, max_share: float = 0.5, server_lr: float = 1.0) -> None:
        super().__init__(server_lr)
        self.radius, self.max_share = radius, max_share

    def combine(self, deltas: np.ndarray, samples: np.ndarray) -> tuple[np.ndarray, list[str]]:
        n = len(deltas)
        if n <= 2:  # no majority to tell an outlier by
            return capped_shares(samples, self.max_share) @ deltas, ["kept"] * n
        centre = np.median(deltas, axis=0)
        offsets = deltas - centre
        distance = np.linalg.norm(offsets, axis=1)
        bound = self.radius * float(np.median(distance))
        far = np.argsort(-distance, kind="stable")[: (n - 1) // 2]
        excluded = {int(i) for i in far if distance[i] > bound}
        kept = np.array([i for i in range(n) if i not in excluded])
        scale = np.where(distance[kept] > bound, bound / np.maximum(distance[kept], 1e-300), 1.0)
        clipped = centre + offsets[kept] * scale[:, None]
        weights = capped_shares(samples[kept], self.max_share)
        clipped_sites = {int(i) for i, f in zip(kept, scale) if f < 1.0}
        actions = ["excluded" if i in excluded else "clipped" if i in clipped_sites else "kept" for i in range(n)]
        return weights @ clipped, actions


def capped_shares(samples: np.ndarray, max_share: float) -> np.ndarray:
    """Sample shares with none above `max_share` (the excess spread over the others, in
    proportion); equal shares when nobody claims samples or the cap cannot be met."""
    n = len(samples)
    if n == 0:
        return samples
    cap = max(max_share, 1.0 / n)
    total = samples.sum()
    shares = samples / total if total > 0 else np.full(n, 1.0 / n)
    for _ in range(n):
        over = shares > cap + 1e-12
        if not over.any():
            break
        excess = float((shares[over] - cap).sum())
        shares[over] = cap
        under = ~over & (shares < cap)
        room = shares[under].sum()
        if room <= 0:
            shares[under] += excess / max(int(under.sum()), 1)
        else:
            shares[under] += excess * shares[under] / room
    return shares


ROBUST: dict[str, type[Strategy]] = {s.name: s for s in (Median, TrimmedMean, MultiKrum, FilteredFedAvg, ClippedFedAvg)}
