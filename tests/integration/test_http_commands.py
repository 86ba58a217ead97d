"""The control API's commands (docs/http.md) through plain HTTP, as curl, a script or an n8n
HTTP Request node sends them: every bus command is a route with the bus's payloads, reply
envelope and error codes; long work is a 202 with the job's URL, or waited for with
?wait=true; roles as on the broker; another host is a 404; and the events stream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from tests.support.agent_process import AgentProcess
from tests.support.gateway import eventually, gateway_settings
from tests.support.host import Host
from tests.support.models import sim_model

pytestmark = pytest.mark.broker

VIEWER = {"Authorization": "Bearer viewer-key-0123456789"}
OPERATOR = {"X-API-Key": "operator-key-0123456789"}
USER = {"Authorization": "Bearer user-key-0123456789"}
KEYS = [
    {"name": "grafana", "role": "viewer", "key": "viewer-key-0123456789"},
    {"name": "app", "role": "user", "key": "user-key-0123456789"},
    {"name": "n8n", "role": "operator", "key": "operator-key-0123456789"},
]


async def call(
    method: str,
    url: str,
    headers: dict[str, str] | None = None,
    body: Any = None,
) -> tuple[int, Any, Any]:
    """Status, JSON body and headers of one request; ``body`` a dict is sent as JSON,
    bytes or text as they are."""
    data = json.dumps(body) if isinstance(body, dict) else body
    async with (
        aiohttp.ClientSession() as web,
        web.request(method, url, headers=headers, data=data) as answer,
    ):
        return answer.status, await answer.json(content_type=None), answer.headers


def jobs_on_bus(host: Host, after: int) -> list[dict[str, Any]]:
    return [
        json.loads(m.payload)
        for m in host.bus.messages[after:]
        if m.topic.startswith(host.topics.job("")) and m.payload
    ]


async def test_commands_answer_as_the_bus_does_with_http_statuses(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    port, settings = gateway_settings(api_keys=KEYS)
    models = {"alpha": sim_model(20000, load_s=0.3), "beta": sim_model(16000)}
    start_host(models, http=settings)
    await host.online()
    api = f"http://127.0.0.1:{port}/api/v1"

    # A switch without wait: 202, the job's URL, and the job runs.
    status, reply, headers = await call("POST", f"{api}/switch", OPERATOR, {"model": "alpha"})
    assert status == 202, reply
    assert reply["command"] == "switch" and reply["status"] == "ok"
    assert reply["data"]["state"] in ("queued", "running") and reply["data"]["joined"] is False
    job_url = f"/api/v1/jobs/{reply['job_id']}"
    assert reply["job_url"] == job_url and headers["Location"] == job_url

    async def job_state() -> str:
        return (await call("GET", f"http://127.0.0.1:{port}{job_url}", VIEWER))[1]["state"]

    await eventually(job_state, lambda state: state == "succeeded")

    # Bare text as on the bus, waited for: 200 once the job has ended, the job in data.
    status, reply, _ = await call("POST", f"{api}/switch?wait=true", OPERATOR, "beta")
    assert status == 200, reply
    assert reply["data"]["job"]["state"] == "succeeded"
    assert reply["data"]["job"]["model"] == "beta" and reply["job_url"].endswith(reply["job_id"])
    status, models_now, _ = await call("GET", f"{api}/models", VIEWER)
    assert {m["name"]: m["state"] for m in models_now} == {"alpha": "stopped", "beta": "ready"}

    # plan changes nothing and answers what a switch would do.
    status, plan, _ = await call("POST", f"{api}/plan", OPERATOR, {"model": "alpha"})
    assert status == 200 and plan["data"]["fits"] is True and plan["data"]["evict"] == ["beta"]
    # status: a viewer may ask (it reads), by POST as by GET; with its request id.
    status, reply, _ = await call("POST", f"{api}/status", VIEWER, {"request_id": "mine-1"})
    assert status == 200 and reply["request_id"] == "mine-1"
    assert reply["data"]["info"]["host_id"] == "lab"
    # The history (SQLite), newest first.
    status, history, _ = await call("GET", f"{api}/history?limit=2", VIEWER)
    assert status == 200 and [job["model"] for job in history] == ["beta", "alpha"]
    status, weights, _ = await call("GET", f"{api}/weights", VIEWER)
    assert status == 200 and "weights_dir" in weights

    # Errors: the bus's code in the envelope, the status from the one table.
    mark = len(host.bus.messages)
    refusals = [
        ("POST", f"{api}/load", {"model": "nope"}, 404, "unknown_model"),
        ("POST", f"{api}/load", "{not json", 400, "invalid_payload"),
        ("POST", f"{api}/load", {"model": "alpha", "gpu": "0"}, 400, "invalid_payload"),
        ("POST", f"{api}/unload?wait=true", {"all": True}, 400, "invalid_payload"),
        ("POST", f"{api}/cancel", {"job_id": "0123456789abcdef"}, 404, "not_found"),
        ("POST", f"{api}/load", "x" * 20000, 413, "payload_too_large"),
        ("POST", f"{api}/install", {"repo": "../../etc"}, 400, "invalid_payload"),
    ]
    for method, url, body, expected, code in refusals:
        status, reply, _ = await call(method, url, OPERATOR, body)
        assert (status, reply["status"], reply["error"]["code"]) == (expected, "error", code), (
            url,
            body,
            reply,
        )
        assert reply["error"]["message"]
    status, reply, _ = await call("POST", f"{api}/load?wait=maybe", OPERATOR, "alpha")
    assert status == 400 and reply["error"]["code"] == "invalid_request"
    status, reply, _ = await call("POST", f"{api}/nope", OPERATOR, {})
    assert status == 404
    for limit in ("0", "1001", "²", "9" * 5000):
        status, reply, _ = await call("GET", f"{api}/history?limit={limit}", VIEWER)
        assert status == 400 and reply["error"]["param"] == "limit", limit

    async def chunks() -> Any:  # a chunked body: no Content-Length to refuse it by
        for _ in range(64):
            yield b"x" * 1024

    status, reply, _ = await call("POST", f"{api}/load", OPERATOR, chunks())
    assert status == 413 and reply["error"]["code"] == "payload_too_large"
    assert jobs_on_bus(host, mark) == []


async def test_roles_and_hosts_gate_every_command(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    port, settings = gateway_settings(api_keys=KEYS)
    start_host({"alpha": sim_model(4096), "slow": sim_model(4096, load_s=1.5)}, http=settings)
    await host.online()
    root = f"http://127.0.0.1:{port}"
    mark = len(host.bus.messages)
    commands = ["load", "unload", "switch", "plan", "install", "uninstall", "cancel"]
    for command in commands:
        for headers, expected, code in (
            (None, 401, "invalid_api_key"),
            ({"Authorization": "Bearer wrong-key-0123456789"}, 401, "invalid_api_key"),
            (VIEWER, 403, "insufficient_role"),
            (USER, 403, "insufficient_role"),
        ):
            status, reply, _ = await call("POST", f"{root}/api/v1/{command}", headers, "alpha")
            assert (status, reply["error"]["code"]) == (expected, code), (command, headers)
    # Another host's routes are not this agent's.
    for method, path in (("POST", "switch"), ("GET", "status"), ("GET", "models")):
        status, reply, _ = await call(method, f"{root}/api/v1/hosts/gpu9/{path}", OPERATOR, "alpha")
        assert status == 404 and "gpu9" in reply["error"]["message"]
    await asyncio.sleep(0.5)  # a job queued by any of those would be on the bus by now
    assert jobs_on_bus(host, mark) == []
    # A caller that hangs up while it waits leaves the job to run; the agent goes on.
    mark = len(host.bus.messages)
    with pytest.raises(TimeoutError):
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as web,
            web.post(f"{root}/api/v1/load?wait=true", headers=OPERATOR, data="slow"),
        ):
            pass
    await host.bus.wait_topic(
        host.topics.model("slow"), lambda v: v and v["state"] == "ready", after=mark, timeout=20
    )
    status, reply, _ = await call("POST", f"{root}/api/v1/unload?wait=true", OPERATOR, "slow")
    assert status == 200 and reply["data"]["job"]["state"] == "succeeded"
    # Its own host id is the same API.
    status, reply, _ = await call(
        "POST", f"{root}/api/v1/hosts/lab/load?wait=true", OPERATOR, {"model": "alpha"}
    )
    assert status == 200 and reply["data"]["job"]["state"] == "succeeded"
    status, reply, _ = await call("GET", f"{root}/api/v1/hosts/lab/models/alpha", VIEWER)
    assert status == 200 and reply["state"] == "ready"


async def read_events(response: aiohttp.ClientResponse) -> Any:
    """Yield (event, data) of a server-sent events stream."""
    event, data = "message", []
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("data: "):
            data.append(line[len("data: ") :])


async def test_events_stream_the_snapshot_then_what_the_agent_publishes(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    port, settings = gateway_settings(api_keys=KEYS)
    start_host({"alpha": sim_model(4096, load_s=0.2)}, http=settings)
    await host.online()
    root = f"http://127.0.0.1:{port}/api/v1"
    async with aiohttp.ClientSession() as web:
        async with web.get(f"{root}/events?topics=nope", headers=VIEWER) as refused:
            assert refused.status == 400
        async with web.get(f"{root}/events", headers=USER) as everything:
            assert everything.status == 200
            assert everything.headers["Content-Type"] == "text/event-stream"
            stream = read_events(everything)
            event, snapshot = await anext(stream)
            assert event == "snapshot" and snapshot["info"]["host_id"] == "lab"
            # Telemetry flows without any command (one GPU sample a second).
            event, gpu = await asyncio.wait_for(anext(stream), 10)
            assert event in ("gpu/0", "state") and gpu
        async with web.get(f"{root}/events?topics=models,jobs", headers=VIEWER) as narrowed:
            stream = read_events(narrowed)
            assert (await anext(stream))[0] == "snapshot"
            status, _, _ = await call("POST", f"{root}/load", OPERATOR, "alpha")
            assert status == 202
            seen: list[tuple[str, Any]] = []

            def succeeded(event: str, data: Any) -> bool:
                return event.startswith("jobs/") and data["state"] == "succeeded"

            async with asyncio.timeout(20):
                async for event, data in stream:
                    seen.append((event, data))
                    if succeeded(event, data):
                        break
            assert {event.split("/")[0] for event, _ in seen} == {"models", "jobs"}
            assert ("models/alpha", "ready") in [(e, d.get("state")) for e, d in seen]


async def test_every_documented_route_refuses_a_key_below_its_role(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    """The OpenAPI document's roles, held to what the server does: each route with a role
    refuses no key (401) and, above viewer, a viewer's key (403); nothing runs."""
    port, settings = gateway_settings(api_keys=KEYS)
    start_host({"alpha": sim_model(4096)}, http=settings)
    await host.online()
    root = f"http://127.0.0.1:{port}"
    status, spec, _ = await call("GET", f"{root}/openapi.json", VIEWER)
    assert status == 200 and spec["openapi"] == "3.1.0"
    assert (await call("GET", f"{root}/openapi.json"))[0] == 401
    mark = len(host.bus.messages)
    checked = 0
    for path, operations in spec["paths"].items():
        concrete = path.replace("{host}", "lab")
        for name in ("model", "name", "job_id", "path"):
            concrete = concrete.replace("{" + name + "}", "alpha")
        for method, operation in operations.items():
            role = operation["x-modelbus-role"]
            if role == "none":
                continue
            refusals = [(None, 401)] + ([(VIEWER, 403)] if role != "viewer" else [])
            for headers, expected in refusals:
                status, body, _ = await call(method.upper(), root + concrete, headers, "alpha")
                assert status == expected, (method, path, headers, body)
                checked += 1
    assert checked > 100
    await asyncio.sleep(0.5)
    assert jobs_on_bus(host, mark) == []
    async with aiohttp.ClientSession() as web, web.get(f"{root}/docs", headers=VIEWER) as page:
        assert page.status == 200 and "/api/v1/switch" in await page.text()
