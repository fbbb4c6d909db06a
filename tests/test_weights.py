"""An update's weight is bounded by what the aggregator knows of the site (aggregator/weights.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from turbofed.aggregator.weights import MAX_SAMPLES, capped_weights, observe_samples


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


def test_observed_samples_keep_the_most_a_site_said_within_the_limit() -> None:
    """The top aggregator and a region remember a site's samples the same way (one helper)."""
    known: dict[str, int] = {}
    for samples in (300, 200, 0, -5, None, "900", 2.5e3):  # smaller, non-positive and non-int reports are no news
        observe_samples(known, "a", samples)
    assert known == {"a": 300}
    observe_samples(known, "b", MAX_SAMPLES + 10)
    assert known == {"a": 300, "b": MAX_SAMPLES}


def test_share_cap_needs_enough_sites() -> None:
    """Two updates and a share of 0.5 could only be met by equal weights: not applied."""
    w = capped_weights({"a": 600, "b": 400}, {}, 0.5)
    assert (w["a"].used, w["a"].note, w["b"].used) == (600, None, 400)


def test_a_round_with_a_huge_sample_claim(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """In process, the aggregator's own round code: one update claims 2**53-1 samples. No crash,
    the global is the mean the capped weights make, the record shows the cap, and the global's
    header is valid (its samples within the envelope's limit); the cap is logged once."""
    import numpy as np
    import onnx

    from tests.inprocess import RecordingClient, config, run_round, save_versions
    from turbofed.aggregator.service import Aggregator
    from turbofed.codec import read_weights
    from turbofed.config import StrategySettings

    save_versions(tmp_path / "registry", range(1, 2))
    # Plain FedAvg: the cap is the aggregator's, whatever the strategy (the default would also cap the share at half).
    aggregator, client = Aggregator(config(tmp_path, strategy=StrategySettings("fedavg"))), RecordingClient()
    caplog.set_level(logging.WARNING, logger="turbofed.aggregator")
    try:
        aggregator.client = client
        aggregator.known_samples = {"site1": 400, "site2": 600}  # what their statistics replies said
        caplog.clear()  # what the round logs, not the start
        base = read_weights(aggregator.model)
        run_round(aggregator, {"site1": ({n: w + 1.0 for n, w in base.items()}, MAX_SAMPLES),
                               "site2": ({n: w - 1.0 for n, w in base.items()}, 600)})
        assert aggregator.version == 2
        merged = read_weights(aggregator.model)
        for n, w in base.items():  # 400 and 600: 0.4 * (w + 1) + 0.6 * (w - 1) = w - 0.2
            np.testing.assert_allclose(merged[n], w - 0.2, rtol=1e-5, atol=1e-5)
        (last,) = client.published
        assert (last.model_version, last.samples) == (2, 1000)
        onnx.checker.check_model(onnx.load_model_from_string(last.body))
        (row,) = [r for r in aggregator.store.rounds() if r["round"] == 2]
        parts = {p["site"]: p for p in row["participants"]}
        assert parts["site1"]["samples"] == 400 and "weight capped at 400" in parts["site1"]["action"]
        assert parts["site2"]["samples"] == 600 and parts["site2"]["action"] == "kept"
        capped = [r.getMessage() for r in caplog.records if r.name == "turbofed.aggregator" and r.levelno == logging.WARNING]
        assert capped == [f"round 2: site1: weight capped at 400 observed samples (claimed {MAX_SAMPLES})"]  # the note, once
    finally:
        aggregator.store.close()
        aggregator.registry.close()
