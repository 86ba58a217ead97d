"""The agent, as a real process on simulated GPUs, against a real Mosquitto."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.brokers import MosquittoBroker
from devtools.gpu_sim import SimGpuClient
from shared.messages import GpuState, HostInfo, HostState
from shared.topics import HostTopics
from tests.support.agent_process import AgentProcess, write_agent_config
from tests.support.bus import watch

pytestmark = pytest.mark.broker


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[object]:
    started: list[AgentProcess] = []

    def start(broker_url: str, prefix: str, host: str = "gpu-a", **options: object) -> AgentProcess:
        config = write_agent_config(
            tmp_path / f"{host}.yaml", broker_url=broker_url, host_id=host, prefix=prefix, **options
        )  # type: ignore[arg-type]
        agent = AgentProcess(config)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.close()


async def test_agent_publishes_valid_retained_state_then_online(
    broker: MosquittoBroker, prefix: str, start_agent
) -> None:
    topics = HostTopics(prefix, "gpu-a")
    async with watch(broker.port, topics.everything_filter) as bus:
        start_agent(broker.url, prefix, gpus=2, memory_total_mb=24576)
        online = await bus.wait_topic(topics.status, lambda v: v == "online", raw=True)
        seen_before_online = {m.topic for m in bus.messages[: bus.messages.index(online)]}
        assert {topics.info, topics.gpu(0), topics.gpu(1), topics.state} <= seen_before_online

    # A late subscriber gets everything from the retained store, and it validates.
    async with watch(broker.port, topics.everything_filter) as late:
        await late.wait_topic(topics.status, lambda v: v == "online", raw=True)
        info = HostInfo.model_validate_json((await late.wait_topic(topics.info)).payload)
        assert info.host_id == "gpu-a"
        assert info.gpu_backend == "sim"
        assert info.mqtt_protocol == "5"
        assert [g.memory_total_mb for g in info.gpus] == [24576, 24576]
        assert "status" in info.commands
        gpu = GpuState.model_validate_json((await late.wait_topic(topics.gpu(1))).payload)
        assert gpu.index == 1
        assert gpu.memory_total_mb == 24576
        assert gpu.memory_used_mb is not None
        assert gpu.memory_free_mb == 24576 - gpu.memory_used_mb
        state = HostState.model_validate_json((await late.wait_topic(topics.state)).payload)
        assert state.total_mb == 2 * 24576
        assert state.used_mb + state.free_mb == state.total_mb
        assert state.loaded_models == {}
        assert state.queue_length == 0
        assert [g.index for g in state.gpus] == [0, 1]
        assert all(m.retain for m in late.messages if m.topic != topics.events)


async def test_memory_change_is_published_before_the_next_tick(
    broker: MosquittoBroker, prefix: str, start_agent, tmp_path: Path
) -> None:
    topics = HostTopics(prefix, "gpu-a")
    async with watch(broker.port, topics.everything_filter) as bus:
        # A long interval: only the change watch can explain a prompt update.
        start_agent(broker.url, prefix, interval_s=600.0)
        first = await bus.wait_topic(topics.gpu(0))
        before = json.loads(first.payload)["memory_used_mb"]
        client = SimGpuClient(tmp_path / "state" / "sim-gpus.bin")
        mark = len(bus.messages)
        client.set_usage(0, 4096, name="tester")
        changed = await bus.wait_topic(
            topics.gpu(0), lambda v: v["memory_used_mb"] == before + 4096, after=mark, timeout=5
        )
        processes = json.loads(changed.payload)["processes"]
        assert any(p["name"] == "tester" and p["used_mb"] == 4096 for p in processes)
        client.release()
        await bus.wait_topic(
            topics.gpu(0), lambda v: v["memory_used_mb"] == before, after=mark, timeout=5
        )


async def test_sigkill_leaves_offline_through_the_will(
    broker: MosquittoBroker, prefix: str, start_agent
) -> None:
    topics = HostTopics(prefix, "gpu-a")
    async with watch(broker.port, topics.status) as bus:
        agent = start_agent(broker.url, prefix)
        await bus.wait_topic(topics.status, lambda v: v == "online", raw=True)
        agent.kill()
        await bus.wait_topic(topics.status, lambda v: v == "offline", raw=True)
    async with watch(broker.port, topics.status) as late:
        message = await late.wait_topic(topics.status, raw=True)
        assert message.payload == b"offline" and message.retain


async def test_sigterm_publishes_offline_and_exits_cleanly(
    broker: MosquittoBroker, prefix: str, start_agent
) -> None:
    topics = HostTopics(prefix, "gpu-a")
    async with watch(broker.port, topics.status) as bus:
        agent = start_agent(broker.url, prefix)
        await bus.wait_topic(topics.status, lambda v: v == "online", raw=True)
        assert agent.terminate() == 0
        await bus.wait_topic(topics.status, lambda v: v == "offline", raw=True)


async def test_broker_restart_reconnects_and_republishes(
    own_broker: MosquittoBroker, prefix: str, start_agent
) -> None:
    topics = HostTopics(prefix, "gpu-a")
    start_agent(own_broker.url, prefix, interval_s=600.0)
    async with watch(own_broker.port, topics.everything_filter) as bus:
        await bus.wait_topic(topics.status, lambda v: v == "online", raw=True)
    own_broker.stop()
    own_broker.start()  # no persistence: every retained message is gone
    async with watch(own_broker.port, topics.everything_filter) as bus:
        await bus.wait_topic(topics.status, lambda v: v == "online", raw=True, timeout=15)
        # With a 600 s interval, only a republish on reconnect explains these.
        await bus.wait_topic(topics.info)
        await bus.wait_topic(topics.gpu(0))
        await bus.wait_topic(topics.state)


async def test_agent_waits_for_a_broker_that_is_down_at_start(
    own_broker: MosquittoBroker, prefix: str, start_agent
) -> None:
    topics = HostTopics(prefix, "gpu-a")
    own_broker.stop()
    agent = start_agent(own_broker.url, prefix)
    # Wait for two logged attempts (a condition, not a sleep), then bring the broker up.
    import asyncio

    async with asyncio.timeout(15):
        while agent.output().count("unreachable") < 2:
            assert agent.process.poll() is None, agent.output()
            await asyncio.sleep(0.05)
    own_broker.start()
    async with watch(own_broker.port, topics.status) as bus:
        await bus.wait_topic(topics.status, lambda v: v == "online", raw=True, timeout=15)
    assert agent.process.poll() is None


async def test_commands_sent_while_the_agent_is_away_arrive_when_it_returns(
    broker: MosquittoBroker, prefix: str, start_agent
) -> None:
    topics = HostTopics(prefix, "gpu-a")
    async with watch(broker.port, topics.status, topics.reply("status")) as bus:
        agent = start_agent(broker.url, prefix)
        await bus.wait_topic(topics.status, lambda v: v == "online", raw=True)
        agent.kill()
        await bus.wait_topic(topics.status, lambda v: v == "offline", raw=True)
        # The broker holds this for the agent's persistent session (QoS 1).
        await bus.connection.publish(
            topics.command("status"), b'{"request_id": "while-away"}', qos=1
        )
        mark = len(bus.messages)
        start_agent(broker.url, prefix)
        reply = await bus.wait_topic(
            topics.reply("status"), lambda v: v["request_id"] == "while-away", timeout=15
        )
        assert json.loads(reply.payload)["status"] == "ok"
        await bus.wait_topic(topics.status, lambda v: v == "online", raw=True, after=mark)
