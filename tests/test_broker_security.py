"""The secure broker (real Mosquitto, TLS, client certificates, the fleet's ACL and CRL) and
the identity folder behind it: what an outsider, another site or a gateway cannot do.

Refused publishes are never observed by a sleep: after the forbidden message the same
client publishes a control message that the watcher may see; Mosquitto handles one
client's packets in order, so when the control arrives the forbidden one is settled.
"""

from __future__ import annotations

import json
import queue
import ssl
import stat
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509

from tests.livefleet import SESSION_SITES, admit_topics
from turbofed.config import BrokerSettings
from turbofed.deploy.identities import (
    AGGREGATOR,
    FleetIdentities,
    IdentityError,
    add_identity,
    client_settings,
    init_fleet,
    init_from_fleet,
    revoke_identity,
    write_acl,
)
from turbofed.mqtt import ConnectError, connect, make_client
from turbofed.simulation.broker import BrokerHandle, find_mosquitto, mqtt_ping, start_broker
from turbofed.topics import Topics

TIMEOUT = 15.0

needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")


@pytest.fixture(scope="module")
def secure(fleet_pki: FleetIdentities, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerHandle]:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    with start_broker(embedded=False, workdir=tmp_path_factory.mktemp("secure-broker"), pki=fleet_pki) as handle:
        yield handle


@pytest.fixture
def topics(secure: BrokerHandle) -> Topics:
    """Topic roots of this test alone (its own retained round), admitted to the ACL."""
    tag = uuid.uuid4().hex[:8]
    t = Topics(f"sec{tag}/v1", f"plant{tag}")
    admit_topics(secure, t)
    return t


class Peer:
    """A client of the secure broker as one identity; queues what it receives."""

    def __init__(self, settings: BrokerSettings) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client = make_client(f"sec-{uuid.uuid4().hex[:10]}", settings)
        self.client.on_message = lambda c, u, msg: self.messages.put(msg)
        connect(self.client, settings)

    def subscribe(self, *topics: str) -> None:
        acked = queue.Queue()
        self.client.on_subscribe = lambda c, u, mid, rcs, p: acked.put(rcs)
        self.client.subscribe([(t, 1) for t in topics])
        acked.get(timeout=TIMEOUT)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(TIMEOUT)  # Mosquitto acknowledges even a publish its ACL drops
        assert info.is_published()

    def until(self, topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        """Everything received up to and including the control message (topic, payload)."""
        seen = []
        while True:
            msg = self.messages.get(timeout=TIMEOUT)
            seen.append((msg.topic, msg.payload))
            if (msg.topic, msg.payload) == (topic, payload):
                return seen

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def peers(secure: BrokerHandle, topics: Topics) -> Iterator:
    made: list[Peer] = []

    def make(identity: str) -> Peer:
        made.append(Peer(secure.settings(identity, topic_root=topics.root, plant_root=topics.plant_root)))
        return made[-1]

    yield make
    for peer in made:
        peer.close()


# --------------------------------------------------------------------------- who may connect


@needs_mosquitto
def test_anonymous_and_certificateless_clients_are_refused(secure: BrokerHandle, fleet_pki: FleetIdentities) -> None:
    assert not mqtt_ping(secure.host, secure.port)  # plain MQTT, no TLS at all
    context = ssl.create_default_context(cafile=str(fleet_pki.ca_cert))  # TLS, but no client certificate
    assert not mqtt_ping(secure.host, secure.port, tls=context)
    no_identity = replace(secure.settings("site1"), cert=None, key=None)
    with pytest.raises(ConnectError, match="refused the connection"):
        connect(make_client("sec-anon", no_identity), no_identity)
    plain = BrokerSettings(host=secure.host, port=secure.port)
    with pytest.raises(ConnectError):
        connect(make_client("sec-plain", plain), plain, timeout=5)


@needs_mosquitto
def test_certificate_from_another_ca_is_refused(secure: BrokerHandle, tmp_path: Path) -> None:
    other = init_fleet(tmp_path / "other", ["127.0.0.1"])
    add_identity(other, "site1", "site")  # same name, wrong CA
    forged = BrokerSettings(host=secure.host, port=secure.port, ca=str(secure.pki.ca_cert),
                            cert=str(other.client_cert("site1")), key=str(other.client_key("site1")))
    with pytest.raises(ConnectError, match="refused the connection"):
        connect(make_client("sec-forged", forged), forged)
    # and a client trusting only the other CA does not accept our broker either
    wrong_ca = replace(forged, ca=str(other.ca_cert))
    with pytest.raises(ConnectError, match="cannot reach"):
        connect(make_client("sec-wrong-ca", wrong_ca), wrong_ca)


# --------------------------------------------------------------------------- what the ACL refuses


@needs_mosquitto
def test_site_cannot_publish_as_another_site(peers, topics: Topics) -> None:
    aggregator, site1 = peers(AGGREGATOR), peers("site1")
    aggregator.subscribe(topics.all_sites("update"))
    site1.publish(topics.update("site2"), b"forged update for site2")
    site1.publish(topics.update("site1"), b"control")
    assert aggregator.until(topics.update("site1"), b"control") == [(topics.update("site1"), b"control")]


@needs_mosquitto
def test_site_cannot_publish_or_clear_retained_control_topics(peers, topics: Topics) -> None:
    aggregator, site1 = peers(AGGREGATOR), peers("site1")
    originals = {t: f"real {t}".encode() for t in (topics.round, topics.global_model, topics.stats_request)}
    for topic, payload in originals.items():
        aggregator.publish(topic, payload, retain=True)
    aggregator.subscribe(*originals, topics.status("site1"))
    assert set(aggregator.until(topics.stats_request, originals[topics.stats_request])) <= set(originals.items())
    for topic in originals:
        site1.publish(topic, b"forged global v9007199254740991", retain=True)
        site1.publish(topic, b"", retain=True)  # wipe it
    site1.publish(topics.status("site1"), b"control")
    assert aggregator.until(topics.status("site1"), b"control") == [(topics.status("site1"), b"control")]
    late = peers(AGGREGATOR)  # a late subscriber gets the retained values: still the aggregator's
    late.subscribe(*originals)
    got = {}
    while len(got) < len(originals):
        msg = late.messages.get(timeout=TIMEOUT)
        got[msg.topic] = msg.payload
    assert got == originals


@needs_mosquitto
def test_site_cannot_read_other_sites_or_everything(peers, topics: Topics) -> None:
    site1, aggregator, gateway2 = peers("site1"), peers(AGGREGATOR), peers("gateway-site2")
    site1.subscribe("#", topics.all_sites("update"), f"{topics.plant_root}/site2/#")  # Mosquitto grants, then filters
    aggregator.publish(topics.update("site2"), b"site2's update")
    gateway2.publish(topics.sensors("site2", "e1"), b"site2's sensor row")
    aggregator.publish(topics.round, b"control round")
    seen = site1.until(topics.round, b"control round")
    assert not [t for t, _ in seen if "site2" in t], seen


@needs_mosquitto
def test_a_site_reads_the_secure_sum_roster_and_its_own_shares_only(peers, topics: Topics) -> None:
    site1, aggregator = peers("site1"), peers(AGGREGATOR)
    site1.subscribe(topics.secagg_roster, topics.secagg_unmask, topics.secagg_inbox("site1"), topics.secagg_inbox("site2"))
    aggregator.publish(topics.secagg_inbox("site2"), b"site2's shares")
    aggregator.publish(topics.secagg_inbox("site1"), b"site1's shares")
    aggregator.publish(topics.secagg_roster, b"roster")
    aggregator.publish(topics.secagg_unmask, b"unmask request")
    seen = site1.until(topics.secagg_unmask, b"unmask request")
    assert seen == [(topics.secagg_inbox("site1"), b"site1's shares"), (topics.secagg_roster, b"roster"),
                    (topics.secagg_unmask, b"unmask request")]


@needs_mosquitto
def test_gateway_publishes_only_its_sites_plant_topics(peers, topics: Topics) -> None:
    site1, site2, aggregator, gateway1 = peers("site1"), peers("site2"), peers(AGGREGATOR), peers("gateway-site1")
    site1.subscribe(f"{topics.plant_root}/site1/#")
    site2.subscribe(f"{topics.plant_root}/site2/#")
    aggregator.subscribe(f"{topics.root}/#")
    gateway1.publish(topics.sensors("site2", "e1"), b"forged row for site2")
    gateway1.publish(topics.update("site1"), b"forged update")
    gateway1.publish(topics.round, b"forged round", retain=True)
    gateway1.publish(topics.sensors("site1", "e1"), b"row")
    assert site1.until(topics.sensors("site1", "e1"), b"row") == [(topics.sensors("site1", "e1"), b"row")]
    # gateway1's forged messages were settled before its row reached site1
    peers("gateway-site2").publish(topics.sensors("site2", "e1"), b"control")
    assert site2.until(topics.sensors("site2", "e1"), b"control") == [(topics.sensors("site2", "e1"), b"control")]
    aggregator.publish(topics.status("site1"), b"control")
    assert aggregator.until(topics.status("site1"), b"control") == [(topics.status("site1"), b"control")]


@needs_mosquitto
def test_monitor_reads_everything_and_publishes_nothing(peers, topics: Topics) -> None:
    monitor, aggregator, site1 = peers("monitor"), peers(AGGREGATOR), peers("site1")
    monitor.subscribe(f"{topics.root}/#")
    aggregator.subscribe(topics.round)
    site1.publish(topics.status("site1"), b"online")
    assert monitor.until(topics.status("site1"), b"online")[-1] == (topics.status("site1"), b"online")
    monitor.publish(topics.round, b"forged round")
    aggregator.publish(topics.round, b"control")
    assert aggregator.until(topics.round, b"control") == [(topics.round, b"control")]


# --------------------------------------------------------------------------- revocation


@needs_mosquitto
def test_revoked_site_is_refused_after_reload(tmp_path: Path) -> None:
    """`revoke` + SIGHUP: Mosquitto 2.0 reloads the CRL and ACL on SIGHUP (no restart needed)."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('sites = ["site1", "site2"]\nstore = "r.sqlite"\nregistry = "reg"\n')
    ids = init_from_fleet(fleet, tmp_path / "pki")
    with start_broker(embedded=False, workdir=tmp_path / "broker", pki=ids) as handle:
        before = handle.settings("site2")
        client = make_client("sec-site2", before)
        connect(client, before)
        client.disconnect()
        client.loop_stop()
        revoke_identity(ids, "site2")
        write_acl(ids, ["site1", "site2"], Topics())
        handle.reload()
        with pytest.raises(ConnectError, match="refused the connection"):
            connect(make_client("sec-site2-again", before), before)  # the old certificate
        site1 = handle.settings("site1")
        still = make_client("sec-site1", site1)
        connect(still, site1)  # the others are unaffected
        still.disconnect()
        still.loop_stop()
        add_identity(ids, "site2", "site")  # the replaced device gets a new certificate
        handle.reload()
        after = handle.settings("site2")
        fresh = make_client("sec-site2-new", after)
        connect(fresh, after)
        fresh.disconnect()
        fresh.loop_stop()


# --------------------------------------------------------------------------- the identity folder


def test_private_keys_are_0600(fleet_pki: FleetIdentities) -> None:
    keys = sorted(fleet_pki.root.rglob("*.key"))
    n = len(SESSION_SITES)
    # CA and broker; TLS keys of aggregator, monitor, sites and gateways; signing keys of aggregator and sites
    assert len(keys) == 2 + (2 + 2 * n) + (1 + n)
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    for public in (fleet_pki.ca_cert, fleet_pki.crl, fleet_pki.acl, fleet_pki.client_cert("site1")):
        assert stat.S_IMODE(public.stat().st_mode) == 0o644, public


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    ids = init_fleet(tmp_path / "pki", ["127.0.0.1"])
    ca_key = ids.ca_key.read_bytes()
    with pytest.raises(IdentityError, match="refusing to overwrite"):
        init_fleet(tmp_path / "pki", ["127.0.0.1"])
    assert ids.ca_key.read_bytes() == ca_key


def crl_serials(ids: FleetIdentities) -> set[int]:
    return {r.serial_number for r in x509.load_pem_x509_crl(ids.crl.read_bytes())}


def cert_serial(ids: FleetIdentities, name: str) -> int:
    return x509.load_pem_x509_certificate(ids.client_cert(name).read_bytes()).serial_number


def test_add_and_revoke_update_manifest_crl_and_acl(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('sites = ["site1", "site2"]\nstore = "r.sqlite"\nregistry = "reg"\n')
    ids = init_from_fleet(fleet, tmp_path / "pki")
    assert ids.identities() == {"aggregator": "aggregator", "monitor": "monitor", "site1": "site", "gateway-site1": "gateway",
                                "site2": "site", "gateway-site2": "gateway"}
    acl = ids.acl.read_text()
    assert "user site2\ntopic write tfl/v1/sites/site2/#\n" in acl and "user monitor\ntopic read tfl/v1/#\n" in acl
    assert "user gateway-site2\ntopic write plant/site2/#\n" in acl
    assert crl_serials(ids) == set()
    old_serial = cert_serial(ids, "site2")
    old_signing = ids.signing_pub("site2").read_bytes()

    revoke_identity(ids, "site2")
    write_acl(ids, ["site1", "site2"], Topics())
    manifest = json.loads(ids.manifest.read_text())
    assert "site2" not in manifest["identities"] and ids.revoked() == {"site2"}
    assert [r["serial"] for r in manifest["revoked"]] == [old_serial]
    assert crl_serials(ids) == {old_serial}
    assert "user site2\n" not in ids.acl.read_text() and "user site1\n" in ids.acl.read_text()
    assert "site2" not in ids.site_signing_keys()
    with pytest.raises(IdentityError, match="no active identity 'site2'"):
        revoke_identity(ids, "site2")

    add_identity(ids, "site2", "site")  # re-issued: a new certificate and a new signing key
    write_acl(ids, ["site1", "site2"], Topics())
    assert cert_serial(ids, "site2") != old_serial and ids.signing_pub("site2").read_bytes() != old_signing
    assert crl_serials(ids) == {old_serial}  # the old certificate stays revoked
    assert ids.revoked() == set() and "user site2\n" in ids.acl.read_text()
    assert list((ids.root / "identities").glob("site2.revoked-*"))  # the old files kept for audit
    with pytest.raises(IdentityError, match="exists already"):
        add_identity(ids, "site2", "site")


def test_client_settings_name_an_identity_of_the_folder(fleet_pki: FleetIdentities) -> None:
    s = client_settings(fleet_pki, "site3", BrokerSettings(port=8883))
    assert s.tls and s.ca == str(fleet_pki.ca_cert) and s.cert == str(fleet_pki.client_cert("site3"))
    assert s.identity == "site3"
    with pytest.raises(IdentityError, match="no active identity 'site9'"):
        client_settings(fleet_pki, "site9", BrokerSettings())


def test_cli_broker_is_secure_unless_told_otherwise(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from turbofed.cli import main

    monkeypatch.chdir(tmp_path)  # no ./pki here
    assert main(["broker", "--port", "1"]) == 2
    assert "--insecure-dev" in capsys.readouterr().err
    assert main(["broker", "--pki", str(tmp_path / "none")]) == 2
    assert "no fleet identities here" in capsys.readouterr().err
