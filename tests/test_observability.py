"""Prometheus metrics (issue #17): the aggregator and an edge agent, each running in this
process with its /metrics served on a free 127.0.0.1 port, scraped over HTTP and parsed
with Prometheus' own text parser. Every metric name docs/operations.md lists is served,
and every served turbofed metric is listed there. (tests/test_examples.py scrapes the real
`turbofed aggregator` and `turbofed edge` processes too.)"""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import pytest

from tests.fakeclient import FakeClient
from tests.inprocess import SETTINGS, SPEC, RecordingClient, config, run_round, save_versions
from turbofed import envelope
from turbofed.codec import read_weights
from turbofed.config import SiteConfig
from turbofed.errors import ConfigError
from turbofed.graph import reference_model
from turbofed.layout import N_SENSORS
from turbofed.messages import RoundAnnouncement, SensorReading, Status
from turbofed.topics import Topics

prometheus = pytest.importorskip("prometheus_client", reason="prometheus-client is not installed: pip install 'turbofed[metrics]'")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from turbofed.observability import serve_agent_metrics, serve_aggregator_metrics  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs" / "operations.md"


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics -> {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def documented() -> set[str]:
    """The metric names docs/operations.md's table lists (`turbofed_...`)."""
    section = DOCS.read_text().split("## Prometheus metrics", 1)[1]
    return set(re.findall(r"`(turbofed_[a-z_]+)(?:\{[^}]*\})?`", section))


def served(samples: dict) -> set[str]:
    """Names of the turbofed samples, histograms' _bucket/_sum/_count folded (and no _created timestamps)."""
    return {_family(name) for name, _ in samples if name.startswith("turbofed_") and not name.endswith("_created")}


def _family(name: str) -> str:
    return re.sub(r"_(bucket|sum|count)$", "", name)


def test_aggregator_metrics_scraped_over_http(tmp_path: Path) -> None:
    from turbofed.aggregator.service import Aggregator

    save_versions(tmp_path / "registry", range(1))
    aggregator = Aggregator(config(tmp_path))
    aggregator.client = RecordingClient()
    metrics = serve_aggregator_metrics(aggregator, "127.0.0.1", 0)
    aggregator.metrics = metrics
    try:
        before = scrape(metrics.port)
        assert before[("turbofed_model_version", ())] == 0 and before[("turbofed_rounds_total", ())] == 0
        assert before[("turbofed_sites", ())] == 2 and before[("turbofed_sites_online", ())] == 0
        base = read_weights(aggregator.model)
        run_round(aggregator, {s: ({n: w + 0.5 for n, w in base.items()}, 100) for s in ("site1", "site2")})
        aggregator.inbox.put((aggregator.topics.status("site1"), Status("site1", True).to_payload()))
        aggregator.inbox.put((aggregator.topics.status("site1"), Status("site9", True).to_payload()))  # another site's name: refused
        aggregator.pump(0)
        aggregator.pump(0)
        after = scrape(metrics.port)
        participants = aggregator.store.rounds()[-1]["participants"]
        assert after[("turbofed_rounds_total", ())] == 1 and after[("turbofed_model_version", ())] == 1
        assert after[("turbofed_update_bytes_count", ())] == 2
        assert after[("turbofed_update_bytes_sum", ())] == sum(p["update_bytes"] for p in participants) > 0
        assert after[("turbofed_aggregation_seconds_count", ())] == 1
        assert after[("turbofed_refusals_total", (("reason", "wrong_sender"),))] == 1
        assert after[("turbofed_sites_online", ())] == 1
        assert after[("turbofed_build_info", (("name", "aggregator"), ("role", "aggregator"), ("version", "0.1.0")))] == 1
        assert after[("process_resident_memory_bytes", ())] > 10e6
        assert served(after) == documented() & served(after)  # every served name is documented
    finally:
        metrics.close()
        aggregator.store.close()
        aggregator.registry.close()


def test_agent_metrics_scraped_over_http(tmp_path: Path) -> None:
    from turbofed.edge.agent import EdgeAgent

    topics = Topics()
    agent = EdgeAgent(SiteConfig(site="s1", state_dir=str(tmp_path / "state"), insecure_unsigned=True), training=False)
    agent.client = FakeClient()
    metrics = serve_agent_metrics(agent, "127.0.0.1", 0)
    try:
        model = reference_model(SPEC, SETTINGS).SerializeToString()  # the fleet's v0, as the aggregator builds it
        agent.handle(topics.round, RoundAnnouncement(1, SPEC, announce_id="a", model_version=0, deadline=1e12, settings=SETTINGS).to_payload())
        agent.handle(topics.global_model, envelope.encode(kind="global", site="aggregator", round=0, model_version=0, samples=10, body=model))
        for cycle in range(1, 41):
            agent.handle(topics.sensors("s1", "e1"), SensorReading(cycle, (0.0, 0.0, 100.0), tuple(1.0 + i for i in range(N_SENSORS))).to_payload())
        agent.handle(topics.sensors("s1", "e1"), SensorReading(41, (0.0, 0.0, 100.0), (1e9,) * N_SENSORS).to_payload())  # implausible
        samples = scrape(metrics.port)
        assert samples[("turbofed_readings_total", ())] == 40
        assert samples[("turbofed_predictions_total", (("model", "federated"),))] == 40
        assert samples[("turbofed_predictions_total", (("model", "local"),))] == 0  # inference only: no local model
        # SPEC scales the cycle feature by 2 around 0.5: beyond OUT_OF_RANGE_Z = 8 from cycle 17 (the sensors stay inside)
        assert samples[("turbofed_predictions_out_of_range_total", ())] == 24
        assert samples[("turbofed_refusals_total", (("reason", "implausible"),))] == 1
        assert samples[("turbofed_model_version", ())] == 0
        assert samples[("turbofed_engines_tracked", ())] == 1 and samples[("turbofed_labelled_rows", ())] == 0
        assert samples[("turbofed_updates_sent_total", ())] == 0
        assert samples[("process_resident_memory_bytes", ())] > 10e6
        assert served(samples) == documented() & served(samples)
    finally:
        metrics.close()


def test_every_documented_name_is_served_by_someone(tmp_path: Path) -> None:
    """The docs list no metric that neither process serves (names read off the code's output)."""
    from turbofed.observability import AgentMetrics, AggregatorMetrics

    class Stub:  # the attributes the collectors read, nothing else
        version = global_version = -1
        site = "s"
        counters = {"wrong_sender": 1, "rejected.wrong_sender": 1}
        site_online: dict = {}
        engines: dict = {}
        buffer = type("B", (), {"rows": 0})()
        config = type("C", (), {"sites": ("s",)})()

    names = set()
    for cls in (AggregatorMetrics, AgentMetrics):
        server = cls(Stub(), "127.0.0.1", 0)
        text = prometheus.generate_latest(server.registry).decode()
        names |= {_family(s.name) for f in text_string_to_metric_families(text) for s in f.samples if not s.name.endswith("_created")}
    assert documented() <= names


def test_a_port_in_use_is_a_one_line_config_error(tmp_path: Path) -> None:
    import socket

    from turbofed.observability import AgentMetrics

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"metrics_port {port} on 127.0.0.1: cannot listen"):
            AgentMetrics(object(), "127.0.0.1", port).start()


def test_off_unless_a_port_is_given() -> None:
    assert serve_agent_metrics(object(), "127.0.0.1", None) is None
    assert serve_aggregator_metrics(object(), "127.0.0.1", None) is None
