"""An update's weight is bounded by what the aggregator knows of the site (aggregator/weights.py)."""

from __future__ import annotations

import pytest

from turbofed.aggregator.weights import MAX_SAMPLES, capped_weights


def test_honest_claims_are_kept() -> None:
    w = capped_weights({"a": 300, "b": 200, "c": 250}, {"a": 300, "b": 200, "c": 250}, 0.5)
    assert {s: (x.used, x.note) for s, x in w.items()} == {"a": (300, None), "b": (200, None), "c": (250, None)}


def test_claim_capped_by_observed_samples() -> None:
    w = capped_weights({"a": MAX_SAMPLES, "b": 200, "c": 250}, {"a": 300, "b": 200}, 0.5)
    assert (w["a"].used, w["a"].claimed) == (300, MAX_SAMPLES)
    assert "observed" in w["a"].note and w["c"].used == 250  # unknown site: only the share cap applies


@pytest.mark.parametrize("share", [0.5, 0.4, 0.9])
def test_share_cap_is_a_fixed_point(share: float) -> None:
    w = capped_weights({"a": 10**9, "b": 300, "c": 200}, {}, share)
    total = sum(x.used for x in w.values())
    assert all(x.used <= share * total + 1 for x in w.values())
    assert w["b"].used == 300 and w["c"].used == 200 and "share" in w["a"].note


def test_too_few_sites_for_the_share_gives_equal_weights() -> None:
    w = capped_weights({"a": MAX_SAMPLES, "b": 100}, {}, 0.3)
    assert w["a"].used == w["b"].used == 100
