"""Rollback: the aggregator keeps the last good global model and goes back to it when the
sites say the newest one is clearly worse.

Every site scores each global version when it arrives, on its own labelled rows
(`ModelEvaluation`, tfl/v1/sites/<site>/evaluation). Before a round is merged, the
version the round started from is compared with the last good version on the sites that
scored both: when the median of their RMSE ratios (new / last good) exceeds 1 + `margin`,
the new version is judged bad. The aggregator then publishes the last good weights again
as the next version (versions only go forward; agents never accept a lower one) and flags
the round `rollback` in the store. The idea is the validation-based acceptance of
"Byzantine-robust learning on heterogeneous datasets via resampling" and FLTrust's
server-side trust, without a server dataset: the sites' own labels are the check.
A single broken site cannot trigger it (a median over sites) nor prevent it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

MAX_VERSIONS_KEPT = 8  # evaluations older than this many versions are forgotten (memory stays bounded)


@dataclass(frozen=True)
class Verdict:
    """Whether `version` is worse than `against` (the last good version) by more than the margin."""

    version: int
    against: int
    ratio: float | None  # median over sites of RMSE(version) / RMSE(against); None when nobody scored both
    sites: int  # how many sites scored both
    bad: bool

    def detail(self) -> dict[str, object]:
        return {"version": self.version, "last_good": self.against, "ratio": self.ratio, "sites": self.sites}


@dataclass
class ModelGuard:
    """Site evaluations per version and the last version judged good.

    `margin`: how much worse (0.25 = a 25% higher median RMSE ratio) before a rollback; 0
    turns the check off. `min_sites`: how many sites must have scored both versions. A
    version nobody scored both of cannot be judged and counts as good."""

    margin: float
    min_sites: int = 1
    last_good: int = 0
    evaluations: dict[int, dict[str, float]] = field(default_factory=dict)

    def record(self, site: str, version: int, rmse: float, newest: int) -> bool:
        """Keep a site's score of `version` if it is a recent version (<= `newest`); whether kept."""
        if version > newest or version < newest - MAX_VERSIONS_KEPT:
            return False
        self.evaluations.setdefault(version, {})[site] = rmse
        for old in [v for v in self.evaluations if v < newest - MAX_VERSIONS_KEPT and v != self.last_good]:
            del self.evaluations[old]
        return True

    def judge(self, version: int) -> Verdict:
        """Judge `version` against the last good one; a version not judged bad becomes the last good."""
        against = self.last_good
        if self.margin <= 0 or version <= against:
            return Verdict(version, against, None, 0, False)
        new, good = self.evaluations.get(version, {}), self.evaluations.get(against, {})
        ratios = [new[s] / good[s] for s in sorted(new.keys() & good.keys()) if good[s] > 0]
        ratio = statistics.median(ratios) if ratios else None
        bad = ratio is not None and len(ratios) >= self.min_sites and ratio > 1.0 + self.margin
        if not bad:
            self.last_good = version
        return Verdict(version, against, ratio, len(ratios), bad)
