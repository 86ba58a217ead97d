"""The control API's read side (docs/http.md) through plain HTTP, as a script or an n8n HTTP
Request node calls it: the status reply, models, GPUs and jobs as the bus tells them, a job
from the history once the bus has let it go, the first orchestrator's /models/status, keys."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import openai
import pytest

from tests.support.agent_process import AgentProcess
from tests.support.gateway import CHAT, Gateway, gateway_settings
from tests.support.host import Host
from tests.support.models import sim_model

pytestmark = pytest.mark.broker

VIEWER = {"Authorization": "Bearer viewer-key-0123456789"}


async def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as web, web.get(url, headers=headers) as answer:
        return answer.status, await answer.json()


async def test_status_models_gpus_and_jobs_read_as_the_bus_tells_them(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    keys = [
        {"name": "grafana", "role": "viewer", "key": "viewer-key-0123456789"},
        {"name": "app", "role": "user", "key": "user-key-0123456789"},
    ]
    port, settings = gateway_settings(api_keys=keys)
    models = {"alpha": sim_model(4096, load_s=0.1), "beta": sim_model(2048)}
    start_host(models, http=settings, lifecycle={"job_retention_s": 1})
    await host.online()
    gateway = Gateway(host, port)
    mark = len(host.bus.messages)
    app = openai.OpenAI(base_url=gateway.base_url, api_key="user-key-0123456789", max_retries=0)
    answer = await asyncio.to_thread(app.chat.completions.create, model="alpha", messages=CHAT)
    assert answer.choices
    (job,) = (await gateway.ended_jobs("alpha", after=mark)).values()
    root = f"http://127.0.0.1:{port}"

    status, reply = await get(f"{root}/api/v1/status", VIEWER)
    assert status == 200 and reply["command"] == "status" and reply["status"] == "ok"
    assert reply["data"]["info"]["host_id"] == "lab"
    assert {m["name"]: m["state"] for m in reply["data"]["models"]} == {
        "alpha": "ready",
        "beta": "stopped",
    }
    status, listed = await get(f"{root}/api/v1/models", VIEWER)
    assert status == 200 and [m["name"] for m in listed] == ["alpha", "beta"]
    status, alpha = await get(f"{root}/api/v1/models/alpha", VIEWER)
    assert status == 200 and alpha["state"] == "ready" and alpha["requests_total"] >= 1
    status, missing = await get(f"{root}/api/v1/models/nope", VIEWER)
    assert status == 404 and missing["error"]["code"] == "model_not_found"
    status, gpus = await get(f"{root}/api/v1/gpus", VIEWER)
    assert status == 200 and [g["index"] for g in gpus] == [0]
    assert gpus[0]["memory_total_mb"] == 32768
    status, jobs = await get(f"{root}/api/v1/jobs", VIEWER)
    assert status == 200 and job["job_id"] in [j["job_id"] for j in jobs]
    status, by_id = await get(f"{root}/api/v1/jobs/{job['job_id']}", VIEWER)
    assert status == 200 and by_id["state"] == "succeeded" and by_id["origin"] == "gateway"
    # Past job_retention_s the bus clears the job; the history (SQLite) still has it.
    await host.bus.wait_topic(
        host.topics.job(job["job_id"]), lambda v: v == "", raw=True, after=mark, timeout=20
    )
    status, remembered = await get(f"{root}/api/v1/jobs/{job['job_id']}", VIEWER)
    assert status == 200 and remembered["state"] == "succeeded"
    status, unknown = await get(f"{root}/api/v1/jobs/no-such-job", VIEWER)
    assert status == 404 and unknown["error"]["code"] == "not_found"
    status, hostile = await get(
        f"{root}/api/v1/jobs/%27%3B%20DROP%20TABLE%20jobs{'x' * 4000}", VIEWER
    )
    assert status == 404 and len(hostile["error"]["message"]) < 200
    status, still = await get(f"{root}/api/v1/jobs/{job['job_id']}", VIEWER)
    assert status == 200 and still["job_id"] == job["job_id"]

    # The first orchestrator's status, in the shape its n8n code reads (free_mb first).
    status, legacy = await get(f"{root}/models/status", VIEWER)
    assert status == 200
    assert legacy["total_mb"] == 32768 and legacy["free_mb"] == 32768 - legacy["used_mb"]
    assert legacy["used_mb"] >= 4096
    assert legacy["loaded_models"]["alpha"]["model"] == "alpha"
    assert set(legacy) == {"total_mb", "used_mb", "free_mb", "utilization_percent", "loaded_models"}

    # Keys: none is 401 and changes nothing; liveness needs none.
    for path in ("/api/v1/status", "/api/v1/jobs", "/models/status"):
        status, refused = await get(f"{root}{path}")
        assert status == 401 and refused["error"]["code"] == "invalid_api_key"
    for path in ("/health", "/healthz"):
        assert await get(f"{root}{path}") == (200, {"status": "ok"})
