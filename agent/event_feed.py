"""The host's topics as the agent publishes them, fanned out to listeners that do not
speak MQTT (the HTTP server's ``GET /api/v1/events``): each listener gets every message
published under ``P/H/`` (state, GPUs, models, jobs, weights, events, status), except
replies and cleared commands, in order. A listener that falls ``backlog`` messages
behind is cut off (told so) rather than holding the agent's memory."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from shared.topics import HostTopics

# Messages a listener may fall behind by before it is cut off: a burst of job states
# and a second of telemetry for 8 GPUs fit many times over.
LISTENER_BACKLOG = 2000
# Concurrent listeners at most: each holds a connection and up to a backlog.
MAX_LISTENERS = 64
# Below the host's base: what no listener is sent (one caller's replies, command clears).
PRIVATE_LEVELS = ("reply/", "cmd/")


@dataclass(frozen=True, slots=True)
class FeedMessage:
    """One message: its topic below ``P/H/`` (``models/qwen``, ``gpu/0``) and payload."""

    name: str
    payload: bytes


class Listener:
    def __init__(self, prefixes: Sequence[str], backlog: int) -> None:
        self._prefixes = tuple(prefixes)
        self._backlog = backlog
        self._items: deque[FeedMessage] = deque()
        self._ready = asyncio.Event()
        self.overflowed = False

    def wants(self, name: str) -> bool:
        return not self._prefixes or any(
            name == prefix or name.startswith(prefix + "/") for prefix in self._prefixes
        )

    def push(self, item: FeedMessage) -> None:
        if self.overflowed:
            return
        if len(self._items) >= self._backlog:
            self.overflowed = True
            self._items.clear()
        else:
            self._items.append(item)
        self._ready.set()

    async def next(self, timeout_s: float) -> FeedMessage | None:
        """The next message; None after ``timeout_s`` without one, or once overflowed."""
        if not self._items and not self.overflowed:
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), timeout_s)
            except TimeoutError:
                return None
        if self.overflowed or not self._items:
            return None
        return self._items.popleft()


class EventFeed:
    def __init__(
        self,
        topics: HostTopics,
        *,
        backlog: int = LISTENER_BACKLOG,
        max_listeners: int = MAX_LISTENERS,
    ) -> None:
        self._head = topics.base + "/"
        self._backlog = backlog
        self._max_listeners = max_listeners
        self._listeners: set[Listener] = set()

    def published(self, topic: str, payload: bytes) -> None:
        """The bus client's publish observer."""
        if not self._listeners or not topic.startswith(self._head):
            return
        name = topic[len(self._head) :]
        if name.startswith(PRIVATE_LEVELS):
            return
        item = FeedMessage(name, payload)
        for listener in self._listeners:
            if listener.wants(name):
                listener.push(item)

    @property
    def full(self) -> bool:
        """``max_listeners`` follow: refuse the next (listen does not check)."""
        return len(self._listeners) >= self._max_listeners

    @contextmanager
    def listen(self, prefixes: Sequence[str] = ()) -> Iterator[Listener]:
        """A listener for the messages under ``prefixes`` (every one when empty)."""
        listener = Listener(prefixes, self._backlog)
        self._listeners.add(listener)
        try:
            yield listener
        finally:
            self._listeners.discard(listener)
