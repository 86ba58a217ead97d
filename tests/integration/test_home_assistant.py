"""Home Assistant MQTT discovery against the real broker and a real agent: the config
Home Assistant would read, its entities driving the agent, and republishing on HA's birth."""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools.brokers import MosquittoBroker
from tests.support.agent_process import AgentProcess
from tests.support.bus import BusWatcher, watch
from tests.support.host import Host
from tests.support.models import sim_model

pytestmark = pytest.mark.broker


@pytest.fixture
def ha_prefix(prefix: str) -> str:
    return f"{prefix}/ha"  # each test its own discovery prefix, as its own topic prefix


@pytest.fixture
def start(start_host: Callable[..., AgentProcess], ha_prefix: str) -> Callable[..., AgentProcess]:
    def run(**homeassistant: Any) -> AgentProcess:
        return start_host(
            {"small": sim_model(1024), "other": sim_model(2048)},
            extra={
                "homeassistant": {
                    "discovery_prefix": ha_prefix,
                    "republish_delay_max_s": 0.2,
                    **homeassistant,
                }
            },
        )

    return run


def discovery_topic(host: Host, ha_prefix: str) -> str:
    device = re.sub(r"[^a-zA-Z0-9_-]", "_", f"{host.prefix}_{host.topics.host}")
    return f"{ha_prefix}/device/{device}/config"


async def config(ha: BusWatcher, topic: str, after: int = 0) -> dict[str, Any]:
    message = await ha.wait_topic(topic, lambda v: v is not None, after=after, timeout=20)
    return json.loads(message.payload)


async def test_discovery_describes_the_host_and_its_entities_drive_it(
    start: Callable[..., AgentProcess], host: Host, broker: MosquittoBroker, ha_prefix: str
) -> None:
    topic = discovery_topic(host, ha_prefix)
    async with watch(broker.port, f"{ha_prefix}/#") as ha:
        start()
        await host.online()
        payload = await config(ha, topic)
    device = payload["device"]
    assert device["manufacturer"] == "modelbus" and device["identifiers"]
    assert payload["origin"]["name"] == "modelbus"
    assert payload["availability_topic"] == host.topics.status
    components = payload["components"]
    for key in ("vram_used", "vram_free", "vram_total", "utilization", "temperature", "power"):
        sensor = components[f"gpu0_{key}"]
        assert sensor["platform"] == "sensor" and sensor["state_topic"] == host.topics.gpu(0)
    assert components["gpu0_vram_used"]["unit_of_measurement"] == "MiB"
    assert components["gpu0_problem"]["platform"] == "binary_sensor"
    assert components["gpu0_problem"]["device_class"] == "problem"
    ids = [c["unique_id"] for c in components.values()]
    assert len(ids) == len(set(ids))

    # Every value_template reads a field the agent really publishes on that state topic.
    gpu = json.loads(host.bus.latest(host.topics.gpu(0)).payload)  # type: ignore[union-attr]
    state_message = await host.bus.wait_topic(host.topics.state, lambda v: v is not None)
    state = json.loads(state_message.payload)
    published = {host.topics.gpu(0): gpu, host.topics.state: state}
    for component in components.values():
        template = component.get("value_template")
        if template is None:
            continue
        for field in re.findall(r"value_json\.([a-z_]+)", template):
            assert field in published[component["state_topic"]], (component["unique_id"], field)

    select = components["active_model"]
    assert select["platform"] == "select" and select["options"] == ["other", "small"]
    assert select["command_topic"] == host.topics.command("switch")
    button = components["unload_all"]
    assert components["events"]["platform"] == "event"
    assert "model_loaded" in components["events"]["event_types"]

    # Choosing a model in the select publishes its name, as Home Assistant does.
    mark = len(host.bus.messages)
    await host.bus.connection.publish(select["command_topic"], "small", qos=1)
    await host.bus.wait_topic(host.topics.reply("switch"), lambda v: v and v["status"] == "ok")
    await host.wait_model("small", "ready")
    assert host.bus.messages[mark:]
    # The button unloads everything.
    await host.bus.connection.publish(button["command_topic"], button["payload_press"], qos=1)
    reply = await host.bus.wait_topic(host.topics.reply("unload"), lambda v: v is not None)
    jobs = json.loads(reply.payload)["data"]["jobs"]
    assert [j["model"] for j in jobs] == ["small"]
    await host.wait_model("small", "stopped")


async def test_republished_on_home_assistant_birth_and_never_flooded(
    start: Callable[..., AgentProcess], host: Host, broker: MosquittoBroker, ha_prefix: str
) -> None:
    topic = discovery_topic(host, ha_prefix)
    agent = start()
    await host.online()
    async with watch(broker.port, topic) as ha:
        await config(ha, topic)  # the retained one
        mark = len(ha.messages)
        await ha.connection.publish(f"{ha_prefix}/status", "online", qos=1)
        await config(ha, topic, after=mark)  # Home Assistant restarted: sent again

        mark = len(ha.messages)
        for _ in range(5):  # Home Assistant flapping offline/online
            await ha.connection.publish(f"{ha_prefix}/status", "offline", qos=1)
            await ha.connection.publish(f"{ha_prefix}/status", "online", qos=1)
        await config(ha, topic, after=mark)
        assert agent.terminate() == 0  # the end of what the burst could cause
        republished = [m for m in ha.messages[mark:] if m.topic == topic and m.payload]
        # Announcements during a pending republish join it: never more than one each.
        assert 1 <= len(republished) <= 5


async def test_turning_discovery_off_removes_the_device(
    start: Callable[..., AgentProcess], host: Host, broker: MosquittoBroker, ha_prefix: str
) -> None:
    topic = discovery_topic(host, ha_prefix)
    agent = start()
    await host.online()
    async with watch(broker.port, topic) as ha:
        await config(ha, topic)
        assert agent.terminate() == 0
        start(enabled=False)
        await ha.wait_topic(topic, lambda v: v is None, timeout=20)  # the empty payload
    # A newcomer gets no retained config any more. Retained messages come in the order
    # of the filters of one SUBSCRIBE, so the sentinel's arrival closes the question.
    sentinel = f"{ha_prefix}/sentinel"
    async with watch(broker.port) as publisher:
        await publisher.connection.publish(sentinel, "here", qos=1, retain=True)
    async with watch(broker.port, topic, sentinel) as newcomer:
        await newcomer.wait_topic(sentinel, lambda _: True, raw=True)
        assert [m for m in newcomer.messages if m.topic == topic] == []


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        ({"model": "small", "all": True}, "either 'model' or 'all'"),
        ({"all": True, "wait": True}, "'wait' cannot be used with 'all'"),
        ({}, "either 'model' or 'all'"),
    ],
)
async def test_unload_all_refuses_mixed_targets(
    start: Callable[..., AgentProcess], host: Host, payload: dict[str, Any], words: str
) -> None:
    start()
    await host.online()
    reply = await host.ask("unload", payload)
    assert reply.status == "error" and reply.error is not None
    assert reply.error.code == "invalid_payload" and words in reply.error.message


async def test_a_catalog_reload_republishes_the_select_options(
    start: Callable[..., AgentProcess],
    host: Host,
    broker: MosquittoBroker,
    ha_prefix: str,
    tmp_path: Path,
) -> None:
    topic = discovery_topic(host, ha_prefix)
    agent = start()
    await host.online()
    async with watch(broker.port, topic) as ha:
        first = await config(ha, topic)
        assert first["components"]["active_model"]["options"] == ["other", "small"]
        path = tmp_path / "agent.yaml"
        raw = yaml.safe_load(path.read_text())
        raw["models"]["third"] = sim_model(512)
        path.write_text(yaml.safe_dump(raw))
        mark = len(ha.messages)
        agent.process.send_signal(signal.SIGHUP)
        again = await config(ha, topic, after=mark)
    assert again["components"]["active_model"]["options"] == ["other", "small", "third"]


def select_state(host: Host) -> str:
    """What the select's value_template makes of the retained state."""
    state = json.loads(host.bus.latest(host.topics.state).payload)  # type: ignore[union-attr]
    loaded = list(state["loaded_models"])
    return loaded[0] if loaded else "None"


async def test_a_model_dropped_from_the_catalog_stays_an_option_while_it_runs(
    start: Callable[..., AgentProcess],
    host: Host,
    broker: MosquittoBroker,
    ha_prefix: str,
    tmp_path: Path,
) -> None:
    """Home Assistant logs "Invalid option" on every state message whose option is not in
    the select's options: they must hold whatever the state can name."""
    topic = discovery_topic(host, ha_prefix)
    agent = start()
    await host.online()
    assert (await host.ask("load", {"model": "small", "wait": True})).status == "ok"
    async with watch(broker.port, topic) as ha:
        await config(ha, topic)
        path = tmp_path / "agent.yaml"
        raw = yaml.safe_load(path.read_text())
        del raw["models"]["small"]
        path.write_text(yaml.safe_dump(raw))
        mark = len(ha.messages)
        agent.process.send_signal(signal.SIGHUP)
        reloaded = await config(ha, topic, after=mark)
        await host.bus.wait_topic(host.topics.state, lambda v: "small" in v["loaded_models"])
        assert select_state(host) == "small"
        assert "small" in reloaded["components"]["active_model"]["options"]
        # Once it is unloaded it leaves the options too.
        mark = len(ha.messages)
        assert (await host.ask("unload", {"model": "small", "wait": True})).status == "ok"
        unloaded = await config(ha, topic, after=mark)
    assert unloaded["components"]["active_model"]["options"] == ["other"]


async def test_components_that_go_away_are_removed_once_then_omitted(
    start: Callable[..., AgentProcess],
    host: Host,
    broker: MosquittoBroker,
    ha_prefix: str,
    tmp_path: Path,
) -> None:
    topic = discovery_topic(host, ha_prefix)
    agent = start()
    await host.online()
    async with watch(broker.port, topic) as ha:
        first = await config(ha, topic)
        assert "active_model" in first["components"]
        path = tmp_path / "agent.yaml"
        raw = yaml.safe_load(path.read_text())
        raw["models"] = {}
        path.write_text(yaml.safe_dump(raw))
        mark = len(ha.messages)
        agent.process.send_signal(signal.SIGHUP)
        emptied = await config(ha, topic, after=mark)
        # Sent once with nothing but its platform: Home Assistant removes it.
        assert emptied["components"]["active_model"] == {"platform": "select"}
        mark = len(ha.messages)
        await ha.connection.publish(f"{ha_prefix}/status", "online", qos=1)
        again = await config(ha, topic, after=mark)
    assert "active_model" not in again["components"]
    assert again["components"]["gpu0_vram_used"]["platform"] == "sensor"


async def test_turned_off_the_config_is_cleared_once_not_on_every_connect(
    start: Callable[..., AgentProcess], host: Host, broker: MosquittoBroker, ha_prefix: str
) -> None:
    topic = discovery_topic(host, ha_prefix)
    status = host.topics.status

    async def seen(check: Callable[[Any], bool], after: int, on: str = status) -> None:
        await ha.wait_topic(on, check, raw=on == status, after=after, timeout=20)

    async with watch(broker.port, topic, status) as ha:
        agent = start()
        await seen(lambda v: v == "online", 0)
        assert agent.terminate() == 0
        await seen(lambda v: v == "offline", 0)
        mark = len(ha.messages)
        agent = start(enabled=False)
        await seen(lambda v: v is None, mark, on=topic)  # cleared
        await seen(lambda v: v == "online", mark)
        assert agent.terminate() == 0
        await seen(lambda v: v == "offline", mark)
        mark = len(ha.messages)
        start(enabled=False)
        # Published in order on one connection: a clear would come before "online".
        await seen(lambda v: v == "online", mark)
    assert [m for m in ha.messages[mark:] if m.topic == topic] == []
