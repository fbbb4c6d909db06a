"""Bad input over a real broker: the aggregator refuses bad updates and the agent skips bad
sensor readings, each with a logged reason and a counter, and both keep running."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import astuple
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.livefleet import LiveFleet, site_identity, wait_for
from turbofed import envelope
from turbofed.config import ModelSettings
from turbofed.data.cmapss import load_subset
from turbofed.edge.features import runs_regime_stats, runs_stats
from turbofed.edge.learner import RulModel
from turbofed.messages import RoundAnnouncement, SensorReading, StatsReply, StatsRequest, signed
from turbofed.mqtt import connect, make_client
from turbofed.signing import SigningKey

pytestmark = pytest.mark.slow


class FakeSites:
    """The test speaks for the sites (each with its own identity on the secure broker and its
    own signing key, as a compromised site would), so it can send exactly what it likes."""

    def __init__(self, fleet: LiveFleet) -> None:
        self.fleet, self.topics = fleet, fleet.topics
        self.sealers = {s: signed.site_keys(s, *astuple(site_identity(fleet.pki, s)))[0] for s in fleet.sites}
        self.verifier = signed.site_keys(fleet.sites[0], *astuple(site_identity(fleet.pki, fleet.sites[0])))[1]
        self.round: RoundAnnouncement | None = None
        self.global_payload = b""
        self.seen = threading.Condition()
        self.clients = {}
        for site in fleet.sites:
            settings = fleet.settings(site)
            self.clients[site] = make_client(f"fake-{site}-{fleet.topics.root}", settings)
            connect(self.clients[site], settings)
        self.client = self.clients[fleet.sites[0]]
        self.client.on_message = self._on_message
        for topic in (self.topics.round, self.topics.global_model, self.topics.stats_request):
            self.client.subscribe(topic, qos=1)

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        with self.seen:
            if msg.topic == self.topics.round and msg.payload:
                self.round = RoundAnnouncement.from_payload(self.verifier.open(signed.ROUND, msg.payload, signer=signed.AGGREGATOR).body)
            elif msg.topic == self.topics.global_model:
                self.global_payload = msg.payload
            elif msg.topic == self.topics.stats_request and msg.payload:
                body = self.verifier.open(signed.STATS_REQUEST, msg.payload, signer=signed.AGGREGATOR).body
                self.stats_request = StatsRequest.from_payload(body)
            self.seen.notify_all()

    def send(self, site: str, payload: bytes) -> None:
        self.clients[site].publish(self.topics.update(site), payload, qos=1).wait_for_publish(10)

    def update(self, body: bytes, site: str = "site1", round_no: int | None = None, samples: int = 100) -> bytes:
        r = self.round.round if round_no is None else round_no
        return self.sealers[site].envelope(kind="update", round=r, model_version=self.round.model_version, samples=samples, body=body)

    def forged(self, body: bytes, form: str) -> bytes:
        """An update that claims to be site1's: unsigned, signed with site2's key, or for another fleet."""
        fields = dict(kind="update", round=self.round.round, model_version=self.round.model_version, samples=100, body=body)
        if form == "unsigned":
            return envelope.encode(site="site1", **fields)
        site1, site2 = self.sealers["site1"], self.sealers["site2"]
        sealer = signed.Sealer("0" * 32, site1.key) if form == "wrong_fleet" else signed.Sealer(site1.fleet, SigningKey("site1", site2.key.key))
        return sealer.envelope(**fields)

    def stats(self, reply: StatsReply) -> None:
        self.clients[reply.site].publish(self.topics.stats(reply.site), self.sealers[reply.site].seal(signed.STATS, reply.to_payload()), qos=1)


def poisoned(model: bytes, value: float) -> bytes:
    proto = onnx.load_model_from_string(model)
    init = proto.graph.initializer[0]
    array = onnx.numpy_helper.to_array(init).copy()
    array.flat[7] = value
    init.CopyFrom(onnx.numpy_helper.from_array(array, init.name))
    return proto.SerializeToString()


def external(model: bytes, path: Path) -> bytes:
    """The issue 11 attack: a weight stored as ONNX external data pointing at a file of the aggregator's."""
    proto = onnx.load_model_from_string(model)
    init = proto.graph.initializer[0]
    init.ClearField("raw_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", str(path)), ("offset", "0"), ("length", str(4 * int(np.prod(init.dims))))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def renamed(model: bytes) -> bytes:
    proto = onnx.load_model_from_string(model)
    old = proto.graph.initializer[1].name
    proto.graph.initializer[1].name = "bias_renamed"
    for node in proto.graph.node:
        node.input[:] = ["bias_renamed" if i == old else i for i in node.input]
    return proto.SerializeToString()


def test_aggregator_refuses_bad_updates_and_keeps_going(broker, pki_dir: Path, cmapss_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="turbofed.aggregator")
    settings = ModelSettings(rounds=1, local_epochs=1)
    fleet = LiveFleet(broker, tmp_path, ["site1", "site2"], settings, max_update_bytes=200_000, pki=pki_dir)
    runs = load_subset("FD001", cmapss_dir).train[:10]
    try:
        aggregator = fleet.start_aggregator()
        sites = FakeSites(fleet)
        wait_for("a stats request", lambda: hasattr(sites, "stats_request"))
        assert sites.stats_request.window == settings.window and sites.stats_request.phase == "regimes"
        for site, part in (("site1", runs[:5]), ("site2", runs[5:])):  # phase one: the operating regimes
            cells = runs_regime_stats(part)
            sites.stats(StatsReply(sites.stats_request.request_id, site, int(cells.count), len(part), regime_stats=cells))
        wait_for("the features phase", lambda: sites.stats_request.phase == "features")
        regimes = sites.stats_request.regimes
        assert regimes is not None and regimes.cells == ((0, 0, 100),)  # FD001: one operating condition
        wrong_window = runs_stats(runs[:5], settings.window + 10, regimes)
        reply = StatsReply(sites.stats_request.request_id, "site1", int(wrong_window.count), 5, wrong_window)
        sites.stats(reply)
        wait_for("the wrong-window statistics to be refused", lambda: aggregator.counters["bad_stats"] == 1)
        for site, part in (("site1", runs[:5]), ("site2", runs[5:])):
            stats = runs_stats(part, settings.window, regimes)
            reply = StatsReply(sites.stats_request.request_id, site, int(stats.count), len(part), stats)
            sites.stats(reply)
        # Round 0: the aggregator builds and publishes v0 itself; nobody sends anything.
        wait_for("round 1", lambda: sites.round is not None and sites.round.round == 1 and aggregator.version == 0 and sites.global_payload)
        spec = sites.round.spec
        global_v0 = sites.global_payload
        secret = tmp_path / "fleet.toml"
        secret.write_bytes(b'[influx]\ntoken = "SECRET-influx-token-0123456789"\n' * 200)  # as long as the weight

        good = RulModel(settings.replace(seed=5), spec).to_onnx()
        bad = {
            "bad_magic": np.random.default_rng(0).bytes(3000),
            "not_onnx": sites.update(good[: len(good) // 2]),
            "mismatch": sites.update(RulModel(settings.replace(hidden=(65, 32)), spec).to_onnx()),
            "non_finite": sites.update(poisoned(good, np.nan)),
            "too_large": sites.update(good + b"\0" * 250_000),
            "stale_round": sites.update(good, round_no=0),
            "wrong_sender": sites.update(good, site="site2"),  # site2's own key, on site1's topic: no ACL needed to refuse it
            "foreign_graph": sites.update(external(good, secret)),
            "bad_signature": sites.forged(good, "bad_signature"),  # names site1, signed with site2's key
            "unsigned": sites.forged(good, "unsigned"),
            "wrong_fleet": sites.forged(good, "wrong_fleet"),
        }
        for payload in bad.values():
            sites.send("site1", payload)
        sites.send("site1", sites.update(renamed(good)))
        sites.send("site1", sites.update(poisoned(good, np.inf)))
        sites.send("site1", sites.update(good))  # the first acceptable update from site1
        sites.send("site1", sites.update(good))  # and a second one
        wait_for("every bad update to be counted", lambda: sum(aggregator.counters.values()) == len(bad) + 4)
        assert aggregator.version == 0 and sites.global_payload == global_v0  # nothing touched the model

        sites.send("site2", sites.update(good, site="site2"))
        wait_for("round 1 to close with the good updates", lambda: aggregator.version == 1)
        wait_for("global v1", lambda: envelope.decode(sites.global_payload).model_version == 1)
        assert b"SECRET" not in sites.global_payload and b"SECRET" not in aggregator.model.SerializeToString()
    finally:
        fleet.close()
    expected = {**{k: 1 for k in bad}, "foreign_graph": 2, "non_finite": 2, "duplicate": 1, "bad_stats": 1}  # renamed: foreign_graph
    assert dict(aggregator.counters) == expected
    from turbofed.store import open_store

    recorded = [r["reason"] for r in open_store(fleet.fleet.store).rejections()]
    assert sorted(recorded) == sorted(r for r, n in expected.items() for _ in range(n))
    logged = [r.getMessage() for r in caplog.records if "rejected from site1" in r.getMessage()]
    assert len(logged) == len(expected)  # once per reason per minute: the second mismatch and non_finite are counted, not logged
    assert any("holds 1 non-finite value" in m for m in logged)
    assert any("envelope names site 'site2' but arrived on 'site1'" in m for m in logged)
    assert any("stats from site1 are for a 40-cycle window, not 30" in m for m in logged)
    assert any("initializer 'coefficient' is external data" in m for m in logged)
    assert aggregator.stats.count == sum(len(r.cycles) for r in runs)  # the refused statistics were not counted


def test_agent_skips_malformed_readings_and_keeps_running(broker, pki_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="turbofed.edge")
    fleet = LiveFleet(broker, tmp_path, ["site1"], pki=pki_dir)
    ok = SensorReading(1, (0.0, 0.0, 100.0), tuple(float(i) for i in range(21)))
    raw = lambda **kw: json.dumps({"cycle": 2, "settings": [0, 0, 100], "sensors": list(range(21)), **kw}).encode()  # noqa: E731
    bad = {
        "wrong_fields": raw(sensors=list(range(20))),
        "not_a_number": raw(sensors=["abc"] + list(range(20))),
        "not_finite": raw(sensors=[float("nan")] + list(range(20))),
        "not_json": b"cycle=2 sensors=1,2,3",
        "cycle_backwards": ok.to_payload(),
        "implausible": raw(sensors=[1e308] * 21),  # crashed the agent (JSON of its own report) before
        "bad_cycle": raw(cycle=10**30),
    }
    try:
        agent = fleet.start_agent("site1", engines=("e1", "e2"))
        gateway = fleet.settings("gateway-site1")
        client = make_client(f"gateway-{fleet.broker.topic_root}", gateway)
        connect(client, gateway)
        client.publish(fleet.topics.sensors("site1", "e1"), ok.to_payload(), qos=1)
        for payload in bad.values():
            client.publish(fleet.topics.sensors("site1", "e1"), payload, qos=1)
        client.publish(fleet.topics.sensors("site1", "e9"), ok.to_payload(), qos=1)  # not this site's engine
        good = SensorReading(2, ok.settings, ok.sensors).to_payload()
        client.publish(fleet.topics.sensors("site1", "e1"), good, qos=1).wait_for_publish(10)
        wait_for("the good readings", lambda: agent.counters["readings"] == 2)
        client.disconnect()
    finally:
        fleet.close()
    for reason in [*bad, "unknown_engine"]:
        assert agent.counters[f"rejected.{reason}"] == 1, reason
    assert agent.engines["e1"].history()[0].tolist() == [1, 2] and "e9" not in agent.engines
    messages = [r.getMessage() for r in caplog.records]
    assert any("sensors has 20 values, expected 21" in m for m in messages)
    assert any("cycle 1 does not follow 1" in m for m in messages)
    assert any("engine 'e9' is not in this site's engine list" in m for m in messages)


def test_a_statistics_window_sweep_recovers_nothing(broker, pki_dir: Path, cmapss_dir: Path, tmp_path: Path) -> None:
    """The attack that recovered every raw sensor value of an engine: ask for windows 2..N.
    An outsider's requests are unsigned and refused; here the attacker even holds the
    aggregator's key (a compromised aggregator). The site answers the first request only
    (over >= 5 engines, all summed) and refuses, counts and publishes nothing for every later one."""
    fleet = LiveFleet(broker, tmp_path, ["site1"], pki=pki_dir)
    sealer = signed.aggregator_keys(str(pki_dir))[0]
    opener = signed.aggregator_keys(str(pki_dir))[1]
    replies: list[StatsReply] = []
    try:
        agent = fleet.start_agent("site1", min_stats_engines=5)
        for run in load_subset("FD001", cmapss_dir).train[:6]:
            agent.buffer.add(f"e{run.unit}", run.cycles, run.sensors, run.rul())
        attacker = make_client(f"attacker-{fleet.broker.topic_root}", fleet.broker)
        stats_topic = fleet.topics.stats("site1")
        # amqtt may also hand this client retained messages of other topics: only the site's replies count.
        attacker.on_message = lambda c, u, msg: msg.topic == stats_topic and replies.append(
            StatsReply.from_payload(opener.open(signed.STATS, msg.payload, signer="site1").body, site="site1"))
        connect(attacker, fleet.broker)
        attacker.subscribe(stats_topic, qos=1)
        windows = range(2, 41)
        for w in windows:
            request = sealer.seal(signed.STATS_REQUEST, StatsRequest(f"sweep-{w}", 1, w).to_payload())
            attacker.publish(fleet.topics.stats_request, request, qos=1).wait_for_publish(10)
        request = sealer.seal(signed.STATS_REQUEST, StatsRequest("huge", 1, 2000).to_payload())
        attacker.publish(fleet.topics.stats_request, request, qos=1).wait_for_publish(10)
        refused = lambda: sum(v for k, v in agent.counters.items() if k.startswith("rejected.stats_"))  # noqa: E731
        wait_for("every request after the first to be refused", lambda: refused() == len(windows))
        attacker.publish(fleet.topics.stats_request, b"", qos=1, retain=True)
        attacker.disconnect()
    finally:
        fleet.close()
    assert [r.request_id for r in replies] == ["sweep-2"]  # one answer, summed over all six engines
    assert replies[0].engines == 6 and replies[0].stats.count == sum(len(r.cycles) for r in load_subset("FD001", cmapss_dir).train[:6])
    assert agent.counters["rejected.stats_repeated"] == len(windows) - 1 and agent.counters["rejected.stats_unaffordable"] == 1
