"""The MQTT adapter: the only module that talks to paho-mqtt / aiomqtt.

It gives the rest of modelbus a small surface: ``ReconnectingClient`` keeps one
connection alive (MQTT 5 with a fallback to 3.1.1, TCP_NODELAY, fixed client id,
persistent session, capped backoff), replays its subscriptions on every connect
as Home Assistant's client does, and stops for good on refused credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

if TYPE_CHECKING:
    from agent.config import BrokerConfig

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
        return aiomqtt.Client(
            settings.host,
            settings.port,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=not settings.persistent_session,
            properties=connect_properties,
            **common,  # type: ignore[arg-type]
        )
    return aiomqtt.Client(
        settings.host,
        settings.port,
        protocol=aiomqtt.ProtocolVersion.V311,
        clean_session=not settings.persistent_session,
        **common,  # type: ignore[arg-type]
    )


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
        try:
            yield Connection(client, protocol)
        finally:
            # When the connection is already gone there is nothing left to close.
            with contextlib.suppress(aiomqtt.MqttError):
                await client.__aexit__(None, None, None)
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
    (where callers republish retained state and announce themselves), then
    feeds messages to ``on_message`` one at a time.
    """

    def __init__(
        self,
        settings: ConnectionSettings,
        *,
        subscriptions: Sequence[Subscription] = (),
        on_connected: OnConnected | None = None,
        on_message: OnMessage | None = None,
        on_state: OnState | None = None,
        name: str = "mqtt",
    ) -> None:
        self.settings = settings
        self.subscriptions = list(subscriptions)
        self._on_connected = on_connected
        self._on_message = on_message
        self._on_state = on_state
        self._log = logging.getLogger(f"modelbus.{name}")
        self._connection: Connection | None = None
        self._preferred: MqttProtocol | None = None
        self.connected = asyncio.Event()
        self.connect_count = 0

    @property
    def connection(self) -> Connection | None:
        return self._connection

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

    async def _serve(self, connection: Connection) -> None:
        await connection.subscribe(self.subscriptions)
        self.connect_count += 1
        self._log.info(
            "connected to %s with MQTT %s as %s",
            self.settings.describe(),
            connection.protocol,
            self.settings.client_id,
        )
        self._set_connection(connection)
        if self._on_connected is not None:
            await self._on_connected(connection)
        async for message in connection.messages():
            if self._on_message is not None:
                await self._on_message(connection, message)

    def _set_connection(self, connection: Connection | None) -> None:
        changed = (self._connection is None) != (connection is None)
        self._connection = connection
        if connection is None:
            self.connected.clear()
        else:
            self.connected.set()
        if changed and self._on_state is not None:
            self._on_state(connection is not None)

    async def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 0,
        retain: bool = False,
        correlation_data: bytes | None = None,
        response_topic: str | None = None,
    ) -> bool:
        """Publish if connected; False when there is no connection (the caller's
        retained state is republished on the next connect anyway)."""
        connection = self._connection
        if connection is None:
            return False
        try:
            await connection.publish(
                topic,
                payload,
                qos=qos,
                retain=retain,
                correlation_data=correlation_data,
                response_topic=response_topic,
            )
        except aiomqtt.MqttError as exc:
            self._log.debug("publish to %s failed: %s", topic, exc)
            return False
        return True
