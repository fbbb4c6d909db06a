"""Signed messages (docs/protocol.md, "Signed messages"): every kind of message that is
unsigned, mis-signed, for another fleet or from the wrong signer is refused with its
Refusal and counted; agents take a global model only in a version a signed round
announcement vouches for; a forged retained global changes nothing on a live fleet."""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.fakeclient import FakeClient
from tests.livefleet import LiveFleet, site_identity, wait_for
from turbofed import envelope
from turbofed.config import FleetConfig, ModelSettings, SiteConfig, load_fleet_config, load_site_config
from turbofed.errors import ConfigError
from turbofed.messages import Metrics, Predictions, RoundAnnouncement, StatsReply, StatsRequest, Status, Telemetry, signed
from turbofed.refusals import Refusal
from turbofed.signing import SigningKey
from turbofed.topics import Topics

MAX_VERSION = 2**53 - 1
OTHER_FLEET = "0" * 32
REFUSED_FORMS = ("unsigned", "bad_signature", "wrong_fleet", "wrong_sender")


def tiny_onnx(scale: float = 1.0) -> bytes:
    """A loadable ONNX model (y = x * scale): enough for an agent to take it as its global model."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1])
    w = helper.make_tensor("w", TensorProto.FLOAT, [1], [scale])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["y"])], "tiny", [x], [y], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8).SerializeToString()


class Keys:
    """The fleet's real sealers, and the forgers each refusal needs."""

    def __init__(self, pki: Path) -> None:
        self.fleet_id = json.loads((pki / "fleet.json").read_text())["fleet_id"]
        self.site = {s: signed.site_keys(s, *_identity(pki, s))[0] for s in ("site1", "site2")}
        self.aggregator = signed.aggregator_keys(str(pki))[0]
        site1, site2 = self.site["site1"].key, self.site["site2"].key
        self.as_site1 = {  # how each form of forgery claims to be site1
            "bad_signature": signed.Sealer(self.fleet_id, SigningKey("site1", site2.key)),  # site2's key, site1's name
            "wrong_fleet": signed.Sealer(OTHER_FLEET, site1),
            "wrong_sender": self.site["site2"],  # validly signed, by site2, on site1's topic
        }
        self.as_aggregator = {
            "bad_signature": signed.Sealer(self.fleet_id, SigningKey(signed.AGGREGATOR, site1.key)),
            "wrong_fleet": signed.Sealer(OTHER_FLEET, self.aggregator.key),
            "wrong_sender": self.site["site1"],
        }


def _identity(pki: Path, site: str) -> tuple[str, str, str]:
    ident = site_identity(pki, site)
    return ident.fleet_id, ident.signing_key, ident.aggregator_key


@pytest.fixture(scope="module")
def keys(pki_dir: Path) -> Keys:
    return Keys(pki_dir)


# --- what the aggregator receives ---------------------------------------------------------

SITE_JSON = {
    "status": (signed.STATUS, lambda: Status("site1", True, at=1.0).to_payload()),
    "metrics": (signed.METRICS, lambda: Metrics("site1", 0, 0).to_payload()),
    "predictions": (signed.PREDICTIONS, lambda: Predictions("site1", (("e1", 1, 10.0, 11.0),)).to_payload()),
    "telemetry": (signed.TELEMETRY, lambda: Telemetry("site1", (("e1", 1, (0.0,) * 3, (1.0,) * 21),)).to_payload()),
    "stats": (signed.STATS, lambda: StatsReply("req", "site1", 0, 0, None).to_payload()),
}


def _site_payloads(keys: Keys, topic_kind: str) -> dict[str, bytes]:
    """site1's message of `topic_kind` in each refused form, and the genuine one under 'valid'."""
    if topic_kind == "update":
        fields = dict(kind="skip", round=0, model_version=0, samples=0, body=b"")
        out = {"unsigned": envelope.encode(site="site1", **fields)}
        out.update({form: sealer.envelope(**fields) for form, sealer in keys.as_site1.items()})
        out["valid"] = keys.site["site1"].envelope(**fields)
        return out
    kind, body = SITE_JSON[topic_kind]
    out = {"unsigned": body()}
    out.update({form: sealer.seal(kind, body()) for form, sealer in keys.as_site1.items()})
    out["valid"] = keys.site["site1"].seal(kind, body())
    return out


def test_aggregator_refuses_every_forged_site_message_and_counts_it(pki_dir: Path, keys: Keys, tmp_path: Path) -> None:
    from turbofed.aggregator.rounds import Round
    from turbofed.aggregator.service import Aggregator

    config = FleetConfig(sites=("site1", "site2"), store=str(tmp_path / "r.sqlite"), registry=str(tmp_path / "reg"), pki=str(pki_dir))
    aggregator = Aggregator(config)
    try:
        aggregator.round = Round(0, 0, "a1", time.time(), time.time() + 600, config.sites)
        aggregator.stats_request_id = "req"
        topics = aggregator.topics
        for kind in ("update", *SITE_JSON):
            payloads = _site_payloads(keys, kind)
            for form in REFUSED_FORMS:
                before = aggregator.counters[form]
                aggregator.inbox.put((topics.site("site1", kind), payloads[form]))
                aggregator.pump(1.0)
                assert aggregator.counters[form] == before + 1, (kind, form, dict(aggregator.counters))
            refused = sum(aggregator.counters.values())
            aggregator.inbox.put((topics.site("site1", kind), payloads["valid"]))
            aggregator.pump(1.0)
            assert sum(aggregator.counters.values()) == refused, (kind, dict(aggregator.counters))  # the genuine one passes
        assert aggregator.round.skipped == {"site1": 0}
        assert aggregator.stats_replies["site1"].site == "site1"
        assert dict(aggregator.counters) == {form: 1 + len(SITE_JSON) for form in REFUSED_FORMS}
        recorded = sorted(r["reason"] for r in aggregator.store.rejections())
        assert recorded == sorted(REFUSED_FORMS)  # one store row per (site, reason) per minute; the counters hold every one
    finally:
        aggregator.store.close()
        aggregator.registry.close()


def test_a_revoked_site_is_an_unknown_signer(pki_dir: Path, keys: Keys, tmp_path: Path) -> None:
    import shutil

    from turbofed.deploy.identities import FleetIdentities, revoke_identity

    pki = tmp_path / "pki"
    shutil.copytree(pki_dir, pki)
    revoke_identity(FleetIdentities(pki), "site2")
    verifier = signed.aggregator_keys(str(pki))[1]
    with pytest.raises(signed.SignatureError) as err:
        verifier.open(signed.STATUS, keys.site["site2"].seal(signed.STATUS, Status("site2", True).to_payload()), signer="site2")
    assert err.value.reason is Refusal.UNKNOWN_SIGNER
    verifier.open(signed.STATUS, keys.site["site1"].seal(signed.STATUS, Status("site1", True).to_payload()), signer="site1")


# --- what an agent receives ---------------------------------------------------------------


class Recorder(FakeClient):
    """Stands in for the MQTT client of an agent under test: keeps what it publishes."""

    @property
    def published(self) -> list[tuple[str, bytes]]:
        return self.sent


def _agent(pki_dir: Path, tmp_path: Path):  # noqa: ANN202
    from turbofed.edge.agent import EdgeAgent

    config = SiteConfig(site="site1", state_dir=str(tmp_path / "state"), identity=site_identity(pki_dir, "site1"))
    agent = EdgeAgent(config, training=False)
    agent.client = Recorder()
    return agent


def _announcement(number: int, start: int, epoch: int = 0) -> RoundAnnouncement:
    return RoundAnnouncement(number, None, announce_id=uuid.uuid4().hex, model_version=start, deadline=time.time() + 600,
                             settings=ModelSettings(), min_samples=10, epoch=epoch)


def _announce(sealer, ann: RoundAnnouncement) -> bytes:  # noqa: ANN001
    return sealer.seal(signed.ROUND, ann.to_payload(), round=ann.round, version=ann.version)


def _global(sealer, version: int, body: bytes | None = None, epoch: int = 0) -> bytes:  # noqa: ANN001
    return sealer.envelope(kind="global", round=version, model_version=version, samples=1, body=body or tiny_onnx(), epoch=epoch)


def test_agent_refuses_every_forged_aggregator_message_and_counts_it(pki_dir: Path, keys: Keys, tmp_path: Path) -> None:
    agent = _agent(pki_dir, tmp_path)
    t = agent.topics
    ann, request = _announcement(1, 0), StatsRequest("req", 10, 30)
    plain_global = envelope.encode(kind="global", site=signed.AGGREGATOR, round=0, model_version=0, samples=1, body=tiny_onnx())
    forms = {"unsigned": {t.round: ann.to_payload(), t.stats_request: request.to_payload(), t.global_model: plain_global}}
    for form, sealer in keys.as_aggregator.items():
        forms[form] = {t.round: _announce(sealer, ann), t.stats_request: sealer.seal(signed.STATS_REQUEST, request.to_payload()),
                       t.global_model: _global(sealer, 0)}
    for form, payloads in forms.items():
        for topic, payload in payloads.items():
            before = agent.counters[f"rejected.{form}"]
            agent.handle(topic, payload)
            assert agent.counters[f"rejected.{form}"] == before + 1, (form, topic, dict(agent.counters))
    assert {k: v for k, v in agent.counters.items() if k.startswith("rejected.")} == {f"rejected.{f}": 3 for f in REFUSED_FORMS}
    assert agent.announced is None and agent.global_version == -1 and agent.client.published == []  # nothing answered
    for k in range(agent.config.min_stats_engines):  # enough labelled engines for the statistics rules (test_hardening.py)
        agent.buffer.add(f"e{k}", np.arange(1, 41), np.full((40, 21), float(k)), np.arange(39, -1, -1, dtype=float))
    agent.handle(t.stats_request, keys.aggregator.seal(signed.STATS_REQUEST, request.to_payload()))  # a signed request is answered
    [(topic, reply)] = agent.client.published
    verifier = signed.aggregator_keys(str(pki_dir))[1]
    assert topic == t.stats("site1") and StatsReply.from_payload(verifier.open(signed.STATS, reply, signer="site1").body, site="site1").request_id == "req"


def test_agent_takes_only_announced_versions_and_rolls_back_only_on_a_signed_reset(pki_dir: Path, keys: Keys, tmp_path: Path) -> None:
    agent = _agent(pki_dir, tmp_path)
    t, agg = agent.topics, keys.aggregator
    rejected = lambda reason: agent.counters[f"rejected.{reason}"]  # noqa: E731
    agent.handle(t.global_model, _global(agg, 1))  # before any announcement: held back, not taken
    assert agent.global_version == -1 and rejected("unannounced_version") == 1
    agent.handle(t.round, _announce(agg, _announcement(1, 0)))  # vouches for v0 and v1: the held v1 is taken
    assert agent.global_version == 1
    for version in (3, MAX_VERSION):  # signed by the aggregator, but no announcement named them: no jumps
        agent.handle(t.global_model, _global(agg, version, tiny_onnx(125.0)))
    assert agent.global_version == 1 and rejected("unannounced_version") == 3
    saved = (agent.state_dir / "global.onnx").read_bytes()
    agent.handle(t.global_model, _global(agg, 0))  # an older signed model: ignored, no rollback
    assert agent.global_version == 1 and (agent.state_dir / "global.onnx").read_bytes() == saved
    agent.handle(t.round, _announce(agg, _announcement(2, 1)))
    agent.handle(t.global_model, _global(agg, 2))
    assert agent.global_version == 2
    agent.handle(t.round, _announce(agg, _announcement(1, 0)))  # an old signed announcement replayed
    assert rejected("stale_round") == 1 and agent.announced.round == 2
    # A signed fleet reset: epoch 1 starts again from v0; models signed for epoch 0 no longer verify.
    agent.handle(t.round, _announce(agg, _announcement(0, 0, epoch=1)))
    assert agent.epoch == 1 and agent.global_version == -1
    agent.handle(t.global_model, _global(agg, 0))
    assert rejected("bad_signature") == 1 and agent.global_version == -1
    agent.handle(t.global_model, _global(agg, 0, epoch=1))
    assert agent.global_version == 0
    agent.handle(t.round, _announce(agg, _announcement(5, 4)))  # epoch 0 again: refused
    assert rejected("stale_epoch") == 1 and agent.epoch == 1
    agent.save()
    assert json.loads((agent.state_dir / "state.json").read_text())["epoch"] == 1


def test_forged_global_leaves_model_and_saved_state_unchanged(pki_dir: Path, keys: Keys, tmp_path: Path) -> None:
    agent = _agent(pki_dir, tmp_path)
    t, agg = agent.topics, keys.aggregator
    agent.handle(t.round, _announce(agg, _announcement(1, 0)))
    agent.handle(t.global_model, _global(agg, 0))
    agent.save()
    before = {p.name: p.read_bytes() for p in agent.state_dir.iterdir() if p.name != "state.json"}
    forged = envelope.encode(kind="global", site=signed.AGGREGATOR, round=MAX_VERSION, model_version=MAX_VERSION, samples=1,
                             body=tiny_onnx(125.0))
    agent.handle(t.global_model, forged)
    agent.handle(t.global_model, _global(keys.as_aggregator["bad_signature"], MAX_VERSION, tiny_onnx(125.0)))
    agent.save()
    assert agent.global_version == 0 and agent.global_model == tiny_onnx()
    assert {p.name: p.read_bytes() for p in agent.state_dir.iterdir() if p.name != "state.json"} == before
    assert json.loads((agent.state_dir / "state.json").read_text())["global_version"] == 0
    assert (agent.counters["rejected.unsigned"], agent.counters["rejected.bad_signature"]) == (1, 1)


def test_refusals_are_logged_once_per_reason_per_interval(pki_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="turbofed.edge")
    agent = _agent(pki_dir, tmp_path)
    forged = envelope.encode(kind="global", site=signed.AGGREGATOR, round=1, model_version=1, samples=1, body=tiny_onnx())
    for _ in range(50):
        agent.handle(agent.topics.global_model, forged)
    assert agent.counters["rejected.unsigned"] == 50
    assert len([r for r in caplog.records if "(unsigned," in r.getMessage()]) == 1


# --- size ------------------------------------------------------------------------------------


def test_signed_update_is_at_most_2_percent_larger(keys: Keys) -> None:
    from turbofed.data.synthetic import generate_fleet
    from turbofed.edge.features import runs_stats
    from turbofed.edge.learner import RulModel
    from turbofed.spec import FeatureSpec

    settings = ModelSettings()
    spec = FeatureSpec.from_stats(runs_stats(generate_fleet(n_train=4, n_test=0, seed=0).train, settings.window), settings.window)
    body = RulModel(settings, spec).to_onnx()
    fields = dict(kind="update", round=7, model_version=6, samples=1234, body=body)
    unsigned = envelope.encode(site="site1", **fields)
    signed_update = keys.site["site1"].envelope(**fields)
    assert len(signed_update) <= 1.02 * len(unsigned), (len(signed_update), len(unsigned))
    env = envelope.decode(signed_update)
    assert env.fleet == keys.fleet_id and env.sig is not None and env.body == body


# --- config: secure by default ---------------------------------------------------------------


def test_configs_without_keys_are_refused_unless_explicitly_insecure(pki_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    site = tmp_path / "s.toml"
    site.write_text('site = "site1"\nstate_dir = "state"\n')
    with pytest.raises(ConfigError, match=r"s.toml: no \[identity\] table: .*insecure_unsigned = true"):
        load_site_config(site)
    site.write_text('site = "site1"\nstate_dir = "state"\ninsecure_unsigned = "true"\n')
    with pytest.raises(ConfigError, match=r"s.toml: insecure_unsigned must be true or false, got 'true'"):
        load_site_config(site)
    ident = site_identity(pki_dir, "site1")
    text = f'site = "site1"\nstate_dir = "state"\n[identity]\nfleet_id = "{ident.fleet_id}"\nsigning_key = "keys/signing.key"\naggregator_key = "{ident.aggregator_key}"\n'
    site.write_text(text)
    with pytest.raises(ConfigError, match=rf"s.toml: \[identity\] signing_key: {tmp_path / 'keys' / 'signing.key'}: cannot read signing key"):
        load_site_config(site)
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "signing.key").write_bytes(Path(ident.signing_key).read_bytes())
    config = load_site_config(site)
    assert config.identity.signing_key == str(tmp_path / "keys" / "signing.key") and not config.insecure_unsigned
    fleet = tmp_path / "f.toml"
    fleet.write_text('sites = ["site1"]\nstore = "r.sqlite"\nregistry = "reg"\n')
    with pytest.raises(ConfigError, match=r"f.toml: no pki folder"):
        load_fleet_config(fleet)
    fleet.write_text('sites = ["site1"]\nstore = "r.sqlite"\nregistry = "reg"\npki = "nowhere"\n')
    with pytest.raises(ConfigError, match=r"f.toml: pki: .*nowhere/fleet.json: not found"):
        load_fleet_config(fleet)
    fleet.write_text(f'sites = ["site1"]\nstore = "r.sqlite"\nregistry = "reg"\npki = "{pki_dir}"\n')
    assert load_fleet_config(fleet).pki == str(pki_dir)
    with pytest.raises(ConfigError, match="no \\[identity\\] table"):
        SiteConfig(site="site1", state_dir="x")  # built in code: the same rule
    caplog.set_level(logging.WARNING, logger="turbofed.signed")
    from turbofed.edge.agent import EdgeAgent

    EdgeAgent(SiteConfig(site="site1", state_dir=str(tmp_path / "state"), insecure_unsigned=True), training=False)
    assert any(r.getMessage().startswith("INSECURE: site site1 runs with insecure_unsigned = true") for r in caplog.records)


# --- live: a forged retained global on the real broker ------------------------------------------


def forged_model(real: bytes, rul: float) -> bytes:
    """The real global model with every weight zero and the output bias `rul`: it predicts
    `rul` for every engine."""
    proto = onnx.load_model_from_string(real)
    for init in proto.graph.initializer:
        array = onnx.numpy_helper.to_array(init)
        if array.dtype.kind == "f":
            init.CopyFrom(onnx.numpy_helper.from_array(array * 0, init.name))
    last = [i for i in proto.graph.initializer if onnx.numpy_helper.to_array(i).dtype.kind == "f"][-1]
    array = onnx.numpy_helper.to_array(last)
    last.CopyFrom(onnx.numpy_helper.from_array(array * 0 + rul, last.name))
    return proto.SerializeToString()


@pytest.mark.slow
# Mosquitto: the forger holds the aggregator's broker credentials, so the ACL lets it publish the
# global topic and only the signature stops it (amqtt drops a QoS 1 message now and then under load).
@pytest.mark.parametrize("broker", ["mosquitto"], indirect=True)
def test_forged_retained_global_changes_no_agent_on_a_live_fleet(broker, pki_dir: Path, keys: Keys, cmapss_dir: Path, tmp_path: Path) -> None:
    from turbofed.mqtt import connect, make_client
    from turbofed.store import open_store

    fleet = LiveFleet(broker, tmp_path, ["site1", "site2"], ModelSettings(rounds=2, local_epochs=1), pki=pki_dir)
    topics = Topics(fleet.broker.topic_root, fleet.broker.plant_root)
    try:
        fleet.buffer_training(8, cmapss_dir)
        aggregator = fleet.start_aggregator()
        wait_for("global v0 at every site", lambda: all(a.global_version >= 0 for a in fleet.agents.values()), 120)
        real = aggregator.registry.latest().model
        forged = forged_model(real, 999.0)
        outsider = make_client(f"outsider-{fleet.broker.topic_root}", fleet.broker)
        connect(outsider, fleet.broker)
        unsigned = envelope.encode(kind="global", site=signed.AGGREGATOR, round=MAX_VERSION, model_version=MAX_VERSION, samples=1, body=forged)
        mis_signed = _global(keys.as_aggregator["bad_signature"], MAX_VERSION, forged)
        outsider.publish(topics.global_model, unsigned, qos=1, retain=True).wait_for_publish(10)
        wait_for("the unsigned forgery to be refused", lambda: all(a.counters["rejected.unsigned"] >= 1 for a in fleet.agents.values()))
        outsider.publish(topics.global_model, mis_signed, qos=1, retain=True).wait_for_publish(10)
        wait_for("the mis-signed forgery to be refused", lambda: all(a.counters["rejected.bad_signature"] >= 1 for a in fleet.agents.values()))
        wait_for("the real global v2 at every site", lambda: all(a.global_version == 2 for a in fleet.agents.values()), 120)
        final = aggregator.registry.latest().model
        test = fleet.replay("test", 4, cmapss_dir)
        store = open_store(fleet.fleet.store)
        wait_for("every test engine's prediction in the store", lambda: len(store.latest_predictions()) == test["engines"]["test"])
        outsider.disconnect()
    finally:
        fleet.close()
    for agent in fleet.agents.values():
        assert agent.global_version == 2 and agent.global_model == final
        assert (agent.state_dir / "global.onnx").read_bytes() == final
        assert json.loads((agent.state_dir / "state.json").read_text())["global_version"] == 2
    federated = [r["federated"] for r in store.latest_predictions()]
    assert federated and all(f is not None and abs(f - 999.0) > 1.0 for f in federated)
