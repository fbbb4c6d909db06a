"""One way to make a paho-mqtt client for every turbofed process.

Agents, the aggregator and the replay all want the same things: paho 2.x callbacks,
automatic reconnects with backoff, a bounded in-flight window, a clear error naming
host:port when the broker is not there, and a last will where there is one.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, MutableMapping
from typing import Any, Generic, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from turbofed.config import BrokerSettings
from turbofed.errors import TurbofedError

log = logging.getLogger(__name__)


class ConnectError(TurbofedError):
    """The broker could not be reached or refused us."""


Item = TypeVar("Item")


class BoundedInbox(Generic[Item]):
    """Messages handed from paho's network thread to the service's own thread, at most
    `max_messages` and `max_bytes` of payload held at once.

    Why: a service that falls behind (a flood, a slow disk, a 5,000-site round) must not
    grow its memory without bound. When the inbox is full, `put` makes the network thread
    wait: it stops reading the socket, TCP pushes back, and the backlog stays at the broker,
    which bounds it per client (broker_config: max_queued_messages, max_queued_bytes; or,
    for a client that acks by hand, max_inflight_messages). A
    message that still finds no room after `wait_s` (the service is stuck, not slow) is
    dropped (and lost: paho acknowledges it on return) and counted by the caller; `wait_s`
    stays below the keepalive, which the waiting network thread cannot answer meanwhile
    (`message_inbox`: 0.8 x keepalive).
    """

    def __init__(self, max_messages: int, max_bytes: int, size_of: Callable[[Item], int], wait_s: float = 10.0) -> None:
        self.max_messages, self.max_bytes, self.wait_s = max_messages, max_bytes, wait_s
        self.size_of = size_of
        self.dropped = 0
        self.closed = False
        self.waiting = 0  # producers waiting for room now
        self.peak_messages = self.peak_bytes = 0  # the most ever held (the bound, seen from outside)
        self._items: deque[tuple[Item, int]] = deque()
        self._bytes = 0
        self._lock = threading.Condition()

    def put(self, item: Item) -> bool:
        """Hold `item`; False when there was no room within `wait_s`, or at once once the
        inbox is closed. A message larger than `max_bytes` is taken once the inbox is empty."""
        size = self.size_of(item)
        deadline = time.monotonic() + self.wait_s
        with self._lock:
            while not self.closed and self._items and (len(self._items) >= self.max_messages
                                                       or self._bytes + size > self.max_bytes):
                left = deadline - time.monotonic()
                if left <= 0:
                    self.dropped += 1
                    return False
                self.waiting += 1
                try:
                    self._lock.wait(left)
                finally:
                    self.waiting -= 1
            if self.closed:
                return False
            self._items.append((item, size))
            self._bytes += size
            self.peak_messages = max(self.peak_messages, len(self._items))
            self.peak_bytes = max(self.peak_bytes, self._bytes)
            self._lock.notify_all()
            return True

    def get(self, timeout: float) -> Item:
        """The oldest message, waiting up to `timeout` s; queue.Empty when none came."""
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._lock:
            while not self._items:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise queue.Empty
                self._lock.wait(left)
            item, size = self._items.popleft()
            self._bytes -= size
            self._lock.notify_all()
            return item

    def get_nowait(self) -> Item:
        return self.get(0.0)

    def close(self) -> None:
        """The service is stopping and reads no more: the network thread must not wait for room
        (each message up to `wait_s`) while the client disconnects. What is held stays readable."""
        with self._lock:
            self.closed = True
            self._lock.notify_all()

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def held_bytes(self) -> int:
        return self._bytes


def client_id(role: str, broker: BrokerSettings) -> str:
    """A stable id per role and fleet: a persistent session must find itself again after a
    restart, and two fleets sharing a broker must not take over each other's sessions."""
    return f"turbofed-{broker.topic_root.replace('/', '-')}-{role}"


def make_client(
    client_id: str,
    broker: BrokerSettings,
    will: tuple[str, bytes] | None = None,
    persistent_session: bool = False,
    max_inflight: int = 100,
    manual_ack: bool = False,
) -> mqtt.Client:
    """A configured client, not yet connected. A persistent session keeps our QoS 1
    subscriptions queued at the broker while we are away. `manual_ack`: a QoS 1 message is
    acknowledged only by `client.ack(mid, 1)`; until then the broker redelivers it to this
    session (an ingestion worker acks an update once it is safely passed on)."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=not persistent_session,
        protocol=mqtt.MQTTv311,
        manual_ack=manual_ack,
    )
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    client.max_inflight_messages_set(max_inflight)
    client.max_queued_messages_set(0)  # paho queues without bound while offline: nothing dropped
    configure_tls(client, broker)
    if broker.username:
        client.username_pw_set(broker.username, broker.password)
    if will:
        client.will_set(will[0], will[1], qos=1, retain=True)
    return client


def configure_tls(client: mqtt.Client, broker: BrokerSettings) -> None:
    """TLS from the broker settings: verify the broker against the fleet's CA and present our
    client certificate (the broker's ACL knows us by its CN). Nothing when `tls` is off."""
    if not broker.tls:
        return
    if not broker.ca:
        raise ConnectError(f"TLS to {broker.host}:{broker.port} needs the fleet's CA certificate ([broker] ca)")
    try:
        client.tls_set(ca_certs=broker.ca, certfile=broker.cert, keyfile=broker.key,
                       cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConnectError(f"TLS identity for {broker.host}:{broker.port} unusable (ca {broker.ca}, cert {broker.cert}, "
                           f"key {broker.key}): {exc}") from None


def connect(client: mqtt.Client, broker: BrokerSettings, timeout: float = 10.0) -> None:
    """Connect and start the network thread; raise ConnectError naming host:port on failure.

    A broker that refuses our certificate (unknown CA, revoked) closes the connection
    before any CONNACK: that fails here at once, not after the timeout."""
    connected = threading.Event()
    failure: list[str] = []
    previous, previous_disconnect = client.on_connect, client.on_disconnect

    def on_connect(c, userdata, flags, reason_code, properties):  # noqa: ANN001 - paho signature
        if reason_code.is_failure:
            failure.append(str(reason_code))
        connected.set()
        if previous:
            previous(c, userdata, flags, reason_code, properties)

    def on_disconnect(c, userdata, flags, reason_code, properties):  # noqa: ANN001 - paho signature
        if not connected.is_set():
            why = "certificate refused or revoked?" if broker.tls else str(reason_code)
            failure.append(f"closed the connection before acknowledging it ({why})")
            connected.set()
        if previous_disconnect:
            previous_disconnect(c, userdata, flags, reason_code, properties)

    client.on_connect, client.on_disconnect = on_connect, on_disconnect
    where = f"{broker.host}:{broker.port}" + (" (TLS)" if broker.tls else "")
    try:
        client.connect(broker.host, broker.port, keepalive=broker.keepalive)
    except OSError as exc:  # ssl.SSLError included: the broker's certificate is not from our CA
        client.on_connect, client.on_disconnect = previous, previous_disconnect
        raise ConnectError(f"cannot reach MQTT broker at {where}: {exc}") from None
    client.loop_start()
    try:
        if not connected.wait(timeout):
            client.loop_stop()
            raise ConnectError(f"MQTT broker at {where} did not answer within {timeout:.0f} s")
        if failure:
            client.loop_stop()
            raise ConnectError(f"MQTT broker at {where} refused the connection: {failure[0]}")
    finally:
        client.on_connect, client.on_disconnect = previous, previous_disconnect


class Subscriptions:
    """Subscribes a client (again after every reconnect) and tells when the broker has
    acknowledged: a publisher that starts before the SUBACK would otherwise lose messages."""

    def __init__(self, client: mqtt.Client, topics: list[str], qos: int = 1) -> None:
        self.client, self.topics, self.qos = client, topics, qos
        self._acked: set[int] = set()
        self._pending: int | None = None
        self.ready = threading.Event()
        client.on_subscribe = self._on_subscribe

    def subscribe(self) -> None:
        """Call from on_connect: never blocks the network thread."""
        self.ready.clear()
        _, mid = self.client.subscribe([(t, self.qos) for t in self.topics])
        self._pending = mid
        if mid in self._acked:
            self.ready.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # noqa: ANN001
        self._acked.add(mid)
        if mid == self._pending:
            self.ready.set()

    def wait(self, timeout: float = 10.0) -> None:
        if not self.ready.wait(timeout):
            raise ConnectError(f"the broker did not acknowledge our subscriptions within {timeout:.0f} s")


class ConnectionWatch:
    """Says when the broker goes away and when it is back, with how long it was gone, and
    counts outages: paho reconnects silently, so without this an outage leaves no trace.

    `attach` wraps the client's on_connect/on_disconnect set so far (call it after setting
    yours); the agent's Status/metrics and the aggregator read `outages` and `counters()`."""

    def __init__(self, name: str, logger: logging.Logger = log, clock: Callable[[], float] = time.monotonic) -> None:
        self.name, self.log, self.clock = name, logger, clock
        self.outages = 0  # connections lost (not counting our own disconnects)
        self.down_s = 0.0  # time without the broker, summed over ended outages
        self.last_outage_s: float | None = None
        self._lost_at: float | None = None  # clock() when the current outage began
        self._lock = threading.Lock()

    @property
    def connected(self) -> bool:
        return self._lost_at is None

    def attach(self, client: mqtt.Client) -> ConnectionWatch:
        on_connect, on_disconnect = client.on_connect, client.on_disconnect

        def connected(c: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
            if not getattr(reason_code, "is_failure", False):
                self.back()
            if on_connect:
                on_connect(c, userdata, flags, reason_code, properties)

        def disconnected(c: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
            if getattr(reason_code, "is_failure", True):  # a normal disconnection is ours: not an outage
                self.lost(str(reason_code))
            if on_disconnect:
                on_disconnect(c, userdata, flags, reason_code, properties)

        client.on_connect, client.on_disconnect = connected, disconnected
        return self

    def lost(self, why: str) -> None:
        with self._lock:
            if self._lost_at is not None:
                return  # a failed reconnect attempt during the same outage
            self._lost_at = self.clock()
            self.outages += 1
        self.log.warning("%s: broker lost at %s UTC (%s); reconnecting", self.name, time.strftime("%H:%M:%S", time.gmtime()), why)

    def back(self) -> None:
        with self._lock:
            if self._lost_at is None:
                return  # the first connection
            took, self._lost_at = self.clock() - self._lost_at, None
            self.down_s += took
            self.last_outage_s = took
        self.log.warning("%s: broker back after %.1f s (outage %d)", self.name, took, self.outages)

    def counters(self) -> dict[str, int]:
        """For a metrics message: outages so far and whole seconds without the broker."""
        with self._lock:
            ongoing = self.clock() - self._lost_at if self._lost_at is not None else 0.0
            return {"broker.outages": self.outages, "broker.down_s": int(self.down_s + ongoing)}


INBOX_MESSAGES = 10_000
# A few hundred updates, or thousands of readings: enough to keep a service busy between two
# reads of the socket, small next to its RSS (the broker holds any larger backlog).
INBOX_BYTES = 16 * 1024 * 1024


def message_inbox(keepalive: float, size_of: Callable[[Any], int] = lambda item: len(item[1]),
                  max_messages: int = INBOX_MESSAGES, max_bytes: int = INBOX_BYTES) -> BoundedInbox[Any]:
    """A service's inbox (items (topic, payload) unless `size_of` says otherwise). It waits
    for room up to 0.8 x the broker keepalive: the longest the network thread can stay silent
    without the client's keepalive lapsing, and far longer than any step of the services' own
    work (the aggregator's store flush waits at most 10 s)."""
    return BoundedInbox(max_messages, max_bytes, size_of, wait_s=0.8 * keepalive)


def on_message_into(inbox: BoundedInbox[Any], item: Callable[[mqtt.MQTTMessage], Any], counters: MutableMapping[str, int],
                    logger: logging.Logger, who: str) -> Callable[..., None]:
    """paho's on_message: the message into `inbox`; one it has no room for is counted
    (`inbox_full` in `counters`) and logged at most once a minute. Such a message is lost:
    paho acknowledges a QoS 1 message when this returns."""
    from turbofed.ratelog import RateLimitedLog
    from turbofed.refusals import Refusal

    errors = RateLimitedLog(logger)

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:  # noqa: ARG001
        if not inbox.put(item(msg)) and not inbox.closed:
            counters[Refusal.INBOX_FULL.value] += 1
            errors.warning(Refusal.INBOX_FULL, "%s: dropped a message on %s: its inbox held %d messages (%d bytes) for "
                           "%.0f s (stuck, not slow); %d dropped in all", who, msg.topic[:200], inbox.qsize(),
                           inbox.held_bytes(), inbox.wait_s, inbox.dropped)

    return on_message
