"""Streaming aggregation for the FedAvg family: each validated update is folded into running
sums as it arrives, so a round holds O(model) numbers, not O(sites x model).

FedAvg's merge is Σ w·θ / Σ w (McMahan et al., AISTATS 2017); FedAvgM and FedAdam step on
the same weighted mean, and DP-FedAvg on the sum of clipped deltas, so one running sum
serves them all. The one thing that needs more than the sum is the share cap
(aggregator/weights.py: no update above `max_site_share` of the round's total weight),
known only when the round closes. An update it lowers is among the ceil(1 / share)
heaviest (k capped updates hold k · share < 1 of the total), so those are kept, and only
those: at close each capped one is taken back out of the sums at the weight it loses.

Per site only its weight and its delta's norm are kept; the cosine of a delta to the
round's aggregate cannot be had without the delta, so it is reported as None. Robust
strategies (median, Krum, trimmed mean, filtered and clipped FedAvg) need every update and
keep them (Round.accepted), O(sites x model): docs/scaling.md.

Two-level rounds (aggregator/regional.py): a regional aggregator folds its sites into a
RunningSum and sends its `final_sum`; the top aggregator adds each region's pair with
`add_partial`, so the top-level mean is Σ over regions of Σ w·θ / Σ over regions of Σ w,
the flat FedAvg of the same updates. The share cap of a partial's sites was applied in
their region; they are not lowered again at the top (`from_partials`).
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from turbofed.codec import Weights, flatten, unflatten


class RunningSum:
    """Σ w·θ and Σ w over the updates of one round, the heaviest `keep` updates, and each
    site's weight and delta norm."""

    def __init__(self, current: Weights, share: float) -> None:
        self.current, self.names = current, list(current)
        self.base = flatten(current, self.names)
        self.total = np.zeros_like(self.base)
        self.weight = 0
        self.keep = math.ceil(1.0 / share) if share < 1.0 else 0
        self._heaviest: list[tuple[int, int, str, np.ndarray]] = []  # min-heap of (weight, arrival, site, vector)
        self.weights: dict[str, int] = {}
        self.norms: dict[str, float] = {}
        self.from_partials: set[str] = set()  # sites folded in through a region's partial (not cappable here)
        self.summed: dict[str, str] = {}  # site -> region, for sites a region's summary partial sums (no weight known)
        self.regions: dict[str, dict] = {}  # region -> its summary's totals and Σ w (`samples`), for the round's record

    def add(self, site: str, weights: Weights, weight: int, clip_norm: float | None = None) -> None:
        """Fold one update in. `clip_norm`: its delta is first cut to that L2 norm (DP-FedAvg)."""
        vector = flatten(weights, self.names)
        delta = vector - self.base
        norm = float(np.linalg.norm(delta))
        if clip_norm is not None and norm > clip_norm:
            vector = self.base + delta * (clip_norm / norm)
        self.total += weight * vector
        self.weight += weight
        self.weights[site], self.norms[site] = weight, norm
        if self.keep:
            heapq.heappush(self._heaviest, (weight, len(self.weights), site, vector))
            if len(self._heaviest) > self.keep:
                heapq.heappop(self._heaviest)

    def delta_sum(self) -> np.ndarray:
        """Σ w·(θ - current): with weights 1, the sum of the (clipped) deltas."""
        return self.total - self.weight * self.base

    def add_partial(self, total: np.ndarray, weight: int, sites: dict[str, tuple[int, float]],
                    region: str | None = None, summed: tuple[str, ...] = (), summary: dict | None = None) -> None:
        """Fold in a region's Σ w·θ (`total`, float64, in this sum's name order) and Σ w, with
        each of its sites' (weight, delta norm) for the round's records, or, for a summary
        partial, which sites it sums and its totals."""
        self.total += total
        self.weight += weight
        for site, (w, norm) in sites.items():
            self.weights[site], self.norms[site] = w, norm
            self.from_partials.add(site)
        if region is not None and summary is not None:
            self.summed.update(dict.fromkeys(summed, region))
            self.regions[region] = {"samples": weight, **{k: v for k, v in summary.items() if k != "digest"}}

    def mean(self, final: dict[str, int]) -> tuple[Weights, int]:
        """The weighted mean with each site at its `final` weight (at most the weight it was
        folded in with; lower only for the heaviest, which are kept), and its Σ w (which
        counts the sites of summary partials, absent from `final`)."""
        total, weight = self.final_sum(final)
        return unflatten(total / weight, self.current), weight

    def final_sum(self, final: dict[str, int]) -> tuple[np.ndarray, int]:
        """Σ w·θ (float64) and Σ w with each site at its `final` weight (see `mean`)."""
        total, weight = self.total.copy(), self.weight
        kept = {site: vector for _, _, site, vector in self._heaviest}
        for site, w in final.items():
            lost = self.weights[site] - w
            if lost < 0 or (lost and site not in kept):
                raise ValueError(f"{site}: final weight {w} is not a cut of the {self.weights[site]} it was folded in with "
                                 "(only the heaviest updates can be lowered)")
            if lost:
                total -= lost * kept[site]
                weight -= lost
        return total, weight
