"""The MQTT adapter: the only module that talks to paho-mqtt / aiomqtt.

It gives the rest of modelbus a small surface: ``connect`` opens one connection (MQTT 5
with a fallback to 3.1.1, TCP_NODELAY, TLS, the connect result checked, refused
credentials final), and ``Connection`` publishes, subscribes and reads on it.
``bus.reconnecting.ReconnectingClient`` keeps one alive on top of these.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import aiomqtt
from paho.mqtt.client import MQTT_ERR_SUCCESS
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

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
# The largest payload published: the shipped broker (max_packet_size 262144) drops the
# connection of a client that sends a bigger packet, which would then be sent again on
# every reconnect. 1 KiB is left for the topic and properties.
MAX_PUBLISH_BYTES = 262144 - 1024


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
