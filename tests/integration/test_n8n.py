"""The shipped n8n workflow (docs/integrations/n8n-workflow.json) against the contract,
and n8n's MQTT behaviour (3.1.1, no properties, clean session) against a real agent."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from devtools.brokers import MosquittoBroker
from shared.commands import decode_command
from shared.messages import Reply
from shared.topics import CommandName, HostTopics, parse_topic
from tests.integration.conftest import HOST
from tests.support.agent_process import AgentProcess
from tests.support.bus import watch
from tests.support.models import budget_catalog

pytestmark = pytest.mark.broker

WORKFLOW = Path(__file__).resolve().parents[2] / "docs" / "integrations" / "n8n-workflow.json"
# The workflow is written for the default prefix and the host of the docs.
WORKFLOW_PREFIX = "modelbus"
WORKFLOW_HOST = "gpu1"
MQTT_PUBLISH = "n8n-nodes-base.mqtt"
MQTT_TRIGGER = "n8n-nodes-base.mqttTrigger"
EXPRESSION = re.compile(r"\{\{\s*(.*?)\s*\}\}")


def load_workflow() -> dict[str, Any]:
    workflow: dict[str, Any] = json.loads(WORKFLOW.read_text())
    return workflow


def nodes_of(workflow: dict[str, Any], node_type: str) -> list[dict[str, Any]]:
    return [node for node in workflow["nodes"] if node["type"] == node_type]


def node_named(workflow: dict[str, Any], name: str) -> dict[str, Any]:
    return next(node for node in workflow["nodes"] if node["name"] == name)


def upstream(workflow: dict[str, Any], name: str) -> dict[str, Any]:
    """The one node whose output feeds ``name``."""
    sources = [
        source
        for source, outputs in workflow["connections"].items()
        for branch in outputs["main"]
        for link in branch
        if link["node"] == name
    ]
    assert len(sources) == 1, f"{name} should have one input, has {sources}"
    return node_named(workflow, sources[0])


def render(template: str, values: dict[str, str]) -> str:
    """Fill an n8n expression string ("=..." with {{ expr }} parts) the way n8n would."""
    assert template.startswith("="), f"{template!r} is not an n8n expression"

    def fill(match: re.Match[str]) -> str:
        expression = match.group(1)
        assert expression in values, f"no test value for the expression {expression!r}"
        return values[expression]

    return EXPRESSION.sub(fill, template[1:])


def published_payload(workflow: dict[str, Any], publisher: str, values: dict[str, str]) -> bytes:
    """What an MQTT node sends: with sendInputData (the default) the JSON of its input
    item, here built by the Set node in raw mode before it."""
    node = node_named(workflow, publisher)
    assert node["parameters"].get("sendInputData", True) is True
    source = upstream(workflow, publisher)
    assert source["type"] == "n8n-nodes-base.set"
    assert source["parameters"]["mode"] == "raw"
    item = json.loads(render(source["parameters"]["jsonOutput"], values))
    return json.dumps(item).encode()


def placeholder_values(execution_id: str, switch_request_id: str) -> dict[str, str]:
    return {
        "$execution.id": execution_id,
        "$('Switch replies').item.json.message.request_id": switch_request_id,
    }


def command_of(topic: str) -> str:
    parsed = parse_topic(WORKFLOW_PREFIX, topic)
    assert parsed is not None, f"{topic} is not a modelbus topic"
    assert parsed.host == WORKFLOW_HOST
    return parsed.argument or ""


# ---- the workflow against the contract ------------------------------------------------------


def test_workflow_is_an_n8n_export_wired_load_use_unload() -> None:
    workflow = load_workflow()
    assert {"name", "nodes", "connections"} <= workflow.keys()
    names = [node["name"] for node in workflow["nodes"]]
    assert len(names) == len(set(names))
    for node in workflow["nodes"]:
        assert node["type"].startswith("n8n-nodes-base.")
        assert {"parameters", "id", "name", "type", "typeVersion", "position"} <= node.keys()
    for source, outputs in workflow["connections"].items():
        assert source in names
        for branch in outputs["main"]:
            for link in branch:
                assert link["node"] in names and link["type"] == "main"
    # The chain: publish switch; trigger on the reply -> check -> HTTP -> publish unload.
    trigger = nodes_of(workflow, MQTT_TRIGGER)
    assert len(trigger) == 1
    chain = ["Our request, model ready?", "Ask the model", "Unload request", "Publish unload"]
    previous = trigger[0]["name"]
    for name in chain:
        assert upstream(workflow, name)["name"] == previous
        previous = name
    assert node_named(workflow, "Ask the model")["type"] == "n8n-nodes-base.httpRequest"


def test_every_mqtt_topic_and_payload_of_the_workflow_follows_the_contract() -> None:
    workflow = load_workflow()
    topics = HostTopics(WORKFLOW_PREFIX, WORKFLOW_HOST)
    values = placeholder_values("4411", "n8n-digest-4411")
    publishers = nodes_of(workflow, MQTT_PUBLISH)
    assert {command_of(node["parameters"]["topic"]) for node in publishers} == {"switch", "unload"}
    for node in publishers:
        topic = node["parameters"]["topic"]
        command = command_of(topic)
        assert command in {c.value for c in CommandName}
        assert topic == topics.command(command)
        assert node["parameters"]["options"]["qos"] == 1
        assert node["parameters"]["options"].get("retain", False) is False
        decoded = decode_command(command, published_payload(workflow, node["name"], values))
        assert decoded.request_id is not None and decoded.request_id.startswith("n8n-digest-")
        assert getattr(decoded, "wait", False) is True
    for node in nodes_of(workflow, MQTT_TRIGGER):
        # A 3.1.1 client gets its replies on P/H/reply/<command>.
        # "topic:qos", as n8n's trigger writes the QoS of a subscription.
        topic, _, qos = node["parameters"]["topics"].partition(":")
        assert qos == "1"
        parsed = parse_topic(WORKFLOW_PREFIX, topic)
        assert parsed is not None and parsed.kind == "reply"
        assert topic == topics.reply("switch")
        assert node["parameters"]["options"]["jsonParseBody"] is True
    # The reply filter matches the request ids this workflow sends.
    condition = node_named(workflow, "Our request, model ready?")["parameters"]["conditions"]
    prefixes = [
        c["rightValue"]
        for c in condition["conditions"]
        if c["operator"]["operation"] == "startsWith"
    ]
    switch = decode_command("switch", published_payload(workflow, "Publish switch", values))
    assert switch.request_id is not None
    assert prefixes and all(switch.request_id.startswith(p) for p in prefixes)


# ---- n8n's MQTT behaviour against a real agent ----------------------------------------------


def http_post_json(url: str, body: str) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=body.encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        result: dict[str, Any] = json.loads(response.read())
        return result


@pytest.mark.parametrize("qos", [1, 0])
async def test_n8n_switch_ask_unload_over_mqtt_311(
    qos: int,
    broker: MosquittoBroker,
    prefix: str,
    start_host: Callable[..., AgentProcess],
) -> None:
    workflow = load_workflow()
    topics = HostTopics(prefix, HOST)
    start_host(budget_catalog())

    def on_test_host(topic: str) -> str:
        # The workflow names modelbus/gpu1; this agent lives under the test's prefix.
        return topics.command(command_of(topic))

    execution_id = f"77{qos}"
    switch_payload = published_payload(
        workflow, "Publish switch", placeholder_values(execution_id, "")
    )
    request_id = json.loads(switch_payload)["request_id"]
    switch_topic = on_test_host(node_named(workflow, "Publish switch")["parameters"]["topic"])
    n8n = {"protocol": "3.1.1", "persistent_session": False}
    async with (
        watch(broker.port, topics.everything_filter) as observer,
        # The MQTT Trigger: its own 3.1.1 connection, subscribed before anything is published.
        watch(broker.port, topics.reply("switch"), topics.reply("unload"), **n8n) as trigger,
        # The MQTT node: a connection of its own, no properties.
        watch(broker.port, **n8n) as publisher,
    ):
        assert publisher.connection.protocol == "3.1.1"
        await observer.wait_topic(topics.status, lambda v: v == "online", raw=True, timeout=20)
        await publisher.connection.publish(switch_topic, switch_payload, qos=qos)
        message = await trigger.wait_topic(
            topics.reply("switch"), lambda v: v["request_id"] == request_id, timeout=30
        )
        assert message.response_topic is None and message.correlation_data is None
        reply = Reply.model_validate_json(message.payload)
        assert reply.status == "ok", reply
        # wait: true -> the one reply comes when the job has ended, and says so.
        assert reply.data is not None and reply.data["job"]["state"] == "succeeded"
        assert reply.job_id is not None
        # The job topic says the same; another connection may see it a moment later
        # (MQTT orders messages per connection, not across them).
        ended = await observer.wait_topic(
            topics.job(reply.job_id), lambda v: v and v["phase"] == "done", timeout=10
        )
        job = json.loads(ended.payload)
        assert job["state"] == "succeeded" and job["request_id"] == request_id
        assert len(trigger.on(topics.reply("switch"))) == 1

        # "Ask the model": the HTTP node's URL and body, filled from the reply.
        http = node_named(workflow, "Ask the model")["parameters"]
        item = {"$json.message.data.job.result.service": reply.data["job"]["result"]["service"]}
        url = render(http["url"], item)
        assert url.endswith("/v1/chat/completions")
        answer = await asyncio.to_thread(http_post_json, url, render(http["jsonBody"], {}))
        assert answer["choices"][0]["message"]["role"] == "assistant"

        unload_payload = published_payload(
            workflow, "Publish unload", placeholder_values(execution_id, request_id)
        )
        unload_topic = on_test_host(node_named(workflow, "Publish unload")["parameters"]["topic"])
        await publisher.connection.publish(unload_topic, unload_payload, qos=qos)
        unload = await trigger.wait_topic(
            topics.reply("unload"),
            lambda v: v["request_id"] == f"{request_id}-unload",
            timeout=30,
        )
        unloaded = Reply.model_validate_json(unload.payload)
        assert unloaded.status == "ok", unloaded
        await observer.wait_topic(
            topics.model("qwen3-vl-30b"), lambda v: v and v["state"] == "stopped", timeout=20
        )
