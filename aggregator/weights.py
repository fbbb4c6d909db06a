"""How much each update counts: never more than the aggregator knows about the site.

A site's `samples` is its own claim; a hostile or broken site could claim 2**53-1 and own
the global model. The weight used is the claim capped by (a) the most samples the
aggregator has observed for that site (its fleet-statistics reply or its status, the
larger), where it has observed any, and (b) `max_site_share` of the round's total, so no
single site outweighs the rest beyond that share. Each cap is reported per site.

The share cap needs more than 1 / max_site_share updates to be met without making every
weight equal (two updates and a share of 0.5 would), so with fewer it is not applied and
only the observed-samples cap holds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

MAX_SAMPLES = 2**53 - 1  # the envelope's integer limit (exact in every JSON implementation)


@dataclass(frozen=True)
class Weight:
    """The weight an update gets and, if it is less than claimed, why."""

    claimed: int
    used: int
    note: str | None = None


def capped_weights(claims: dict[str, int], known: dict[str, int], max_share: float) -> dict[str, Weight]:
    """Per site: its claim capped by what is known of it, then by `max_share` of the total.

    The share cap is the water-filling fixed point: the largest weights are lowered to one
    level c with c = max_share * (sum of the others + k * c); with too few updates for the
    share it is not applied."""
    used = {s: max(1, min(int(c), MAX_SAMPLES, known[s] if known.get(s, 0) > 0 else MAX_SAMPLES)) for s, c in claims.items()}
    notes = {s: f"weight capped at {used[s]} observed samples (claimed {c})" for s, c in claims.items() if used[s] < c}
    level = _share_level(list(used.values()), max_share)
    if level is not None:
        for s, w in used.items():
            if w > level:
                used[s] = level
                notes[s] = f"weight capped at {level} ({max_share:g} share of the round; claimed {claims[s]})"
    return {s: Weight(int(claims[s]), used[s], notes.get(s)) for s in claims}


def _share_level(weights: list[int], share: float) -> int | None:
    """The level the largest weights are lowered to so none exceeds `share` of the total, or None if none does."""
    if len(weights) * share <= 1 or max(weights) <= share * sum(weights):
        return None
    ordered = sorted(weights, reverse=True)
    for k in range(1, len(ordered)):
        if k * share >= 1:
            break
        rest = sum(ordered[k:])
        level = share * rest / (1 - k * share)
        if ordered[k] <= level <= ordered[k - 1]:
            return max(1, int(level))
    return min(weights)


def observe_samples(known: dict[str, int], site: str, samples: int | None) -> None:
    """Remember in `known` the most samples `site` has said it holds (its statistics reply or
    status, the larger): cap (a) on its update's weight. Anything but a positive int is no news."""
    if isinstance(samples, int) and samples > 0:
        known[site] = max(known.get(site, 0), min(samples, MAX_SAMPLES))


def header_samples(samples: Iterable[int]) -> int:
    """A global's `samples` header: the sum of the weights used, within the envelope's limit."""
    return min(sum(int(s) for s in samples), MAX_SAMPLES)


def participant_action(strategy_action: str | None, note: str | None) -> str | None:
    """What happened to an update: the strategy's action, and a weight cap if there was one."""
    if note is None:
        return strategy_action
    return f"{strategy_action or 'kept'}; {note}"
