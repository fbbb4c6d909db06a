"""An InfluxDB-API server outage in the middle of a replay loses no round result and no prediction.

The server is victoria-metrics (InfluxDB v2 write API) on loopback. A replay thread records
what the aggregator records during a live replay: every 100 ms each site's batch of
predictions (one new cycle per engine, both models), and every second a closed round, the
sites' metrics and an event. After a few seconds the server is stopped for 10 s, then
restarted on the same storage path and port. Afterwards every point is in the server, those
recorded during the outage included, and no recorder call waited on the network.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from turbofed.benchmarks.influx import VictoriaMetrics, find_victoria_metrics

pytest.importorskip("influxdb_client", reason="influxdb-client is not installed: pip install 'turbofed[influx]'")

from turbofed.store.influx_write import InfluxSettings, InfluxStore  # noqa: E402 - after the importorskip

SITES = ("site-1", "site-2", "site-3")
ENGINES = tuple(f"engine-{e}" for e in range(1, 21))
OUTAGE_S = 10.0


class Replay(threading.Thread):
    """Records predictions at 10 reports/s per site and a round every second, remembering
    what it recorded and whether the server was down at the time."""

    def __init__(self, store: InfluxStore, server_down: threading.Event) -> None:
        super().__init__(name="replay", daemon=True)
        self.store, self.server_down = store, server_down
        self.stop = threading.Event()
        self.predictions: dict[tuple[str, str, str, int], bool] = {}  # (site, engine, model, cycle) -> during outage
        self.rounds: dict[int, bool] = {}
        self.slowest_call = 0.0
        self.error: BaseException | None = None

    def _timed(self, call: Any, *args: Any) -> None:
        started = time.perf_counter()
        call(*args)
        self.slowest_call = max(self.slowest_call, time.perf_counter() - started)

    def run(self) -> None:
        try:
            cycle, next_round = 0, time.monotonic() + 1.0
            while not self.stop.is_set():
                cycle += 1
                down = self.server_down.is_set()
                for site in SITES:
                    rows = [(engine, cycle, 200.0 - cycle + e / 8, 190.0 - cycle + e / 8)
                            for e, engine in enumerate(ENGINES)]
                    self._timed(self.store.record_predictions, site, rows, time.time())
                    for engine, *_ in rows:
                        for model in ("local", "federated"):
                            self.predictions[(site, engine, model, cycle)] = down
                if time.monotonic() >= next_round:
                    number = len(self.rounds) + 1
                    now = time.time()
                    parts = [{"site": s, "samples": 100 * number, "update_bytes": 4096} for s in SITES]
                    self._timed(self.store.record_round, number, number, now - 0.8, now, parts, 5.0, "fedavg", "quorum")
                    for site in SITES:
                        self._timed(self.store.record_metrics, site, number, number,
                                    {"engines": len(ENGINES), "local": {"rmse": 20.0, "score": 300.0},
                                     "federated": {"rmse": 18.0, "score": 250.0}}, now)
                    self._timed(self.store.record_event, "round_closed", {"round": number}, now)
                    self.rounds[number] = down
                    next_round += 1.0
                self.stop.wait(0.1)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


@pytest.mark.slow
def test_outage_of_10s_loses_no_round_result_or_prediction(tmp_path: Path) -> None:
    if find_victoria_metrics() is None:
        pytest.skip("victoria-metrics is not installed (apt-get install -y victoria-metrics)")
    server = VictoriaMetrics(tmp_path / "vm")
    server.start(timeout=20)
    replay: Replay | None = None
    try:
        store = InfluxStore(InfluxSettings(url=server.url, org="fleet", bucket="telemetry",
                                           spool_dir=str(tmp_path / "spool"), retry_interval_ms=250,
                                           max_retry_delay_ms=2_000, timeout_ms=3_000))
        down = threading.Event()
        replay = Replay(store, down)
        replay.start()
        time.sleep(3.0)
        server.stop()
        down.set()
        time.sleep(OUTAGE_S)
        assert store.write_stats()["offline"]
        server.start(timeout=20)  # same storage path, same port
        down.clear()
        time.sleep(3.0)
        replay.stop.set()
        replay.join(10)
        assert replay.error is None, replay.error
        assert store.flush(timeout=30), store.write_stats()
        stats = store.write_stats()
        store.close()

        assert stats["spooled"] > 0 and stats["dropped"] == 0 and stats["rejected"] == 0 and stats["lost"] == 0
        # No recorder call waited for the server to come back (how fast calls are is the benchmark's business).
        assert replay.slowest_call < OUTAGE_S / 4, f"a recorder call took {replay.slowest_call:.3f}s"
        during = [k for k, d in replay.predictions.items() if d]
        assert len(during) >= 3 * 20 * 2 * 50  # ~10 s of reports while the server was down
        assert sum(replay.rounds.values()) >= 8

        # Every prediction: one sample per (site, engine, model) and cycle, RUL as recorded.
        found: set[tuple[str, str, str, int]] = set()
        for kind in ("cycle", "rul"):
            for s in server.export(f"predictions_{kind}"):
                m = s["metric"]
                assert len(set(s["timestamps"])) == len(s["timestamps"])  # no duplicates either
                if kind == "cycle":
                    found.update((m["site"], m["engine"], m["model"], int(v)) for v in s["values"])
        assert found == set(replay.predictions)
        assert sum(len(s["values"]) for s in server.export("predictions_rul")) == len(replay.predictions)

        # Every round result, its participants, every site's metrics and every event.
        rounds = {int(v) for s in server.export("rounds_round") for v in s["values"]}
        assert rounds == set(replay.rounds)
        participants = server.export("round_participants_samples")
        assert {m["metric"]["site"]: len(m["values"]) for m in participants} == {s: len(rounds) for s in SITES}
        metrics = server.export("metrics_round")
        assert sorted(len(m["values"]) for m in metrics) == [len(rounds)] * 6
        assert sum(len(s["values"]) for s in server.export("events_at")) == len(rounds)
    finally:
        if replay is not None:
            replay.stop.set()
        server.stop()
