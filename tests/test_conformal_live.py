"""Conformal intervals in the live fleet (real Mosquitto, TLS, signed messages): sites hold
calibration engines back, send residual histograms of the final model, the aggregator ships
the interval table in the signed final announcement, and every federated prediction after it
carries [lower, upper] into the results store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.livefleet import LiveFleet, wait_for
from turbofed.config import IntervalSettings, ModelSettings
from turbofed.conformal import IntervalTable
from turbofed.store import open_store

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("broker", ["mosquitto"], indirect=True)
def test_predictions_carry_the_fleets_conformal_interval(broker, pki_dir: Path, cmapss_dir: Path, tmp_path: Path) -> None:
    fleet = LiveFleet(broker, tmp_path, ["site1", "site2"], ModelSettings(rounds=2, local_epochs=1), pki=pki_dir,
                      intervals=IntervalSettings(coverage=0.9, min_group_residuals=50))
    try:
        agents = [fleet.start_agent(site, holdout_share=0.4) for site in fleet.sites]
        train = fleet.replay("train", 24, cmapss_dir)
        wait_for("sites to keep every failed engine (training or calibration)",
                 lambda: sum(a.buffer.rows + a.holdout.rows for a in agents) == train["rows"], 60)
        held = {a.site: len(a.holdout.engines) for a in agents}
        assert all(n >= 2 for n in held.values()) and sum(a.buffer.rows for a in agents) < train["rows"], held
        aggregator = fleet.start_aggregator()
        store = open_store(fleet.fleet.store)
        wait_for("the interval table of the final model at every site",
                 lambda: all(a.intervals is not None and a.intervals.model_version == a.global_version == 2 for a in agents), 120)
        wait_for("the intervals event in the store", lambda: any(e["kind"] == "intervals" for e in store.events()), 30)
        event = next(e for e in store.events() if e["kind"] == "intervals")
        table = IntervalTable.from_dict(event["detail"]["table"])
        assert sorted(event["detail"]["sites"]) == fleet.sites and event["detail"]["engines"] == sum(held.values())
        assert table == agents[0].intervals and table.model_version == aggregator.version == 2 and table.coverage == 0.9
        assert sum(table.residuals) > 0

        test = fleet.replay("test", 6, cmapss_dir)

        def with_interval() -> list[dict]:
            return [r for r in store.latest_predictions() if r["lower"] is not None]
        wait_for("every test engine's latest prediction with an interval in the store",
                 lambda: len(with_interval()) == test["engines"]["test"], 60)
    finally:
        fleet.close()
    for row in with_interval():  # exactly the table applied to the federated RUL (the agent rounds to 3 places)
        lower, upper = table.interval(np.array([row["federated"]]), ModelSettings().rul_cap)
        assert (row["lower"], row["upper"]) == pytest.approx((float(lower[0]), float(upper[0])), abs=1e-3), row
        assert 0 <= row["lower"] <= row["upper"] <= 125
    assert not store.rejections()
