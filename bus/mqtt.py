"""The MQTT adapter: the only module that talks to paho-mqtt / aiomqtt.

It gives the rest of modelbus a small surface: ``ReconnectingClient`` keeps one
connection alive (MQTT 5 with a fallback to 3.1.1, TCP_NODELAY, fixed client id,
persistent session, capped backoff), replays its subscriptions on every connect
as Home Assistant's client does, and stops for good on refused credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import select
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import aiomqtt
from paho.mqtt.client import MQTT_ERR_SUCCESS
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from bus.outbox import Outbox, Outgoing

if TYPE_CHECKING:
    from bus.settings import BrokerConfig

log = logging.getLogger(__name__)

MqttProtocol = Literal["5", "3.1.1"]
# Nagle's algorithm holds small packets back for ~40 ms; a command round trip
# then costs ~88 ms instead of ~1 ms.
NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

# CONNACK codes (3.1.1 return codes and MQTT 5 reason codes) that no retry can fix.
_BAD_CREDENTIALS = {4, 5, 0x86, 0x87, 0x8C}
_CLIENT_ID_REJECTED = {2, 0x85}
_BANNED = {0x8A}
_UNSUPPORTED_PROTOCOL = {1, 0x84}
# MQTT 5's DISCONNECT reason that asks the broker to publish the will all the same.
_DISCONNECT_WITH_WILL = 0x04

# Packets read per wakeup of the socket, at most, before other work gets a turn.
MAX_PACKETS_PER_WAKEUP = 1000
# Publishes handed to the connection and not yet acknowledged, at most.
SEND_WINDOW = 100
# How long one publish may wait for the broker's acknowledgement before it counts as
# not delivered (it is sent again over the next connection).
ACK_TIMEOUT_S = 30.0
# The largest payload published: the shipped broker (max_packet_size 262144) drops the
# connection of a client that sends a bigger packet, which would then be sent again on
# every reconnect. 1 KiB is left for the topic and properties.
MAX_PUBLISH_BYTES = 262144 - 1024
# What a client keeps for the broker while it cannot deliver (see bus/outbox.py).
OUTBOX_MAX_MESSAGES = 10_000
OUTBOX_MAX_BYTES = 32 * 1024 * 1024
# How often, at most, dropped messages are logged.
DROP_LOG_INTERVAL_S = 10.0


# What a lost connection raises from publish; callers catch it without importing aiomqtt.
MqttError = aiomqtt.MqttError


class BrokerRefusedError(Exception):
    """The broker refused us for a reason retrying cannot fix (credentials, client id, ban)."""


@dataclass(frozen=True, slots=True)
class Message:
    """A message as modelbus sees it, free of paho types."""

    topic: str
    payload: bytes
    retain: bool = False
    qos: int = 0
    response_topic: str | None = None
    correlation_data: bytes | None = None


@dataclass(frozen=True, slots=True)
class Subscription:
    filter: str
    qos: int = 1
    # MQTT 5 only: keep the retain flag on live messages, so a command published
    # with -r is recognised (and refused) at once rather than only after a reconnect.
    retain_as_published: bool = False


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    host: str
    port: int
    client_id: str
    username: str | None = None
    password: str | None = None
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    keepalive_s: int = 30
    # A persistent session keeps QoS 1 commands for us while we are briefly away.
    persistent_session: bool = True
    session_expiry_s: int = 3600
    connect_timeout_s: float = 10.0
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    tls_insecure: bool = False
    will: Will | None = None
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0

    def describe(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        who = f"{self.username}@" if self.username else ""
        return f"{scheme}://{who}{self.host}:{self.port}"


def settings_from_config(
    broker: BrokerConfig, client_id: str, *, persistent_session: bool, will: Will | None = None
) -> ConnectionSettings:
    """Connection settings from the ``broker`` section shared by the agent and the TUI."""
    username, password = broker.credentials
    return ConnectionSettings(
        host=broker.host,
        port=broker.port,
        client_id=client_id,
        username=username,
        password=password,
        protocol=broker.protocol,
        keepalive_s=broker.keepalive_s,
        persistent_session=persistent_session,
        session_expiry_s=broker.session_expiry_s,
        connect_timeout_s=broker.connect_timeout_s,
        tls=broker.tls,
        ca_file=broker.ca_file,
        cert_file=broker.cert_file,
        key_file=broker.key_file,
        tls_insecure=broker.tls_insecure,
        will=will,
        reconnect_min_s=broker.reconnect_min_s,
        reconnect_max_s=broker.reconnect_max_s,
    )


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


class Connection:
    """One live connection; handed to callbacks, valid until it drops."""

    def __init__(self, client: aiomqtt.Client, protocol: MqttProtocol) -> None:
        self._client = client
        self.protocol: MqttProtocol = protocol
        # Only an end its owner chose may send a plain DISCONNECT, which makes the
        # broker discard the will; any other end (an exception, a crash) keeps it.
        self.deliberate_end = False

    @property
    def backlog(self) -> int:
        """Messages received (and acknowledged) that ``messages()`` has not yet yielded."""
        return len(self._client.messages)

    def socket(self) -> socket.socket | None:
        """The TCP socket, for checks such as TCP_NODELAY."""
        raw = self._client._client.socket()
        return raw if isinstance(raw, socket.socket) else None

    async def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 0,
        retain: bool = False,
        correlation_data: bytes | None = None,
        response_topic: str | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        properties = None
        if self.protocol == "5" and (correlation_data is not None or response_topic is not None):
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if correlation_data is not None:
                properties.CorrelationData = correlation_data
            if response_topic is not None:
                properties.ResponseTopic = response_topic
        await self._client.publish(
            topic, payload, qos=qos, retain=retain, properties=properties, timeout=timeout_s
        )

    def _read_everything_available(self) -> None:
        """aiomqtt reads one packet per wakeup of the socket (paho's ``loop_read``
        reads a single one while nothing of ours is in flight), so while the loop is busy
        the broker's window toward us fills and, under a burst, its queue overflows and
        drops messages it already acknowledged to their senders. Read everything the
        socket holds instead: each QoS 1 message is acknowledged as soon as it arrives."""
        paho = self._client._client
        raw = paho.socket()
        if not isinstance(raw, socket.socket):
            return
        sock = raw
        disconnected = self._client._disconnected

        def on_readable() -> None:
            try:
                for _ in range(MAX_PACKETS_PER_WAKEUP):
                    if paho.loop_read() != MQTT_ERR_SUCCESS or not _readable_now(sock):
                        break
            except Exception as exc:  # as aiomqtt's own reader: a broken socket
                if not disconnected.done():
                    disconnected.set_exception(exc)

        loop = asyncio.get_running_loop()
        loop.remove_reader(sock.fileno())
        loop.add_reader(sock.fileno(), on_readable)

    async def _end(self, *, keep_will: bool) -> None:
        """Close the connection: a plain DISCONNECT, or one that keeps the will."""
        client = self._client
        if not keep_will or client._disconnected.done():
            # When the connection is already gone there is nothing left to close.
            with contextlib.suppress(aiomqtt.MqttError):
                await client.__aexit__(None, None, None)
            return
        paho = client._client
        if self.protocol == "5":
            paho.disconnect(
                reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=_DISCONNECT_WITH_WILL)
            )
        else:
            # MQTT 3.1.1 has no DISCONNECT that keeps the will: drop the socket instead.
            sock = paho.socket()
            if isinstance(sock, socket.socket):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(TimeoutError, aiomqtt.MqttError):
            async with asyncio.timeout(2.0):
                await asyncio.shield(client._disconnected)
        if client._disconnected.done() and not client._disconnected.cancelled():
            client._disconnected.exception()  # seen: not "never retrieved"
        with contextlib.suppress(aiomqtt.MqttError):
            await client.__aexit__(None, None, None)

    async def subscribe(self, subscriptions: Sequence[Subscription]) -> None:
        if not subscriptions:
            return
        if self.protocol == "5":
            await self._client.subscribe(
                [
                    (s.filter, SubscribeOptions(qos=s.qos, retainAsPublished=s.retain_as_published))
                    for s in subscriptions
                ]
            )
        else:
            await self._client.subscribe([(s.filter, s.qos) for s in subscriptions])

    async def messages(self) -> AsyncIterator[Message]:
        async for raw in self._client.messages:
            yield _to_message(raw)


def _readable_now(sock: socket.socket) -> bool:
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def _to_message(raw: aiomqtt.Message) -> Message:
    response_topic = correlation = None
    props = raw.properties
    if props is not None:
        response_topic = getattr(props, "ResponseTopic", None)
        correlation = getattr(props, "CorrelationData", None)
    return Message(
        topic=raw.topic.value,
        payload=bytes(raw.payload),
        retain=bool(raw.retain),
        qos=int(raw.qos),
        response_topic=response_topic,
        correlation_data=bytes(correlation) if correlation is not None else None,
    )


def _tls_context(settings: ConnectionSettings) -> ssl.SSLContext | None:
    if not settings.tls:
        return None
    context = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
    if settings.cert_file:
        context.load_cert_chain(
            str(settings.cert_file), str(settings.key_file) if settings.key_file else None
        )
    if settings.tls_insecure:
        context.check_hostname = False
    return context


def _client(settings: ConnectionSettings, protocol: MqttProtocol) -> aiomqtt.Client:
    will = None
    if settings.will is not None:
        w = settings.will
        will = aiomqtt.Will(w.topic, w.payload, qos=w.qos, retain=w.retain)
    common = {
        "username": settings.username,
        "password": settings.password,
        "identifier": settings.client_id,
        "will": will,
        "keepalive": settings.keepalive_s,
        "timeout": settings.connect_timeout_s,
        "tls_context": _tls_context(settings),
        "socket_options": [NODELAY],
        "logger": logging.getLogger("modelbus.paho"),
    }
    if protocol == "5":
        connect_properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        connect_properties.SessionExpiryInterval = (
            settings.session_expiry_s if settings.persistent_session else 0
        )
        client = aiomqtt.Client(
            settings.host,
            settings.port,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=not settings.persistent_session,
            properties=connect_properties,
            **common,  # type: ignore[arg-type]
        )
    else:
        client = aiomqtt.Client(
            settings.host,
            settings.port,
            protocol=aiomqtt.ProtocolVersion.V311,
            clean_session=not settings.persistent_session,
            **common,  # type: ignore[arg-type]
        )
    # aiomqtt's timeout bounds the wait for CONNACK; the TCP connect itself, in paho's
    # worker thread, has paho's own (5 s by default): one bound for both.
    client._client.connect_timeout = settings.connect_timeout_s
    return client


def _reason_value(exc: aiomqtt.MqttCodeError) -> int | None:
    rc = exc.rc
    if rc is None:
        return None
    value = getattr(rc, "value", rc)
    return int(value) if isinstance(value, int) else None


@asynccontextmanager
async def connect(
    settings: ConnectionSettings, *, prefer: MqttProtocol | None = None
) -> AsyncIterator[Connection]:
    """Open one connection. In ``auto`` mode MQTT 5 is tried first and 3.1.1 when the
    broker says it does not speak 5. Raises BrokerRefusedError or aiomqtt.MqttError."""
    if settings.protocol != "auto":
        order: list[MqttProtocol] = [settings.protocol]
    elif prefer == "3.1.1":
        order = ["3.1.1", "5"]
    else:
        order = ["5", "3.1.1"]
    last_error: aiomqtt.MqttError | None = None
    for protocol in order:
        client = _client(settings, protocol)
        is_last = protocol == order[-1]
        try:
            await client.__aenter__()
        except aiomqtt.MqttCodeError as exc:
            code = _reason_value(exc)
            _raise_if_fatal(settings, code)
            if code not in _UNSUPPORTED_PROTOCOL or is_last:
                raise
            log.info(
                "broker %s refused MQTT %s; trying the next version", settings.describe(), protocol
            )
            last_error = exc
            continue
        except aiomqtt.MqttError as exc:
            # Some 3.1.1-only brokers never answer a v5 CONNECT (they choke on its
            # properties) instead of refusing it, so a silent broker earns one try
            # of the other version too.
            if is_last:
                raise
            log.info(
                "broker %s did not accept MQTT %s (%s); trying the next version",
                settings.describe(),
                protocol,
                exc,
            )
            last_error = exc
            continue
        # Publishes are pipelined (see ReconnectingClient): no warning per waiting ack.
        client.pending_calls_threshold = SEND_WINDOW + 1
        connection = Connection(client, protocol)
        connection._read_everything_available()
        try:
            yield connection
        except BaseException:
            # An exception, a crash or a cancellation the owner did not choose: the
            # broker must still publish the will (``offline``) for us.
            await connection._end(
                keep_will=settings.will is not None and not connection.deliberate_end
            )
            raise
        await connection._end(keep_will=False)
        return
    assert last_error is not None
    raise last_error


def _raise_if_fatal(settings: ConnectionSettings, code: int | None) -> None:
    where = settings.describe()
    if code in _BAD_CREDENTIALS:
        raise BrokerRefusedError(
            f"broker {where} refused the credentials: check the username and password "
            "(broker url, MODELBUS_BROKER_USERNAME/PASSWORD) and the broker's password file"
        )
    if code in _CLIENT_ID_REJECTED:
        raise BrokerRefusedError(
            f"broker {where} rejected client id {settings.client_id!r}: choose another client_id"
        )
    if code in _BANNED:
        raise BrokerRefusedError(f"broker {where} has banned this client")


OnConnected = Callable[[Connection], Awaitable[None]]
OnMessage = Callable[[Connection, Message], Awaitable[None]]
OnState = Callable[[bool], None]


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
        self._log = logging.getLogger(f"modelbus.{name}")
        self._name = name
        self._connection: Connection | None = None
        self._preferred: MqttProtocol | None = None
        self.connected = asyncio.Event()
        self.connect_count = 0
        self._outbox = Outbox(max_messages=outbox_max_messages, max_bytes=outbox_max_bytes)
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
            except aiomqtt.MqttError as exc:
                self._set_connection(None)
                self._log.warning("broker %s unreachable or connection lost: %s", where, exc)
            finally:
                self._set_connection(None)
            delay = backoff.next_delay()
            self._log.info(
                "reconnecting to %s in %.1f s (attempt %d)", where, delay, backoff.attempt
            )
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
        except aiomqtt.MqttError as exc:
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
