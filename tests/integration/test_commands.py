"""Command intake over the real broker: one structured reply per command, bad
input refused without harm, and the agent still serving afterwards."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from devtools.brokers import MosquittoBroker
from shared.messages import Reply
from shared.topics import HostTopics
from tests.support.agent_process import AgentProcess, write_agent_config
from tests.support.bus import BusWatcher, watch

pytestmark = pytest.mark.broker


@pytest.fixture
def agent(broker: MosquittoBroker, prefix: str, tmp_path: Path) -> Iterator[AgentProcess]:
    config = write_agent_config(
        tmp_path / "agent.yaml", broker_url=broker.url, host_id="gpu-c", prefix=prefix
    )
    process = AgentProcess(config)
    yield process
    process.close()


@pytest.fixture
async def bus(
    broker: MosquittoBroker, prefix: str, agent: AgentProcess
) -> AsyncIterator[BusWatcher]:
    topics = HostTopics(prefix, "gpu-c")
    async with watch(broker.port, topics.everything_filter) as watcher:
        await watcher.wait_topic(topics.status, lambda v: v == "online", raw=True)
        yield watcher


def replies(bus: BusWatcher, topic: str) -> list[Reply]:
    return [Reply.model_validate_json(m.payload) for m in bus.on(topic)]


async def ask(bus: BusWatcher, topic: str, payload: bytes | str, reply_topic: str) -> Reply:
    mark = len(bus.messages)
    await bus.connection.publish(topic, payload, qos=1)
    message = await bus.wait_topic(reply_topic, after=mark)
    return Reply.model_validate_json(message.payload)


async def test_status_over_a_response_topic_echoes_correlation_data(
    bus: BusWatcher, prefix: str
) -> None:
    topics = HostTopics(prefix, "gpu-c")
    mark = len(bus.messages)
    await bus.connection.publish(
        topics.command("status"),
        json.dumps({"request_id": "r-42"}),
        qos=1,
        response_topic=topics.reply("client-7"),
        correlation_data=b"\x00corr",
    )
    message = await bus.wait_topic(topics.reply("client-7"), after=mark)
    assert message.correlation_data == b"\x00corr"
    reply = Reply.model_validate_json(message.payload)
    assert (reply.status, reply.request_id, reply.command) == ("ok", "r-42", "status")
    assert reply.data is not None
    assert reply.data["info"]["host_id"] == "gpu-c"
    assert reply.data["state"]["total_mb"] == 32768
    assert len(reply.data["gpus"]) == 1
    # Exactly one reply, and none on the default topic.
    assert len(bus.on(topics.reply("client-7"))) == 1
    assert bus.on(topics.reply("status")) == []


async def test_bare_text_and_empty_payloads(bus: BusWatcher, prefix: str) -> None:
    topics = HostTopics(prefix, "gpu-c")
    reply = await ask(bus, topics.command("status"), b"", topics.reply("status"))
    assert reply.status == "ok" and len(reply.request_id) > 0
    reply = await ask(bus, topics.command("status"), b"now please", topics.reply("status"))
    assert reply.status == "error" and reply.error is not None
    assert reply.error.code == "invalid_payload"
    assert "takes no argument" in reply.error.message


@pytest.mark.parametrize(
    ("command", "payload", "code", "words"),
    [
        ("status", b"{not json", "invalid_payload", "not valid"),
        ("status", b'{"request_id": "x", "verbose": true}', "invalid_payload", "'verbose'"),
        ("load", b'{"model": 42}', "invalid_payload", "'model'"),
        ("load", b'{"model": "../../etc/passwd"}', "invalid_payload", "'model'"),
        ("load", b"\xff\xfe", "invalid_payload", "UTF-8"),
        ("load", b'["qwen"]', "invalid_payload", "JSON object"),
        ("reboot", b"", "unknown_command", "reboot"),
        ("status", b"x" * 20000, "payload_too_large", "limited"),
        ("uninstall", b"nothing-here", "not_found", "nothing-here"),
        ("load", b"qwen3-vl-30b", "unknown_model", "catalog has no models"),
        ("cancel", b"nosuchjob", "not_found", "nosuchjob"),
    ],
)
async def test_bad_commands_get_one_structured_error(
    bus: BusWatcher, prefix: str, command: str, payload: bytes, code: str, words: str
) -> None:
    topics = HostTopics(prefix, "gpu-c")
    reply = await ask(bus, topics.command(command), payload, topics.reply(command))
    assert reply.status == "error" and reply.error is not None
    assert reply.error.code == code
    assert words in reply.error.message
    assert reply.command == command
    # The agent is still serving.
    healthy = await ask(bus, topics.command("status"), b"", topics.reply("status"))
    assert healthy.status == "ok"


async def test_request_id_is_echoed_on_errors(bus: BusWatcher, prefix: str) -> None:
    topics = HostTopics(prefix, "gpu-c")
    reply = await ask(
        bus,
        topics.command("load"),
        json.dumps({"model": "x", "gpu": "zero", "request_id": "mine-1"}),
        topics.reply("load"),
    )
    assert reply.request_id == "mine-1"
    assert reply.error is not None and "'gpu'" in reply.error.message


@pytest.mark.parametrize(
    "elsewhere",
    [
        "{prefix}/gpu-c/state",
        # Protocol 1's fleet-wide tree, where any agent could have forged the answer.
        "{prefix}/reply/me",
        # Another host's reply tree.
        "{prefix}/gpu-d/reply/me",
    ],
)
async def test_response_topic_outside_the_reply_tree_is_refused(
    elsewhere: str, bus: BusWatcher, broker: MosquittoBroker, prefix: str
) -> None:
    topics = HostTopics(prefix, "gpu-c")
    response_topic = elsewhere.format(prefix=prefix)
    async with watch(broker.port, response_topic) as there:
        mark = len(bus.messages)
        await bus.connection.publish(
            topics.command("status"), b"", qos=1, response_topic=response_topic
        )
        message = await bus.wait_topic(topics.reply("status"), after=mark)
        reply = Reply.model_validate_json(message.payload)
        assert reply.status == "error" and reply.error is not None
        assert reply.error.code == "forbidden"
        assert response_topic in reply.error.message
        # A status round trip later, nothing but the agent's telemetry was written there.
        await ask(bus, topics.command("status"), b"", topics.reply("status"))
    assert all(json.loads(m.payload).get("status") is None for m in there.messages)


async def test_retained_command_is_not_executed_and_is_cleared(
    bus: BusWatcher, prefix: str, broker: MosquittoBroker
) -> None:
    topics = HostTopics(prefix, "gpu-c")
    mark = len(bus.messages)
    await bus.connection.publish(topics.command("status"), b"", qos=1, retain=True)
    message = await bus.wait_topic(topics.reply("status"), after=mark)
    reply = Reply.model_validate_json(message.payload)
    assert reply.status == "error" and reply.error is not None
    assert reply.error.code == "forbidden" and "retained" in reply.error.message
    # Cleared: a new subscriber is sent no retained command. Retained messages come
    # right after the subscription, so by the time a fresh reply arrives they would be here.
    async with watch(broker.port, topics.command("status"), topics.reply("status")) as fresh:
        probe = await ask(fresh, topics.command("status"), b"", topics.reply("status"))
        assert probe.status == "ok"
        assert [m for m in fresh.messages if m.retain] == []
    # The clearing (an empty retained publish) did not count as a second command.
    forbidden = [
        r
        for r in replies(bus, topics.reply("status"))
        if r.error is not None and r.error.code == "forbidden"
    ]
    assert len(forbidden) == 1
    assert [r for r in replies(bus, topics.reply("status")) if r.status == "error"] == forbidden
