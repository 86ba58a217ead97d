"""The MQTT adapter against the real broker: socket options and identity."""

from __future__ import annotations

import socket

from bus.mqtt import connect
from devtools.brokers import MosquittoBroker
from tests.support.bus import client_settings


async def test_client_socket_has_tcp_nodelay(broker: MosquittoBroker) -> None:
    async with connect(client_settings(broker.port)) as connection:
        raw = connection.socket()
        assert raw is not None
        assert raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert connection.protocol == "5"


async def test_forced_311_connects_as_311(broker: MosquittoBroker) -> None:
    async with connect(client_settings(broker.port, protocol="3.1.1")) as connection:
        assert connection.protocol == "3.1.1"
