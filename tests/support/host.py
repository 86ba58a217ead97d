"""One agent under test, commanded and watched over the real broker."""

from __future__ import annotations

import itertools
import json
from typing import Any

from shared.messages import Reply
from shared.topics import HostTopics
from tests.support.bus import BusWatcher

_request_ids = itertools.count()


class Host:
    """One agent under test and a client watching everything it publishes."""

    def __init__(self, bus: BusWatcher, topics: HostTopics, prefix: str) -> None:
        self.bus = bus
        self.topics = topics
        self.prefix = prefix

    async def ask(
        self, command: str, payload: dict[str, Any] | str = "", timeout: float = 30
    ) -> Reply:
        return await self.ask_on(self.topics.command(command), command, payload, timeout)

    async def ask_on(
        self, topic: str, command: str, payload: dict[str, Any] | str = "", timeout: float = 30
    ) -> Reply:
        """``command`` published on ``topic`` (the admin topic, say), its reply awaited."""
        request_id = f"r{next(_request_ids)}"
        body = (
            payload
            if isinstance(payload, str)
            else json.dumps({**payload, "request_id": request_id})
        )
        # Under the private tree for a private command (logs), as every client does.
        reply_topic = self.topics.client_reply(command, request_id)
        mark = len(self.bus.messages)
        await self.bus.connection.publish(topic, body, qos=1, response_topic=reply_topic)
        message = await self.bus.wait_topic(reply_topic, after=mark, timeout=timeout)
        return Reply.model_validate_json(message.payload)

    def model(self, name: str) -> dict[str, Any]:
        message = self.bus.latest(self.topics.model(name))
        assert message is not None, f"no state for {name}"
        return json.loads(message.payload)

    def gpu_used(self) -> int:
        message = self.bus.latest(self.topics.gpu(0))
        assert message is not None
        return int(json.loads(message.payload)["memory_used_mb"])

    async def wait_model(self, name: str, state: str, timeout: float = 20) -> dict[str, Any]:
        message = await self.bus.wait_topic(
            self.topics.model(name), lambda v: v and v["state"] == state, timeout=timeout
        )
        return json.loads(message.payload)

    async def wait_event(self, kind: str, timeout: float = 20) -> dict[str, Any]:
        message = await self.bus.wait_topic(
            self.topics.events, lambda v: v["event_type"] == kind, timeout=timeout
        )
        return json.loads(message.payload)

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [
            json.loads(m.payload)
            for m in self.bus.on(self.topics.events)
            if json.loads(m.payload)["event_type"] == kind
        ]

    async def online(self) -> None:
        await self.bus.wait_topic(self.topics.status, lambda v: v == "online", raw=True, timeout=20)
