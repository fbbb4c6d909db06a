"""examples/ (issue #17): the fleet, site and gateway configs load with turbofed's own
loaders as they are, their commented secure lines load once `turbofed fleet init` has run,
and as they are they run a site against `turbofed broker --insecure-dev`: the gateway's
readings reach the agent, whose labelled rows the aggregator records."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from turbofed.benchmarks.influx import free_port
from turbofed.config import load_fleet_config, load_gateway_config, load_site_config
from turbofed.deploy.identities import init_from_fleet
from turbofed.errors import ConfigError
from turbofed.simulation.broker import find_mosquitto, start_broker
from turbofed.store import open_store

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FILES = ("fleet.toml", "site.toml", "gateway.toml")


@pytest.fixture
def examples(tmp_path: Path) -> Path:
    """A copy of examples/ (running them writes run/ and pki/ beside the files)."""
    folder = tmp_path / "examples"
    folder.mkdir()
    for name in FILES:
        shutil.copy(EXAMPLES / name, folder / name)
    return folder


def test_the_examples_load_as_they_are_and_agree() -> None:
    fleet = load_fleet_config(EXAMPLES / "fleet.toml")
    site = load_site_config(EXAMPLES / "site.toml")
    gateway = load_gateway_config(EXAMPLES / "gateway.toml")
    assert site.site in fleet.sites and gateway.site == site.site
    brokers = {(c.broker.host, c.broker.port, c.broker.topic_root, c.broker.plant_root) for c in (fleet, site, gateway)}
    assert brokers == {("127.0.0.1", 1883, "tfl/v1", "plant")}  # `turbofed broker --insecure-dev`
    assert Path(site.state_dir).parent.parent == EXAMPLES / "run" and fleet.store == str(EXAMPLES / "run" / "results.sqlite")
    for name in FILES:  # every setting is explained
        lines = (EXAMPLES / name).read_text().splitlines()
        assert sum(line.lstrip().startswith("#") for line in lines) >= 5, name


def _secure(text: str, fleet_id: str) -> str:
    """The file with its development line removed and its commented secure lines taken."""
    text = re.sub(r"^insecure_unsigned = true\n", "", text, flags=re.M)
    text = re.sub(r"^port = 1883 .*\n", "", text, flags=re.M)  # TLS: 8883 by default
    text = re.sub(r"^# ((pki|ca|cert|key|signing_key|aggregator_key) = .*|\[identity\].*)$", r"\1", text, flags=re.M)
    return re.sub(r'^# fleet_id = "\.\.\."(.*)$', f'fleet_id = "{fleet_id}"\\1', text, flags=re.M)


def test_the_commented_secure_lines_load_after_fleet_init(examples: Path) -> None:
    ids = init_from_fleet(examples / "fleet.toml")
    for name in FILES:
        (examples / name).write_text(_secure((examples / name).read_text(), ids.fleet_id))
    fleet = load_fleet_config(examples / "fleet.toml")
    site = load_site_config(examples / "site.toml")
    gateway = load_gateway_config(examples / "gateway.toml")
    assert fleet.pki == str(examples / "pki") and not fleet.insecure_unsigned
    assert site.identity is not None and site.identity.fleet_id == ids.fleet_id
    for config, identity in ((fleet, "aggregator"), (site, "site1"), (gateway, "gateway-site1")):
        assert config.broker.tls and config.broker.port == 8883
        assert Path(config.broker.cert) == ids.client_cert(identity)


def test_a_gateway_file_is_checked(tmp_path: Path) -> None:
    bad = tmp_path / "gateway.toml"
    bad.write_text('site = "a/b"\n')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad))}: site"):
        load_gateway_config(bad)
    bad.write_text('site = "site1"\nsites = ["site1"]\n')
    with pytest.raises(ConfigError, match="unknown key"):
        load_gateway_config(bad)


def _metrics(port: int) -> dict[str, float]:
    """One scrape of 127.0.0.1:port/metrics: unlabelled samples by name."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def _wait_for_status(store_path: Path, procs: list[subprocess.Popen], logs: Path, done, timeout: float = 90.0) -> dict:  # noqa: ANN001
    """site1's status as the aggregator recorded it, once `done(status)` holds; fails early if a process died."""
    deadline = time.monotonic() + timeout
    status: dict = {}
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), (logs / "aggregator.log").read_text()[-2000:] + (logs / "edge.log").read_text()[-2000:]
        if store_path.exists():
            with open_store(store_path) as store:
                status = next(iter(store.site_status()), {})
            if status and done(status):
                return status
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f} s; site1's status: {status}")


def _run(*args: str, cwd: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "turbofed.cli", *args], cwd=cwd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_examples_run_against_the_development_broker(examples: Path, tmp_path: Path) -> None:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed: `turbofed broker --insecure-dev` runs it")
    with start_broker(embedded=False, workdir=tmp_path / "broker") as broker:
        for name in FILES:  # the one change: the free port this test's broker got, instead of 1883
            path = examples / name
            path.write_text(path.read_text().replace("port = 1883", f"port = {broker.port}"))
        scrape = {}  # and, if prometheus-client is here, their commented metrics_port taken (on free ports)
        if importlib.util.find_spec("prometheus_client") is not None:
            for name, example_port in (("fleet.toml", 9464), ("site.toml", 9465)):
                scrape[name] = free_port()
                text = (examples / name).read_text()
                assert f"# metrics_port = {example_port}" in text
                (examples / name).write_text(text.replace(f"# metrics_port = {example_port}", f"metrics_port = {scrape[name]}"))
        procs = [_run("aggregator", "--config", "fleet.toml", cwd=examples, log=tmp_path / "aggregator.log"),
                 _run("edge", "--config", "site.toml", cwd=examples, log=tmp_path / "edge.log")]
        try:
            _wait_for_status(examples / "run" / "results.sqlite", procs, tmp_path, lambda s: s["online"])  # subscribed: readings reach it
            replay = subprocess.run(
                [sys.executable, "-m", "turbofed.cli", "replay", "--gateway", str(examples / "gateway.toml"), "--sites", "1",
                 "--dataset", "SYN", "--part", "train", "--max-engines", "6", "--rate", "max", "--no-progress"],
                capture_output=True, text=True, timeout=120, cwd=tmp_path,
            )
            assert replay.returncode == 0, replay.stderr[-2000:]
            replay_summary = json.loads(replay.stdout.strip().splitlines()[-1])
            status = _wait_for_status(examples / "run" / "results.sqlite", procs, tmp_path, lambda s: s["online"] and (s["samples"] or 0) > 0)
            assert status["site"] == "site1" and status["samples"] > 0, status
            if scrape:  # the real processes serve Prometheus metrics
                aggregator = _metrics(scrape["fleet.toml"])
                assert aggregator["turbofed_sites_online"] == 1 and aggregator["process_resident_memory_bytes"] > 10e6
                deadline = time.monotonic() + 30  # the agent may still be working through its inbox
                while (agent := _metrics(scrape["site.toml"]))["turbofed_readings_total"] < replay_summary["rows"] and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert agent["turbofed_readings_total"] == replay_summary["rows"]
                assert agent["turbofed_labelled_rows"] >= status["samples"] > 0
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(timeout=30)
