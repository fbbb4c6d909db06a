"""A service's inbox is bounded (turbofed.mqtt.BoundedInbox): a flood makes paho's network
thread wait, so the backlog stays at the broker and nothing is lost; only an inbox that stays
full (the service stuck) drops, counts and logs. The live test floods a real Mosquitto (TLS,
the fleet's ACL) faster than the consumer drains."""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import Counter

import pytest

from tests.livefleet import admit_topics, wait_for
from turbofed.mqtt import BoundedInbox, connect, make_client, on_message_into
from turbofed.simulation.broker import BrokerHandle
from turbofed.topics import Topics


def _inbox(messages: int, size: int, wait_s: float) -> BoundedInbox[bytes]:
    return BoundedInbox(messages, size, len, wait_s=wait_s)


def test_a_full_inbox_makes_the_producer_wait_until_there_is_room() -> None:
    inbox = _inbox(2, 1_000, wait_s=5.0)
    assert inbox.put(b"a") and inbox.put(b"b")
    threading.Timer(0.3, inbox.get, args=(1.0,)).start()  # the consumer frees one place later
    started = time.monotonic()
    assert inbox.put(b"c")  # waited for that place, did not drop
    assert time.monotonic() - started >= 0.25 and inbox.dropped == 0
    assert [inbox.get(0.1), inbox.get(0.1)] == [b"b", b"c"] and inbox.empty()


def test_the_byte_bound_holds_and_a_message_larger_than_it_still_passes_alone() -> None:
    inbox = _inbox(100, 10, wait_s=0.05)
    assert inbox.put(b"x" * 6)
    assert not inbox.put(b"y" * 6)  # 12 bytes would not fit: dropped after wait_s
    assert inbox.dropped == 1 and inbox.held_bytes() == 6
    assert inbox.get(0.1) == b"x" * 6
    assert inbox.put(b"z" * 50)  # alone it is taken (else it could never pass)
    assert not inbox.put(b"w")  # but nothing joins it
    assert inbox.held_bytes() == 50 and inbox.dropped == 2


def test_a_closed_inbox_lets_a_waiting_producer_go_at_once_and_keeps_what_it_holds() -> None:
    inbox = _inbox(1, 100, wait_s=30.0)
    assert inbox.put(b"held")
    result: list[bool] = []
    producer = threading.Thread(target=lambda: result.append(inbox.put(b"late")))
    producer.start()
    wait_for("the producer to wait for room", lambda: inbox.waiting == 1, 10)
    inbox.close()
    producer.join(5)
    assert not producer.is_alive() and result == [False] and inbox.dropped == 0
    assert not inbox.put(b"after") and inbox.get(0.1) == b"held"


def test_get_waits_up_to_its_timeout() -> None:
    inbox = _inbox(1, 10, wait_s=0.0)
    with pytest.raises(queue.Empty):
        inbox.get(0.05)
    threading.Timer(0.1, inbox.put, args=(b"late",)).start()
    assert inbox.get(2.0) == b"late"


@pytest.fixture
def topics(broker: BrokerHandle) -> Topics:
    t = Topics(f"inbox{uuid.uuid4().hex[:8]}/v1", f"plantinbox{uuid.uuid4().hex[:8]}")
    admit_topics(broker, t)
    return t


@pytest.mark.parametrize("broker", ["mosquitto"], indirect=True)
def test_a_flood_waits_at_the_broker_and_arrives_whole_in_order(broker: BrokerHandle, topics: Topics) -> None:
    """300 messages of 60 KB (18 MB) into an inbox of at most 8 messages / 256 KB, drained
    slowly: the inbox never holds more than its bound, and every message arrives, in order."""
    sent, size, bound = 300, 60_000, 256 * 1024
    inbox = BoundedInbox(8, bound, lambda item: len(item[1]), wait_s=30.0)
    counters: Counter[str] = Counter()
    reader = make_client(f"inbox-{uuid.uuid4().hex[:8]}", broker.settings("aggregator"))
    reader.on_message = on_message_into(inbox, lambda msg: (msg.topic, msg.payload), counters, logging.getLogger("test"), "reader")
    subscribed = threading.Event()
    reader.on_subscribe = lambda *args: subscribed.set()
    writer = make_client(f"inbox-{uuid.uuid4().hex[:8]}", broker.settings("site1"))
    connect(reader, broker.settings("aggregator"))
    connect(writer, broker.settings("site1"))
    try:
        reader.subscribe(topics.update("site1"), qos=1)
        assert subscribed.wait(10)
        for i in range(sent):
            writer.publish(topics.update("site1"), i.to_bytes(4, "big") + b"\0" * (size - 4), qos=1)
        received = []
        deadline = time.monotonic() + 120
        while len(received) < sent and time.monotonic() < deadline:
            try:
                _, payload = inbox.get(1.0)
            except queue.Empty:
                continue
            received.append(int.from_bytes(payload[:4], "big"))
            time.sleep(0.005)  # slower than the broker delivers
        assert received == list(range(sent))
        # The most it ever held (kept by the inbox itself): within the bound, and it did fill
        # (4 messages of 60 KB reach the 256 KB bound): the flood was held back, not buffered here.
        assert inbox.peak_messages <= 8 and inbox.peak_bytes <= bound and inbox.peak_messages >= 4
        assert inbox.dropped == 0 and not counters
    finally:
        inbox.close()  # a failed run must not leave paho's thread waiting for room in loop_stop
        for client in (reader, writer):
            client.disconnect()
            client.loop_stop()


@pytest.mark.parametrize("broker", ["mosquitto"], indirect=True)
def test_an_inbox_that_stays_full_drops_counts_and_logs_once(broker: BrokerHandle, topics: Topics,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    inbox = BoundedInbox(2, 1 << 20, lambda item: len(item[1]), wait_s=0.2)
    counters: Counter[str] = Counter()
    reader = make_client(f"inbox-{uuid.uuid4().hex[:8]}", broker.settings("aggregator"))
    reader.on_message = on_message_into(inbox, lambda msg: (msg.topic, msg.payload), counters,
                                        logging.getLogger("turbofed.test_inbox"), "stuck reader")
    subscribed = threading.Event()
    reader.on_subscribe = lambda *args: subscribed.set()
    writer = make_client(f"inbox-{uuid.uuid4().hex[:8]}", broker.settings("site1"))
    connect(reader, broker.settings("aggregator"))
    connect(writer, broker.settings("site1"))
    caplog.set_level(logging.WARNING, logger="turbofed.test_inbox")
    try:
        reader.subscribe(topics.update("site1"), qos=1)
        assert subscribed.wait(10)
        for i in range(6):  # nobody reads: 2 are held, 4 dropped after 0.2 s each
            writer.publish(topics.update("site1"), bytes([i]) * 100, qos=1)
        # counted by on_message after put gives up: wait on the count asserted
        wait_for("the four messages with no room to be counted", lambda: counters["inbox_full"] == 4, 30)
        assert counters == {"inbox_full": 4} and inbox.dropped == 4 and inbox.qsize() == 2
        lines = [r.getMessage() for r in caplog.records if "dropped a message" in r.getMessage()]
        assert len(lines) == 1 and "stuck reader" in lines[0] and topics.update("site1") in lines[0]
        assert [inbox.get(0.1)[1][0], inbox.get(0.1)[1][0]] == [0, 1]  # what it held is intact
    finally:
        inbox.close()  # a failed run must not leave paho's thread waiting for room in loop_stop
        for client in (reader, writer):
            client.disconnect()
            client.loop_stop()
