"""One MQTT connection kept alive (``bus.mqtt`` is the library's adapter underneath):
fixed client id, persistent session, capped backoff with jitter, subscriptions replayed on
every connect as Home Assistant's client does, an outbox that keeps what is published while
the broker is away, and a stop for good on refused credentials."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from bus.mqtt import (
    MAX_PUBLISH_BYTES,
    SEND_WINDOW,
    Connection,
    ConnectionSettings,
    Message,
    MqttError,
    MqttProtocol,
    Subscription,
    connect,
)
from bus.outbox import Outbox, Outgoing

log = logging.getLogger("bus.mqtt")

# How long one publish may wait for the broker's acknowledgement before it counts as
# not delivered (it is sent again over the next connection).
ACK_TIMEOUT_S = 30.0
# What a client keeps for the broker while it cannot deliver (see bus/outbox.py).
OUTBOX_MAX_MESSAGES = 10_000
OUTBOX_MAX_BYTES = 32 * 1024 * 1024
# How often, at most, dropped messages are logged.
DROP_LOG_INTERVAL_S = 10.0

OnConnected = Callable[[Connection], Awaitable[None]]
OnMessage = Callable[[Connection, Message], Awaitable[None]]
OnState = Callable[[bool], None]
# Why the last attempt failed (or the connection ended) and the seconds to the next one.
OnRetry = Callable[[str, float], None]


@dataclass(slots=True)
class Backoff:
    """Capped exponential backoff with jitter, so a fleet does not reconnect in step."""

    minimum_s: float
    maximum_s: float
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        ceiling = min(self.maximum_s, self.minimum_s * 2.0**self.attempt)
        self.attempt += 1
        jitter: float = self.rng.random()
        return ceiling / 2 + jitter * ceiling / 2

    def reset(self) -> None:
        self.attempt = 0


class ReconnectingClient:
    """Keeps a connection up for as long as ``run()`` runs.

    On every connect it subscribes to its filters, then calls ``on_connected``
    (where callers republish retained state and announce themselves), then feeds
    messages to ``on_message`` one at a time, in arrival order. One message's handler
    failing is logged and the next message is handled.

    Every publish goes through one outbox (bus/outbox.py) that a sender drains into
    the connection without waiting for each acknowledgement, so messages leave in the
    order they were published. With ``queue_while_offline`` what is published without
    a connection, and what was sent but never acknowledged when one ended, is kept and
    sent on the next connection; without it such publishes are refused (``False``).
    """

    def __init__(
        self,
        settings: ConnectionSettings,
        *,
        subscriptions: Sequence[Subscription] = (),
        on_connected: OnConnected | None = None,
        on_message: OnMessage | None = None,
        on_state: OnState | None = None,
        on_retry: OnRetry | None = None,
        queue_while_offline: bool = False,
        outbox_max_messages: int = OUTBOX_MAX_MESSAGES,
        outbox_max_bytes: int = OUTBOX_MAX_BYTES,
        name: str = "mqtt",
    ) -> None:
        self.settings = settings
        self.subscriptions = list(subscriptions)
        self.queue_while_offline = queue_while_offline
        self._on_connected = on_connected
        self._on_message = on_message
        self._on_state = on_state
        self._on_retry = on_retry
        self._log = logging.getLogger(f"modelbus.{name}")
        self._name = name
        self._connection: Connection | None = None
        self._preferred: MqttProtocol | None = None
        self.connected = asyncio.Event()
        self.connect_count = 0
        self._outbox = Outbox(max_messages=outbox_max_messages, max_bytes=outbox_max_bytes)
        # Called with (topic, payload) for every message queued for the broker (the
        # agent's server-sent events); each must be quick and must not raise.
        self.publish_observers: list[Callable[[str, bytes], None]] = []
        self._unacked: dict[int, Outgoing] = {}
        self._sequence = itertools.count()
        self._deliveries: set[asyncio.Task[None]] = set()
        self._wake_sender = asyncio.Event()
        # Set while nothing waits in the outbox and nothing sent awaits its ack.
        self._idle = asyncio.Event()
        self._idle.set()
        self._deliberate = False
        self._drops_logged = 0
        self._drop_logged_at = -DROP_LOG_INTERVAL_S

    @property
    def connection(self) -> Connection | None:
        return self._connection

    @property
    def waiting(self) -> int:
        """Messages published and not yet acknowledged by the broker."""
        return len(self._outbox) + len(self._unacked)

    @property
    def dropped(self) -> int:
        """Messages dropped: the outbox was full, or one was too large to publish."""
        return self._outbox.dropped

    async def run(self) -> None:
        """Connect, serve, and reconnect with backoff until cancelled.
        Raises BrokerRefusedError when retrying cannot help."""
        backoff = Backoff(self.settings.reconnect_min_s, self.settings.reconnect_max_s)
        where = self.settings.describe()
        while True:
            try:
                async with connect(self.settings, prefer=self._preferred) as connection:
                    self._preferred = connection.protocol
                    backoff.reset()
                    await self._serve(connection)
                # _serve only returns when the broker closed the stream cleanly.
                self._log.warning("connection to %s closed by the broker", where)
                reason = "the broker closed the connection"
            except MqttError as exc:
                self._set_connection(None)
                self._log.warning("broker %s unreachable or connection lost: %s", where, exc)
                reason = str(exc) or type(exc).__name__
            finally:
                self._set_connection(None)
            delay = backoff.next_delay()
            self._log.info(
                "reconnecting to %s in %.1f s (attempt %d)", where, delay, backoff.attempt
            )
            if self._on_retry is not None:
                self._on_retry(reason, delay)
            await asyncio.sleep(delay)

    async def close(self, timeout_s: float) -> bool:
        """Before a deliberate shutdown: deliver what is queued (for at most
        ``timeout_s``), then mark the end as chosen, so that cancelling ``run()`` sends a
        plain DISCONNECT. Any other end keeps the will. True when all was delivered."""
        delivered = await self.wait_delivered(timeout_s)
        self._deliberate = True
        if self._connection is not None:
            self._connection.deliberate_end = True
        return delivered

    async def wait_delivered(self, timeout_s: float) -> bool:
        """Wait until everything published so far is acknowledged (False on timeout)."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def _serve(self, connection: Connection) -> None:
        await connection.subscribe(self.subscriptions)
        self.connect_count += 1
        self._log.info(
            "connected to %s with MQTT %s as %s",
            self.settings.describe(),
            connection.protocol,
            self.settings.client_id,
        )
        connection.deliberate_end = self._deliberate
        if self._outbox.dropped > self._drops_logged:
            self._log.warning(
                "%d queued messages were dropped while the broker was away (%d in all)",
                self._outbox.dropped - self._drops_logged,
                self._outbox.dropped,
            )
            self._drops_logged = self._outbox.dropped
        self._set_connection(connection)
        sender = asyncio.create_task(self._send(connection), name=f"{self._name}-sender")
        try:
            if self._on_connected is not None:
                await self._on_connected(connection)
            async for message in connection.messages():
                if self._on_message is None:
                    continue
                try:
                    await self._on_message(connection, message)
                except Exception:  # one message must never end the connection
                    self._log.exception("could not handle a message on %.200s", message.topic)
        finally:
            await self._stop_sending(sender)

    def _set_connection(self, connection: Connection | None) -> None:
        changed = (self._connection is None) != (connection is None)
        self._connection = connection
        if connection is None:
            self.connected.clear()
        else:
            self.connected.set()
        if changed and self._on_state is not None:
            self._on_state(connection is not None)

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 0,
        retain: bool = False,
        correlation_data: bytes | None = None,
        response_topic: str | None = None,
    ) -> bool:
        """Queue a message for the broker. False when there is no connection and this
        client does not queue while offline (retained state is republished on the next
        connect by the caller anyway)."""
        if self._connection is None and not self.queue_while_offline:
            return False
        data = payload.encode() if isinstance(payload, str) else payload
        if len(data) > MAX_PUBLISH_BYTES:
            self._outbox.count_dropped()
            self._log.error(
                "not published to %.200s: %d bytes, more than the %d a message may carry",
                topic,
                len(data),
                MAX_PUBLISH_BYTES,
            )
            return False
        dropped = self._outbox.put(
            Outgoing(
                topic,
                data,
                qos=qos,
                retain=retain,
                correlation_data=correlation_data,
                response_topic=response_topic,
            )
        )
        self._idle.clear()
        self._wake_sender.set()
        if dropped:
            self._log_drops()
        for observer in self.publish_observers:
            observer(topic, data)
        return True

    async def _send(self, connection: Connection) -> None:
        """Hand the outbox to the connection, in order, up to SEND_WINDOW unacknowledged."""
        window = asyncio.Semaphore(SEND_WINDOW)
        while True:
            await window.acquire()
            message = self._outbox.take()
            if message is None:
                window.release()
                if not self._unacked:
                    self._idle.set()
                self._wake_sender.clear()
                await self._wake_sender.wait()
                continue
            number = next(self._sequence)
            self._unacked[number] = message
            # Tasks run their first step in the order they were created, and that step
            # hands the message to paho: the broker gets them in outbox order.
            delivery = asyncio.create_task(self._deliver(connection, number, message, window))
            self._deliveries.add(delivery)
            delivery.add_done_callback(self._deliveries.discard)

    async def _deliver(
        self, connection: Connection, number: int, message: Outgoing, window: asyncio.Semaphore
    ) -> None:
        try:
            await connection.publish(
                message.topic,
                message.payload,
                qos=message.qos,
                retain=message.retain,
                correlation_data=message.correlation_data,
                response_topic=message.response_topic,
                timeout_s=ACK_TIMEOUT_S,
            )
        except MqttError as exc:
            # Kept as unacknowledged: sent again over the next connection.
            self._log.debug("publish to %.200s not acknowledged: %s", message.topic, exc)
            return
        finally:
            window.release()
        del self._unacked[number]
        if not self._unacked and not len(self._outbox):
            self._idle.set()

    async def _stop_sending(self, sender: asyncio.Task[None]) -> None:
        """The connection ended: stop the sender and every delivery, then keep what was
        not acknowledged for the next connection (or drop it, without an offline queue)."""
        tasks = [sender, *self._deliveries]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        unacked = [self._unacked[n] for n in sorted(self._unacked)]
        self._unacked.clear()
        if not self.queue_while_offline:
            while self._outbox.take() is not None:
                pass
            self._idle.set()
            return
        if self._outbox.put_back(unacked):
            self._log_drops()
        if not len(self._outbox):
            self._idle.set()

    def _log_drops(self) -> None:
        """A counted warning for dropped messages, at most every DROP_LOG_INTERVAL_S."""
        now = asyncio.get_running_loop().time()
        if now - self._drop_logged_at < DROP_LOG_INTERVAL_S:
            return
        self._log.warning(
            "the outbox is full (%d messages, %d bytes): dropped %d of the oldest waiting "
            "messages since the last warning, %d in all",
            len(self._outbox),
            self._outbox.bytes,
            self._outbox.dropped - self._drops_logged,
            self._outbox.dropped,
        )
        self._drops_logged = self._outbox.dropped
        self._drop_logged_at = now
