"""The one place the TUI touches MQTT: bus messages in, commands out.

Every message under ``P/+/#`` is folded into the :class:`BusStore` and the change is
handed to ``on_change``; the app only marks what changed and redraws on its own
clock, so a burst of telemetry costs one redraw, not one per message. Commands are
published with a request id, an MQTT 5 response topic of this TUI's own and the
correlation data; the reply resolves the awaiting :meth:`BusBridge.send`. Under
MQTT 3.1.1 replies arrive on ``P/H/reply/<command>`` and are matched by request id.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from bus.mqtt import BrokerRefusedError, Connection, ConnectionSettings, Message, Subscription
from bus.reconnecting import ReconnectingClient
from bus.requests import Request, Requests
from shared.messages import ErrorCode, ErrorInfo, Reply
from shared.topics import CommandName, all_hosts_filter
from tui.store import BusStore, Change

log = logging.getLogger("modelbus.tui")

REPLY_TIMEOUT_S = 15.0


class LinkState(StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class Link:
    """The TUI's connection to the broker, as the header shows it."""

    state: LinkState
    broker: str
    protocol: str | None = None
    detail: str = ""


class BusBridge:
    def __init__(
        self,
        settings: ConnectionSettings,
        store: BusStore,
        *,
        on_change: Callable[[Change], None],
        on_link: Callable[[Link], None],
        reply_timeout_s: float = REPLY_TIMEOUT_S,
    ) -> None:
        self.store = store
        self.prefix = store.prefix
        self.reply_timeout_s = reply_timeout_s
        self._on_change = on_change
        self._on_link = on_link
        self._requests = Requests(self.prefix, "tui")
        self._pending: dict[str, tuple[Request, asyncio.Future[Reply[Any]]]] = {}
        self._client = ReconnectingClient(
            settings,
            # P/+/# also covers every P/H/reply/<ours> and P/H/reply/<command>.
            subscriptions=[Subscription(all_hosts_filter(self.prefix), qos=1)],
            on_message=self._on_message,
            on_state=self._on_state,
            on_retry=self._retrying,
            name="tui",
        )
        self._ever_connected = False
        self.link = Link(LinkState.CONNECTING, settings.describe())

    # -- connection --------------------------------------------------------------

    async def run(self) -> None:
        """Keep connected until cancelled. Refused credentials end it with a
        ``refused`` link saying why; retrying could not help."""
        self._set_link(self.link)
        try:
            await self._client.run()
        except BrokerRefusedError as exc:
            self._set_link(Link(LinkState.REFUSED, self.link.broker, detail=str(exc)))

    def _on_state(self, connected: bool) -> None:
        broker = self.link.broker
        if connected:
            self._ever_connected = True
            connection = self._client.connection
            protocol = connection.protocol if connection is not None else None
            self._set_link(Link(LinkState.CONNECTED, broker, protocol))
            return
        state = LinkState.RECONNECTING if self._ever_connected else LinkState.CONNECTING
        self._set_link(Link(state, broker))
        # Replies to what was sent over the lost connection may never come.
        for _request, future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("the connection to the broker was lost"))

    def _retrying(self, reason: str, delay_s: float) -> None:
        """Not connected: the header says why, and when the next attempt is."""
        state = LinkState.RECONNECTING if self._ever_connected else LinkState.CONNECTING
        detail = f"{reason}; next try in {delay_s:.0f} s"
        self._set_link(Link(state, self.link.broker, detail=detail))

    def _set_link(self, link: Link) -> None:
        self.link = link
        self._on_link(link)

    # -- incoming ------------------------------------------------------------------

    async def _on_message(self, _connection: Connection, message: Message) -> None:
        if self._is_reply_topic(message.topic):
            self._take_reply(message)
            return
        change = self.store.apply(message.topic, message.payload, retained=message.retain)
        if change is not None:
            self._on_change(change)

    def _is_reply_topic(self, topic: str) -> bool:
        rest = topic[len(self.prefix) + 1 :] if topic.startswith(self.prefix + "/") else ""
        levels = rest.split("/")
        return len(levels) > 1 and levels[1] == "reply"

    def _take_reply(self, message: Message) -> None:
        for request, future in self._pending.values():
            answer = request.answer(message)
            if answer is not None and not future.done():
                future.set_result(answer.reply)
                return

    # -- outgoing ------------------------------------------------------------------

    async def send(
        self, host: str, command: CommandName, fields: Mapping[str, Any] | None = None
    ) -> Reply[Any]:
        """Publish one command and wait for its reply. Never raises for bus trouble:
        not being connected, a lost connection or silence become an error reply
        the operator can read."""
        request = self._requests.make(host, command, fields)
        request_id = request.request_id
        future: asyncio.Future[Reply[Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (request, future)
        try:
            # P/+/# covers both places the reply may come (docs/protocol.md, "Replies").
            sent = self._client.publish(
                request.topic,
                request.payload,
                qos=1,
                response_topic=request.response_topic,
                correlation_data=request.correlation_data,
            )
            if not sent:
                return _local_error(
                    command, request_id, ErrorCode.INTERNAL, "not connected to the broker"
                )
            async with asyncio.timeout(self.reply_timeout_s):
                return await future
        except TimeoutError:
            return _local_error(
                command,
                request_id,
                ErrorCode.TIMEOUT,
                f"no reply from {host} within {self.reply_timeout_s:.0f} s; is its agent online?",
            )
        except ConnectionError as exc:
            return _local_error(command, request_id, ErrorCode.INTERNAL, str(exc))
        finally:
            self._pending.pop(request_id, None)


def _local_error(
    command: CommandName, request_id: str, code: ErrorCode, message: str
) -> Reply[Any]:
    """A reply the TUI makes up itself when the agent's cannot come."""
    return Reply(
        request_id=request_id,
        command=command.value,
        status="error",
        error=ErrorInfo(code=code, message=message),
    )
