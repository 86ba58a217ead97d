"""Single messages that once killed the agent, and input it once accepted that it
must refuse at once: each is answered with one structured error and the agent's
process lives on."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from devtools.brokers import MosquittoBroker
from shared.topics import HostTopics
from tests.integration.conftest import HOST
from tests.support.agent_process import AgentProcess, write_agent_config
from tests.support.bus import watch
from tests.support.host import Host
from tests.support.models import sim_model

pytestmark = pytest.mark.broker

KILLERS = {
    # Python refuses to turn more than 4,300 digits into an int (ValueError).
    "5,000-digit integer": ("load", '{"model":"whisperx","gpu":' + "1" * 5000 + "}"),
    # A lone surrogate is valid JSON but cannot be encoded back into a UTF-8 reply.
    "lone surrogate request id": ("status", '{"request_id":"\\ud800"}'),
    "lone surrogate field name": ("status", '{"\\udfff":1}'),
    # json.loads recurses once per level (RecursionError past ~1,000).
    "1,100 levels of nesting": ("load", '{"model":' + "[" * 1100 + "]" * 1100 + "}"),
}


@pytest.mark.parametrize("name", list(KILLERS))
async def test_one_message_cannot_kill_the_agent(
    name: str, start_host: Callable[..., AgentProcess], host: Host
) -> None:
    agent = start_host({"whisperx": sim_model(6144)})
    await host.online()
    command, payload = KILLERS[name]
    mark = len(host.bus.messages)
    await host.bus.connection.publish(host.topics.command(command), payload, qos=1)
    message = await host.bus.wait_topic(host.topics.reply(command), after=mark)
    reply = message.payload.decode()
    assert '"status":"error"' in reply and '"code":"invalid_payload"' in reply, reply
    assert agent.process.poll() is None, agent.output()
    status = await host.ask("status")
    assert status.status == "ok"
    assert agent.process.poll() is None


async def test_a_gpu_that_does_not_exist_is_refused_at_once(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    start_host({"whisperx": sim_model(6144)})
    await host.online()
    for command in ("load", "switch", "plan"):
        reply = await host.ask(command, {"model": "whisperx", "gpu": 5})
        assert reply.status == "error" and reply.error is not None, reply
        assert reply.error.code == "invalid_payload"
        assert "GPU 5" in reply.error.message and "0" in reply.error.message
        assert reply.job_id is None
    status = await host.ask("status")
    assert status.data is not None and status.data["jobs"] == []


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_an_agent_that_dies_of_an_error_goes_offline(
    protocol: str,
    broker: MosquittoBroker,
    start_host: Callable[..., AgentProcess],
    host: Host,
) -> None:
    """Not SIGKILL (the kernel closes the socket, and the will fires anyway): an
    exception ends the process, and the broker must still publish its will."""
    keepalive_s = 30
    agent = start_host(
        {},
        module="tests.support.crashing_agent",
        extra={"broker": {"url": broker.url, "protocol": protocol, "keepalive_s": keepalive_s}},
    )
    await host.online()
    mark = len(host.bus.messages)
    await host.bus.wait_topic(
        host.topics.status,
        lambda v: v == "offline",
        raw=True,
        after=mark,
        timeout=keepalive_s * 1.5,
    )
    assert agent.process.wait(10) != 0
    assert "injected by the test" in agent.output()


async def test_an_alert_raised_before_the_first_connection_is_delivered(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    # An idle simulated GPU sits at ambient temperature: above 1 °C from the first
    # sample, which the agent takes before it connects.
    start_host({}, extra={"alerts": {"temperature_high": {"above": 1, "clear_below": 0.5}}})
    await host.online()
    event = await host.wait_event("temperature_high")
    assert event["gpu"] == 0


async def test_what_falls_due_while_the_broker_is_away_is_delivered_after(
    own_broker: MosquittoBroker, prefix: str, tmp_path: Path
) -> None:
    """A job with ``wait`` ends while the agent has no broker: its reply, its
    model_loaded event and its final state arrive once the agent is back."""
    topics = HostTopics(prefix, HOST)
    config = write_agent_config(
        tmp_path / "agent.yaml",
        broker_url=own_broker.url,
        host_id=HOST,
        prefix=prefix,
        models={"slow": sim_model(2048, load_s=1.0)},
        # The agent comes back no sooner than 0.5 s after the broker: time enough for
        # the watcher below to be subscribed again first.
        extra={"broker": {"url": own_broker.url, "reconnect_min_s": 1.0, "reconnect_max_s": 1.0}},
    )
    agent = AgentProcess(config)
    try:
        async with watch(own_broker.port, topics.everything_filter) as bus:
            await bus.wait_topic(topics.status, lambda v: v == "online", raw=True, timeout=20)
            await bus.connection.publish(
                topics.command("switch"),
                json.dumps({"model": "slow", "wait": True, "request_id": "w-1"}),
                qos=1,
            )
            await bus.wait_topic(topics.model("slow"), lambda v: v and v["state"] == "loading")
        own_broker.stop()
        await wait_for_output(agent, "event model_loaded")  # the job ended, no broker
        own_broker.start()
        async with watch(own_broker.port, topics.everything_filter) as bus:
            reply = await bus.wait_topic(topics.reply("switch"), timeout=20)
            assert json.loads(reply.payload)["request_id"] == "w-1"
            assert json.loads(reply.payload)["status"] == "ok"
            await bus.wait_topic(topics.events, lambda v: v["event_type"] == "model_loaded")
            online = await bus.wait_topic(topics.status, lambda v: v == "online", raw=True)
            # Delivered before the agent announced itself: queued first, state after.
            assert bus.messages.index(reply) < bus.messages.index(online)
    finally:
        agent.terminate()
        agent.close()


async def wait_for_output(agent: AgentProcess, text: str, timeout: float = 20) -> None:
    for _ in range(int(timeout / 0.05)):
        if text in agent.output():
            return
        assert agent.process.poll() is None, agent.output()
        await asyncio.sleep(0.05)
    raise AssertionError(f"the agent never logged {text!r}: {agent.output()[-2000:]}")
