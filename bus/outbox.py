"""What a client has published but the broker has not yet acknowledged, pure: no MQTT.

Everything a client publishes goes through one outbox, so messages leave in the order
they were handed in, and nothing is lost to a moment without a connection: what waits
is sent once connected, and what was sent but never acknowledged is sent again (MQTT's
at-least-once). A retained message replaces a waiting one for the same topic, since
only a topic's latest value matters; that is also how a burst of updates to one job
collapses while the connection is slow. The outbox is bounded by messages and bytes:
when full, the oldest waiting message is dropped and counted.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(slots=True)
class Outgoing:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    correlation_data: bytes | None = None
    response_topic: str | None = None

    @property
    def size(self) -> int:
        return len(self.topic) + len(self.payload) + len(self.correlation_data or b"")


class Outbox:
    def __init__(self, *, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.dropped = 0
        self._waiting: deque[Outgoing] = deque()
        # The waiting retained message of each topic, replaced in place by a newer one.
        self._retained: dict[str, Outgoing] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._waiting)

    @property
    def bytes(self) -> int:
        return self._bytes

    def put(self, message: Outgoing) -> int:
        """Queue ``message``; returns how many old messages were dropped to make room."""
        if message.retain:
            waiting = self._retained.get(message.topic)
            if waiting is not None:
                self._bytes += message.size - waiting.size
                waiting.payload = message.payload
                waiting.qos = max(waiting.qos, message.qos)
                waiting.correlation_data = message.correlation_data
                waiting.response_topic = message.response_topic
                return self._trim()
            self._retained[message.topic] = message
        self._waiting.append(message)
        self._bytes += message.size
        return self._trim()

    def put_back(self, messages: Iterable[Outgoing]) -> int:
        """Put messages that were sent but not acknowledged back at the front, in their
        order; a retained one that a newer waiting value replaced is not sent again."""
        for message in reversed(list(messages)):
            if message.retain:
                if message.topic in self._retained:
                    continue
                self._retained[message.topic] = message
            self._waiting.appendleft(message)
            self._bytes += message.size
        return self._trim()

    def count_dropped(self) -> None:
        """Count a message dropped before it got here (one too large to send)."""
        self.dropped += 1

    def take(self) -> Outgoing | None:
        if not self._waiting:
            return None
        message = self._waiting.popleft()
        self._forget(message)
        return message

    def _forget(self, message: Outgoing) -> None:
        self._bytes -= message.size
        if message.retain and self._retained.get(message.topic) is message:
            del self._retained[message.topic]

    def _trim(self) -> int:
        dropped = 0
        while self._waiting and (
            len(self._waiting) > self.max_messages or self._bytes > self.max_bytes
        ):
            self._forget(self._waiting.popleft())
            dropped += 1
        self.dropped += dropped
        return dropped
