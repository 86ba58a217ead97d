"""Brokers other than the friendly default: a 3.1.1-only broker, a broker that
refuses our credentials, and the shipped ACL."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from amqtt.broker import Broker

from devtools.brokers import MosquittoBroker, free_port
from shared.messages import HostInfo
from shared.topics import HostTopics
from tests.conftest import TEST_USERS
from tests.support.agent_process import AgentProcess, write_agent_config
from tests.support.bus import watch

pytestmark = pytest.mark.broker


@contextlib.asynccontextmanager
async def amqtt_broker() -> AsyncIterator[int]:
    """amqtt speaks MQTT 3.1.1 only: it answers a v5 CONNECT with 'unacceptable protocol'."""
    port = free_port()
    logging.getLogger("amqtt").setLevel(logging.ERROR)
    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            "auth": {"allow-anonymous": True, "plugins": ["auth_anonymous"]},
            "topic-check": {"enabled": False},
        }
    )
    await broker.start()
    try:
        yield port
    finally:
        await broker.shutdown()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_agent_falls_back_to_mqtt_311(tmp_path: Path) -> None:
    topics = HostTopics("modelbus", "old-broker")
    async with amqtt_broker() as port:
        config = write_agent_config(
            tmp_path / "agent.yaml",
            broker_url=f"mqtt://127.0.0.1:{port}",
            host_id="old-broker",
            prefix="modelbus",
            # amqtt ignores a v5 CONNECT with session properties instead of refusing
            # it: time out quickly, then fall back.
            extra={"broker": {"url": f"mqtt://127.0.0.1:{port}", "connect_timeout_s": 1.0}},
        )
        agent = AgentProcess(config)
        try:
            async with watch(port, topics.everything_filter, protocol="3.1.1") as bus:
                await bus.wait_topic(topics.status, lambda v: v == "online", raw=True, timeout=20)
                info = HostInfo.model_validate_json((await bus.wait_topic(topics.info)).payload)
                assert info.mqtt_protocol == "3.1.1"
                await bus.wait_topic(topics.gpu(0))
            assert "MQTT 5" in agent.output() and "trying the next version" in agent.output()
        finally:
            agent.close()


async def test_bad_credentials_stop_the_agent_with_a_clear_error(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    config = write_agent_config(
        tmp_path / "agent.yaml",
        broker_url=f"mqtt://gpu1:wrong-password@127.0.0.1:{broker.auth_port}",
        host_id="gpu1",
        prefix="modelbus",
    )
    agent = AgentProcess(config)
    try:
        code = await asyncio.to_thread(agent.process.wait, 20)
        assert code == 1
        output = agent.output()
        assert "refused the credentials" in output
        assert "Traceback" not in output
        assert output.count("refused the credentials") == 1  # no retry loop
    finally:
        agent.close()


async def test_agent_runs_under_the_shipped_acl(broker: MosquittoBroker, tmp_path: Path) -> None:
    topics = HostTopics("modelbus", "gpu1")
    config = write_agent_config(
        tmp_path / "agent.yaml",
        broker_url=f"mqtt://gpu1:{TEST_USERS['gpu1']}@127.0.0.1:{broker.auth_port}",
        host_id="gpu1",
        prefix="modelbus",
    )
    agent = AgentProcess(config)
    try:
        async with watch(
            broker.auth_port,
            topics.everything_filter,
            username="operator",
            password=TEST_USERS["operator"],
        ) as bus:
            await bus.wait_topic(topics.status, lambda v: v == "online", raw=True, timeout=15)
            await bus.wait_topic(topics.gpu(0))
            # The operator may command; the agent (allowed to write replies) answers.
            mark = len(bus.messages)
            await bus.connection.publish(topics.command("status"), b"", qos=1)
            await bus.wait_topic(topics.reply("status"), lambda v: v["status"] == "ok", after=mark)
    finally:
        agent.terminate()
        agent.close()
