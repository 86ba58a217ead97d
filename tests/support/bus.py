"""A test-side MQTT client that records what it sees and waits on conditions."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from bus.mqtt import Connection, ConnectionSettings, Message, Subscription, connect

_ids = itertools.count()


@dataclass
class BusWatcher:
    """Subscribes to filters and keeps every message; ``wait_for`` polls nothing,
    it wakes on each arrival."""

    connection: Connection
    messages: list[Message] = field(default_factory=list)
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    def latest(self, topic: str) -> Message | None:
        for message in reversed(self.messages):
            if message.topic == topic:
                return message
        return None

    def on(self, topic: str) -> list[Message]:
        return [m for m in self.messages if m.topic == topic]

    async def wait_for(
        self,
        predicate: Callable[[Message], bool],
        *,
        timeout: float = 10.0,
        after: int = 0,
        what: str = "a matching message",
    ) -> Message:
        """The first message (from index ``after``) that satisfies ``predicate``."""

        def find() -> Message | None:
            return next((m for m in self.messages[after:] if predicate(m)), None)

        try:
            async with asyncio.timeout(timeout), self._arrived:
                await self._arrived.wait_for(lambda: find() is not None)
        except TimeoutError:
            seen = sorted({m.topic for m in self.messages})
            raise AssertionError(f"timed out waiting for {what}; topics seen: {seen}") from None
        found = find()
        assert found is not None
        return found

    async def wait_until(
        self, condition: Callable[[], bool], *, timeout: float = 10.0, what: str = "a condition"
    ) -> None:
        """Until ``condition()`` holds, checked again on each arrival."""
        try:
            async with asyncio.timeout(timeout), self._arrived:
                await self._arrived.wait_for(condition)
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}") from None

    async def wait_topic(
        self,
        topic: str,
        check: Callable[[Any], bool] | None = None,
        *,
        timeout: float = 10.0,
        after: int = 0,
        raw: bool = False,
    ) -> Message:
        def matches(message: Message) -> bool:
            if message.topic != topic:
                return False
            if check is None:
                return True
            value = message.payload.decode() if raw else _json_or_none(message.payload)
            return bool(check(value))

        return await self.wait_for(matches, timeout=timeout, after=after, what=f"{topic}")

    async def _pump(self) -> None:
        async for message in self.connection.messages():
            async with self._arrived:
                self.messages.append(message)
                self._arrived.notify_all()


def _json_or_none(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except ValueError:
        return None


def client_settings(port: int, **overrides: Any) -> ConnectionSettings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "client_id": f"test-client-{next(_ids)}",
        "persistent_session": False,
        "protocol": "5",
        "connect_timeout_s": 5.0,
    }
    values.update(overrides)
    return ConnectionSettings(**values)


@contextlib.asynccontextmanager
async def watch(port: int, *filters: str, **overrides: Any) -> AsyncIterator[BusWatcher]:
    async with connect(client_settings(port, **overrides)) as connection:
        watcher = BusWatcher(connection)
        await connection.subscribe([Subscription(f, 1) for f in filters])
        pump = asyncio.create_task(watcher._pump())
        try:
            yield watcher
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
