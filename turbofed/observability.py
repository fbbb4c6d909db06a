"""Prometheus metrics of the aggregator and of each edge agent (issue #17), all defined here.

Served over HTTP (`/metrics`) when the config names a port: fleet.toml's or site.toml's
`metrics_port` (and `metrics_address`, default 127.0.0.1). Off unless asked for: a device
needs no HTTP server and no prometheus-client (it is the `[metrics]` extra, never in a
device bundle). Names and meanings: docs/operations.md, "Prometheus metrics".

Most values are read from the running service when Prometheus scrapes (its counters,
model version, sites online), so the services need no instrumentation in their hot paths:
only the aggregator reports each closed round (`AggregatorMetrics.round_closed`), for the
update-size and aggregation-time histograms. Every process also exports prometheus-client's
standard `process_*` metrics (resident memory, CPU seconds, open files).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from turbofed.errors import ConfigError

PREFIX = "turbofed"
# Update sizes: a small MLP's update is ~25 KB; the envelope's limit is 4 MiB.
UPDATE_BYTES_BUCKETS = (4_096, 16_384, 32_768, 65_536, 131_072, 262_144, 524_288, 1_048_576, 2_097_152, 4_194_304)
# Last update in -> global model out, seconds.
AGGREGATION_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _client() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise ConfigError("metrics_port is set but prometheus-client is not installed: pip install 'turbofed[metrics]'") from None
    return prometheus_client


def _snapshot(counters: Mapping[str, int]) -> dict[str, int]:
    """A copy of a Counter the service's worker thread keeps changing (dict() of a dict copies
    under the GIL; a concurrent resize is retried)."""
    for _ in range(5):
        try:
            return dict(counters)
        except RuntimeError:
            continue
    return {}


class _ServiceCollector:
    """Reads a running service at scrape time; `families()` says what to read."""

    def __init__(self, read) -> None:  # noqa: ANN001
        self._read = read

    def collect(self) -> Iterator[Any]:
        yield from self._read()

    def describe(self) -> Iterable[Any]:
        return []  # not known before the first scrape: registered unchecked


class MetricsServer:
    """One registry, its collectors and the HTTP server serving it; `close()` stops it."""

    def __init__(self, address: str, port: int) -> None:
        self.prom = _client()
        import prometheus_client.core

        self.core = prometheus_client.core  # the metric families a collector yields
        self.registry = self.prom.CollectorRegistry()
        self.prom.ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, CPU, fds
        self.address, self.requested_port = address, port
        self._server: Any = None

    def start(self) -> "MetricsServer":
        try:
            server, _thread = self.prom.start_http_server(self.requested_port, addr=self.address, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"metrics_port {self.requested_port} on {self.address}: cannot listen ({exc.strerror or exc})") from None
        self._server = server
        return self

    @property
    def port(self) -> int:
        """The port it listens on (the one the OS chose when asked for 0)."""
        return int(self._server.server_port) if self._server is not None else self.requested_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _gauge(self, name: str, doc: str, value: float, labels: Mapping[str, str] | None = None) -> Any:
        family = self.core.GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels or {}))
        family.add_metric(list((labels or {}).values()), value)
        return family

    def _counter(self, name: str, doc: str, values: Mapping[tuple[str, ...], float], labels: tuple[str, ...] = ()) -> Any:
        family = self.core.CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))
        for key, value in sorted(values.items()):
            family.add_metric(list(key), value)
        return family

    def _info(self, role: str, name: str) -> Any:
        import turbofed

        family = self.core.InfoMetricFamily(f"{PREFIX}_build", "turbofed version, role and name of this process")
        family.add_metric([], {"version": turbofed.__version__, "role": role, "name": name})
        return family


class AggregatorMetrics(MetricsServer):
    """The aggregator's metrics: rounds, model version, sites online, refusals by reason,
    update bytes and aggregation time per round."""

    def __init__(self, aggregator: Any, address: str, port: int) -> None:
        super().__init__(address, port)
        self.aggregator = aggregator
        self._lock = threading.Lock()
        self.rounds = self.prom.Counter(f"{PREFIX}_rounds", "federated rounds closed by this aggregator process", registry=self.registry)
        self.update_bytes = self.prom.Histogram(f"{PREFIX}_update_bytes", "size on the wire of each update a closed round took",
                                                buckets=UPDATE_BYTES_BUCKETS, registry=self.registry)
        self.aggregation = self.prom.Histogram(f"{PREFIX}_aggregation_seconds", "last update in -> global model out, per round",
                                               buckets=AGGREGATION_SECONDS_BUCKETS, registry=self.registry)
        self.registry.register(_ServiceCollector(self._read))

    def round_closed(self, participants: Iterable[Mapping[str, Any]], aggregate_ms: float) -> None:
        """Called by the aggregator once a round's global model is on disk and in the store."""
        self.rounds.inc()
        for p in participants:
            if p.get("update_bytes"):
                self.update_bytes.observe(float(p["update_bytes"]))
        self.aggregation.observe(max(float(aggregate_ms), 0.0) / 1000.0)

    def _read(self) -> Iterator[Any]:
        a = self.aggregator
        yield self._info("aggregator", "aggregator")
        yield self._gauge("model_version", "version of the newest global model (-1: none yet)", a.version)
        online = dict(getattr(a, "site_online", {}) or {})
        yield self._gauge("sites", "sites the fleet config names", len(a.config.sites))
        yield self._gauge("sites_online", "sites whose latest status says online", sum(bool(online.get(s)) for s in a.config.sites))
        refusals = {(reason,): n for reason, n in _snapshot(a.counters).items() if n}
        yield self._counter("refusals", "messages refused, by reason (docs/protocol.md)", refusals, ("reason",))


class AgentMetrics(MetricsServer):
    """An edge agent's metrics: readings, predictions per model, refusals by reason, updates
    sent, model version, labelled rows and engines tracked."""

    def __init__(self, agent: Any, address: str, port: int) -> None:
        super().__init__(address, port)
        self.agent = agent
        self.registry.register(_ServiceCollector(self._read))

    def _read(self) -> Iterator[Any]:
        a = self.agent
        counters = _snapshot(a.counters)
        yield self._info("site", a.site)
        yield self._counter("readings", "sensor readings taken (rate(): readings per second)", {(): counters.get("readings", 0)})
        yield self._counter("predictions", "RUL predictions made, per model", {
            ("local",): counters.get("predictions.local", 0), ("federated",): counters.get("predictions.federated", 0)}, ("model",))
        yield self._counter("predictions_out_of_range", "predictions whose input lay outside the model's training range (extrapolations)",
                            {(): counters.get("predictions.out_of_range", 0)})
        refusals = {(key.removeprefix("rejected."),): n for key, n in counters.items() if key.startswith("rejected.") and n}
        if counters.get("internal_error"):
            refusals[("internal_error",)] = counters["internal_error"]
        yield self._counter("refusals", "messages refused, by reason (docs/protocol.md)", refusals, ("reason",))
        yield self._counter("updates_sent", "model updates sent to the aggregator", {(): counters.get("sent.update", 0)})
        yield self._gauge("model_version", "version of the global model the site follows (-1: none yet)", a.global_version)
        yield self._gauge("labelled_rows", "labelled cycles in the training buffer", a.buffer.rows)
        yield self._gauge("engines_tracked", "engines with a window in memory", len(a.engines))


def serve_aggregator_metrics(aggregator: Any, address: str, port: int | None) -> AggregatorMetrics | None:
    """Start the aggregator's /metrics on address:port; None (and nothing imported) without a port."""
    return None if port is None else AggregatorMetrics(aggregator, address, port).start()


def serve_agent_metrics(agent: Any, address: str, port: int | None) -> AgentMetrics | None:
    """Start an agent's /metrics on address:port; None (and nothing imported) without a port."""
    return None if port is None else AgentMetrics(agent, address, port).start()
