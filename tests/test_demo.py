"""`turbofed demo` end to end, as separate processes, on both brokers: its federated model
learns as well as the in-process benchmark with the same seed and settings. On Mosquitto it
runs the secure setup (TLS, each process its own identity); amqtt runs insecure, saying so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from turbofed.benchmarks.accuracy import run_accuracy
from turbofed.config import ModelSettings
from turbofed.simulation.broker import find_mosquitto
from turbofed.simulation.demo import HOLDOUT_SHARE
from turbofed.store import open_store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench(cmapss_dir: Path) -> dict:
    """The benchmark with the demo's hold-out: a fifth of each site's engines out of training."""
    return run_accuracy("FD001", str(cmapss_dir), 4, ModelSettings(seed=0), holdout=HOLDOUT_SHARE)


@pytest.mark.parametrize("kind", ["mosquitto", "amqtt"])
def test_demo_matches_in_process_benchmark(kind: str, bench: dict, cmapss_dir: Path, tmp_path: Path) -> None:
    if kind == "mosquitto" and find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    out = tmp_path / "demo.json"
    cmd = [sys.executable, "-m", "turbofed.cli", "demo", "--data-dir", str(cmapss_dir), "--workdir", str(tmp_path / "demo"), "--seed", "0", "--json", str(out)]
    if kind == "amqtt":
        cmd.append("--embedded-broker")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["broker"] == kind
    assert set(result) >= {"seconds", "store", "broker", "data", "sites"}
    assert [s["site"] for s in result["sites"]] == ["site1", "site2", "site3", "site4"]
    assert sum(s["engines"] for s in result["sites"]) == 100
    for row in result["sites"]:
        assert set(row["local"]) == set(row["federated"]) == {"rmse", "score"}
    demo_rmse, bench_rmse = result["fleet"]["federated"]["rmse"], bench["federated"]["FD001"]["rmse"]
    assert abs(demo_rmse - bench_rmse) <= 0.05 * bench_rmse, (demo_rmse, bench_rmse)
    assert "local RMSE" in done.stdout and f"turbofed dashboard --store {result['store']}" in done.stdout
    assert Path(result["store"]).is_file()
    with open_store(Path(result["store"])) as store:  # the learning curve and the intervals are there when it ends
        curve = store.validation_metrics()
        assert {(r["site"], r["round"]) for r in curve} == {(s, n) for s in ("site1", "site2", "site3", "site4")
                                                             for n in range(1, ModelSettings().rounds + 1)}
        latest = store.latest_predictions()
        assert len(latest) == 100 and all(p["lower"] is not None and p["lower"] <= p["federated"] <= p["upper"] for p in latest)
    work = tmp_path / "demo"
    if kind == "mosquitto":
        assert result["secure"] is True and "TLS" in done.stderr
        assert 'cert = "pki/identities/site1/client.crt"' in (work / "site1.toml").read_text()
        assert 'key = "pki/identities/aggregator/client.key"' in (work / "fleet.toml").read_text()
        broker_log = (work / "broker" / "mosquitto.log").read_text()
        for identity in ("site1", "site4", "aggregator", "monitor", "gateway-site1", "gateway-site4"):
            assert f"u'{identity}')" in broker_log, identity  # each process connected as itself
    else:
        assert result["secure"] is False and "INSECURE" in done.stderr
