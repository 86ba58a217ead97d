"""The shipped HTTP-only n8n workflow (docs/integrations/n8n-gateway-workflow.json): an
n8n export whose one HTTP Request node names a catalog model on a gateway route, and
that node's request, sent as n8n sends it (JSON body, the Header Auth credential's
header), against a real agent's gateway with a ``user`` key."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from agent.gateway.server import INFERENCE_ROUTES
from tests.support.agent_process import AgentProcess
from tests.support.gateway import start_gateway
from tests.support.host import Host
from tests.support.models import budget_catalog

pytestmark = pytest.mark.broker

WORKFLOW = (
    Path(__file__).resolve().parents[2] / "docs" / "integrations" / "n8n-gateway-workflow.json"
)
N8N_KEY = "n8n-key-0123456789abcdef"


def workflow() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(WORKFLOW.read_text())
    return loaded


def node(name: str) -> dict[str, Any]:
    return next(n for n in workflow()["nodes"] if n["name"] == name)


def test_the_workflow_is_an_n8n_export_asking_a_catalog_model_on_a_gateway_route() -> None:
    exported = workflow()
    assert {"name", "nodes", "connections"} <= exported.keys()
    for entry in exported["nodes"]:
        assert {"parameters", "id", "name", "type", "typeVersion", "position"} <= entry.keys()
    links = {
        source: [link["node"] for branch in outputs["main"] for link in branch]
        for source, outputs in exported["connections"].items()
    }
    assert links == {"Every morning": ["Ask the gateway"], "Ask the gateway": ["The answer"]}
    http = node("Ask the gateway")
    assert http["type"] == "n8n-nodes-base.httpRequest"
    parameters = http["parameters"]
    assert parameters["method"] == "POST"
    url = urlsplit(parameters["url"])
    assert url.port == 9470 and url.path in INFERENCE_ROUTES
    assert parameters["authentication"] == "genericCredentialType"
    assert parameters["genericAuthType"] == "httpHeaderAuth"
    assert "httpHeaderAuth" in http["credentials"]
    assert parameters["sendBody"] is True and parameters["specifyBody"] == "json"
    body = json.loads(parameters["jsonBody"])
    assert body["model"] in budget_catalog()
    # A load may take minutes: the node must not time out before the gateway does.
    assert parameters["options"]["timeout"] >= 900_000
    answer = node("The answer")["parameters"]["assignments"]["assignments"]
    assert [a["value"] for a in answer] == ["={{ $json.choices[0].message.content }}"]


def n8n_request(url: str, body: str, header_value: str) -> tuple[int, dict[str, Any]]:
    """What n8n's HTTP Request node sends with a JSON body and a Header Auth credential."""
    request = urllib.request.Request(
        url,
        data=body.encode(),
        headers={
            "Content-Type": "application/json",
            "Accept": "application/json,text/html,application/xhtml+xml,application/xml,*/*",
            "Authorization": header_value,
        },
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def test_the_http_node_gets_its_answer_from_a_model_not_loaded(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    keys = [{"name": "n8n", "role": "user", "key": N8N_KEY}]
    gateway = await start_gateway(start_host, host, budget_catalog(load_s=0.1), api_keys=keys)
    parameters = node("Ask the gateway")["parameters"]
    # The workflow names gpu1:9470; this agent's gateway listens on the test's port.
    url = f"http://127.0.0.1:{gateway.port}{urlsplit(parameters['url']).path}"
    mark = len(host.bus.messages)
    status, answer = await asyncio.to_thread(
        n8n_request, url, parameters["jsonBody"], f"Bearer {N8N_KEY}"
    )
    assert status == 200, answer
    model = json.loads(parameters["jsonBody"])["model"]
    # "The answer" node's expression, evaluated on the node's output.
    assert answer["choices"][0]["message"]["content"] == f"Simulated answer from {model}."
    (job,) = (await gateway.ended_jobs(model, after=mark)).values()
    assert job["state"] == "succeeded" and job["origin"] == "gateway"
    status, refused = await asyncio.to_thread(
        n8n_request, url, parameters["jsonBody"], "Bearer not-the-key"
    )
    assert status == 401 and refused["error"]["code"] == "invalid_api_key"
