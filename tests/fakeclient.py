"""A stand-in for paho in in-process agent tests: connected (unless told otherwise), and
every QoS 1 message acknowledged as it is published, so the agent's outbox empties."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any


class FakeClient:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.connected = True
        self.on_publish: Any = None
        self._mid = 0

    def is_connected(self) -> bool:
        return self.connected

    def publish(self, topic: str, payload: bytes = b"", qos: int = 0, retain: bool = False) -> SimpleNamespace:
        self._mid += 1
        if not self.connected:
            return SimpleNamespace(mid=self._mid, rc=4)  # paho's MQTT_ERR_NO_CONN: queued, never acknowledged here
        self.sent.append((topic, payload))
        if self.on_publish is not None and qos:
            self.on_publish(self, None, self._mid, None, None)
        return SimpleNamespace(mid=self._mid, rc=0)
