"""Commands and their replies, the one way every client does it (the TUI, the command-line
client; n8n and scripts do the same by hand, see docs/protocol.md "Replies").

A client has a name of its own (``tui-<random>``, ``cli-<random>``). Each command carries a
request id, an MQTT 5 response topic under the commanded host's reply tree
(``P/H/reply/<name>``, which only that host's agent may write) and the request id again as
correlation data. Under MQTT 3.1.1 there are no response topics: the agent answers on
``P/H/reply/<command>``, which every client of that host shares, and the request id tells
ours apart. A private command's replies (``logs``) go under ``P/H/reply/private/`` either
way. Pure: what to publish, what to subscribe to, and which message answers.
"""

from __future__ import annotations

import itertools
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from bus.mqtt import Message, MqttProtocol
from shared.messages import Reply
from shared.topics import CommandName, HostTopics


@dataclass(frozen=True, slots=True)
class Answer:
    """A reply, parsed and as sent (the raw JSON keeps fields this version does not know)."""

    reply: Reply[Any]
    raw: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Request:
    """One command to one host, ready to publish."""

    host: str
    command: CommandName
    request_id: str
    topic: str
    payload: str
    response_topic: str
    default_reply_topic: str

    @property
    def correlation_data(self) -> bytes:
        return self.request_id.encode()

    def reply_filter(self, protocol: MqttProtocol) -> str:
        """Where the reply comes: our response topic, or the host's shared one under 3.1.1."""
        return self.response_topic if protocol == "5" else self.default_reply_topic

    def answer(self, message: Message) -> Answer | None:
        """The reply to this request, when ``message`` is it."""
        if message.topic not in (self.response_topic, self.default_reply_topic):
            return None
        try:
            reply: Reply[Any] = Reply.model_validate_json(message.payload)
        except ValidationError:
            return None
        if reply.request_id != self.request_id:
            return None
        return Answer(reply, json.loads(message.payload))


class Requests:
    """Makes the requests of one client: its name, its request ids, its response topics."""

    def __init__(self, prefix: str, kind: str) -> None:
        self.prefix = prefix
        token = secrets.token_hex(4)
        self.name = f"{kind}-{token}"
        self._numbers = itertools.count(1)

    def make(
        self,
        host: str,
        command: CommandName,
        fields: Mapping[str, Any] | None = None,
        *,
        admin: bool = False,
    ) -> Request:
        """``admin``: on ``P/H/admin/cmd/``, which only the admin role may write."""
        topics = HostTopics(self.prefix, host)
        request_id = f"{self.name}-{next(self._numbers)}"
        return Request(
            host=host,
            command=command,
            request_id=request_id,
            topic=topics.admin_command(command) if admin else topics.command(command),
            payload=json.dumps({**(fields or {}), "request_id": request_id}),
            response_topic=topics.client_reply(command, self.name),
            default_reply_topic=topics.default_reply(command),
        )
