"""Both brokers, through paho-mqtt 2.x: large QoS 1 payloads, retained, last will, queues.

Mosquitto runs the secure setup (TLS, client certificates, ACL): these clients connect as
the aggregator, which may read and write everything under tfl/v1/. amqtt is the insecure
development broker. tests/test_broker_security.py tests what the ACL refuses."""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from turbofed import envelope
from turbofed.deploy.identities import AGGREGATOR, FleetIdentities
from turbofed.mqtt import configure_tls
from turbofed.simulation.broker import (
    MAX_PACKET_BYTES,
    REPO_CONF,
    BrokerError,
    BrokerHandle,
    find_mosquitto,
    mosquitto_config,
    start_broker,
)

TIMEOUT = 15.0


class Client:
    """A paho client on its own network thread that queues what it receives."""

    def __init__(self, broker: BrokerHandle, client_id: str | None = None, clean: bool = True, identity: str = AGGREGATOR) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._acks: queue.Queue[str] = queue.Queue()
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"t-{uuid.uuid4().hex[:10]}",
            clean_session=clean,
            protocol=mqtt.MQTTv311,
        )
        configure_tls(self.c, broker.settings(identity))
        self.c.on_connect = lambda c, u, flags, rc, props: self._acks.put(f"connect:{rc}")
        self.c.on_subscribe = lambda c, u, mid, rcs, props: self._acks.put("suback")
        self.c.on_message = lambda c, u, msg: self.messages.put(msg)
        self.broker = broker

    def connect(self) -> Client:
        self.c.connect(self.broker.host, self.broker.port, keepalive=30)
        self.c.loop_start()
        assert self._acks.get(timeout=TIMEOUT) == "connect:Success"
        return self

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.c.subscribe(topic, qos)
        assert self._acks.get(timeout=TIMEOUT) == "suback"

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        info = self.c.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout=TIMEOUT)
        assert info.is_published(), f"publish to {topic} not acknowledged within {TIMEOUT}s"

    def next(self, timeout: float = TIMEOUT) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def unique(name: str) -> str:
    """A topic of this test alone, under tfl/v1/ where the aggregator's identity may read and write."""
    return f"tfl/v1/test/{name}/{uuid.uuid4().hex[:8]}"


@pytest.fixture
def clients(broker: BrokerHandle):
    made: list[Client] = []

    def make(**kw: object) -> Client:
        client = Client(broker, **kw).connect()  # type: ignore[arg-type]
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def test_one_mib_envelope_qos1(clients, broker: BrokerHandle) -> None:
    topic = unique("big")
    sub, pub = clients(), clients()
    sub.subscribe(topic)
    body = os.urandom(1024 * 1024)
    payload = envelope.encode(kind="update", site="s1", round=1, model_version=1, samples=10, body=body)
    pub.publish(topic, payload, qos=1)
    msg = sub.next()
    assert msg.topic == topic and msg.qos == 1
    assert envelope.decode(msg.payload).body == body


def test_largest_allowed_payload_passes(clients, broker: BrokerHandle) -> None:
    topic = unique("max")
    sub, pub = clients(), clients()
    sub.subscribe(topic)
    payload = os.urandom(envelope.MAX_PAYLOAD_BYTES)
    pub.publish(topic, payload, qos=1)
    assert sub.next(timeout=30).payload == payload


def test_oversized_payload_not_delivered(clients, broker: BrokerHandle) -> None:
    topic = unique("oversized")
    sub, pub = clients(), clients()
    sub.subscribe(topic)
    pub.c.publish(topic, b"\0" * (MAX_PACKET_BYTES + 1), qos=0)
    with pytest.raises(queue.Empty):
        sub.next(timeout=2)
    clients().publish(topic, b"small")  # the broker is still healthy
    assert sub.next().payload == b"small"


def test_retained_reaches_late_subscriber(clients, broker: BrokerHandle) -> None:
    topic = unique("retained")
    pub = clients()
    pub.publish(topic, b"global-model-v1", qos=1, retain=True)
    late = clients()
    late.subscribe(topic)
    msg = late.next()
    assert msg.payload == b"global-model-v1" and msg.retain
    pub.publish(topic, b"", qos=1, retain=True)  # clear it


def test_last_will_on_abrupt_death(clients, broker: BrokerHandle) -> None:
    topic = unique("status")
    watcher = clients()
    watcher.subscribe(topic)
    tls = broker.settings(AGGREGATOR)
    script = textwrap.dedent(f"""
        import sys, time
        import paho.mqtt.client as mqtt
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dying-{uuid.uuid4().hex[:6]}",
                        protocol=mqtt.MQTTv311)
        if {tls.tls!r}:
            c.tls_set(ca_certs={tls.ca!r}, certfile={tls.cert!r}, keyfile={tls.key!r})
        c.will_set({topic!r}, b"offline", qos=1, retain=False)
        c.on_connect = lambda *a: (print("connected", flush=True))
        c.connect({broker.host!r}, {broker.port}, keepalive=30)
        c.loop_start()
        time.sleep(60)
    """)
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "connected"
            with pytest.raises(queue.Empty):
                watcher.next(timeout=0.3)  # no will while it lives
            proc.kill()  # SIGKILL: no DISCONNECT packet is ever sent
            proc.wait(TIMEOUT)
            assert watcher.next().payload == b"offline"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(TIMEOUT)


def test_offline_persistent_session_gets_queued_qos1(clients, broker: BrokerHandle) -> None:
    topic, cid = unique("queued"), f"agg-{uuid.uuid4().hex[:8]}"
    offline = Client(broker, client_id=cid, clean=False).connect()
    offline.subscribe(topic, qos=1)
    offline.close()
    clients().publish(topic, b"update-while-offline", qos=1)
    back = clients(client_id=cid, clean=False)
    assert back.next().payload == b"update-while-offline"


# --- start-up and config (no shared broker needed) -------------------------------


def conf_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_repo_config_limits_match_code() -> None:
    lines = conf_lines(REPO_CONF.read_text())
    assert f"max_packet_size {MAX_PACKET_BYTES}" in lines
    # the shipped config is the secure one: TLS listener, certificates required, ACL, CRL
    assert "allow_anonymous false" in lines and "allow_anonymous true" not in lines
    assert "listener 8883 127.0.0.1" in lines
    after_listener = lines[lines.index("listener 8883 127.0.0.1"):]
    for line in ("require_certificate true", "use_identity_as_username true", "cafile pki/ca.crt",
                 "certfile pki/broker/broker.crt", "keyfile pki/broker/broker.key", "crlfile pki/crl.pem"):
        assert line in after_listener, line
    assert "acl_file pki/acl" in lines


def test_mosquitto_config_overrides(tmp_path: Path) -> None:
    """Without identities: the insecure development broker (anonymous, no TLS lines)."""
    lines = conf_lines(mosquitto_config(REPO_CONF.read_text(), "127.0.0.1", 40123, tmp_path))
    assert "listener 40123 127.0.0.1" in lines and "listener 8883 127.0.0.1" not in lines
    assert f"persistence_location {tmp_path.resolve()}/" in lines
    assert "persistence_location .turbofed/mosquitto/" not in lines
    assert f"max_packet_size {MAX_PACKET_BYTES}" in lines and "max_queued_messages 200000" in lines
    assert "allow_anonymous true" in lines and "allow_anonymous false" not in lines
    assert not [line for line in lines if line.split()[0] in ("cafile", "acl_file", "require_certificate", "crlfile")]


def test_mosquitto_config_points_at_the_identity_folder(tmp_path: Path, fleet_pki: FleetIdentities) -> None:
    lines = conf_lines(mosquitto_config(REPO_CONF.read_text(), "127.0.0.1", 40123, tmp_path, fleet_pki))
    root = fleet_pki.root.resolve()
    for line in (f"cafile {root}/ca.crt", f"certfile {root}/broker/broker.crt", f"keyfile {root}/broker/broker.key",
                 f"crlfile {root}/crl.pem", f"acl_file {root}/acl", "allow_anonymous false",
                 "require_certificate true", "use_identity_as_username true", "listener 40123 127.0.0.1"):
        assert line in lines, line
    assert lines.index("listener 40123 127.0.0.1") < lines.index(f"cafile {root}/ca.crt")  # TLS applies to our listener
    with pytest.raises(BrokerError, match="lacks the secure settings"):
        mosquitto_config("listener 1883 127.0.0.1\nallow_anonymous true\n", "127.0.0.1", 40123, tmp_path, fleet_pki)


def test_insecure_broker_binds_loopback_only(tmp_path: Path) -> None:
    for host in ("0.0.0.0", "192.0.2.7", "::"):
        with pytest.raises(BrokerError, match="loopback only"):
            start_broker(host, embedded=True, workdir=tmp_path)
        with pytest.raises(BrokerError, match="loopback only"):
            mosquitto_config(REPO_CONF.read_text(), host, 40123, tmp_path)


def test_embedded_broker_refuses_identities_and_warns(tmp_path: Path, fleet_pki: FleetIdentities) -> None:
    pytest.importorskip("amqtt")
    with pytest.raises(BrokerError, match="cannot enforce TLS"):
        start_broker(embedded=True, workdir=tmp_path, pki=fleet_pki)
    with start_broker(embedded=True, workdir=tmp_path) as handle:
        assert "INSECURE DEVELOPMENT BROKER" in handle.log_text(limit=100_000)


@pytest.mark.parametrize("kind", ["mosquitto", "amqtt"])
def test_start_failure_reports_broker_output(kind: str, tmp_path: Path) -> None:
    if kind == "mosquitto" and find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(BrokerError, match="(?i)in use"):
            start_broker(port=port, embedded=(kind == "amqtt"), workdir=tmp_path, timeout=10)
