"""The original orchestrators' routes (../shared/HTTP-COMPAT.md), each called with the request
shapes their documents gave and with a bad input, against one agent: the model
orchestrator's n8n pattern run by Node's fetch, the smart-switching router, the dynamic
orchestrator (its /chat/completions through the openai SDK), the model manager with a hub
speaking Hugging Face's endpoints, and http.compat_open_read."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.support.agent_process import AgentProcess
from tests.support.fake_hub import FakeHub, safetensors_bytes
from tests.support.gateway import CHAT, eventually, gateway_settings
from tests.support.host import Host
from tests.support.models import sim_model

pytestmark = pytest.mark.broker

OPERATOR_KEY = "operator-key-0123456789"
OPERATOR = {"Authorization": f"Bearer {OPERATOR_KEY}"}
VIEWER = {"Authorization": "Bearer viewer-key-0123456789"}
USER_KEY = "user-key-0123456789"
USER = {"Authorization": f"Bearer {USER_KEY}"}
KEYS = [
    {"name": "grafana", "role": "viewer", "key": "viewer-key-0123456789"},
    {"name": "app", "role": "user", "key": USER_KEY},
    {"name": "n8n", "role": "operator", "key": OPERATOR_KEY},
]
REPO = "acme/tiny-lm"

# The first orchestrator's n8n pattern, as a Code node writes it: read the free VRAM,
# load, call the model's own server, unload.
N8N_SCRIPT = """
const base = process.env.BASE;
const headers = {"Authorization": `Bearer ${process.env.KEY}`, "Content-Type": "application/json"};
const status = await (await fetch(`${base}/models/status`, {headers})).json();
if (!(status.free_mb > 8192)) throw new Error(`only ${status.free_mb} MB free`);
const loaded = await (await fetch(`${base}/models/load`, {
  method: "POST", headers,
  body: JSON.stringify({model: "alpha", service: "llama-cpp", priority: 10}),
})).json();
if (loaded.status !== "loaded") throw new Error(JSON.stringify(loaded));
const chat = await (await fetch(`${loaded.service}/v1/chat/completions`, {
  method: "POST", headers: {"Content-Type": "application/json"},
  body: JSON.stringify({model: "alpha", messages: [{role: "user", content: "hi"}]}),
})).json();
const after = await (await fetch(`${base}/models/status`, {headers})).json();
const unloaded = await (await fetch(`${base}/models/unload`, {
  method: "POST", headers, body: JSON.stringify({model: "alpha", force: false}),
})).json();
console.log(JSON.stringify({free_mb: status.free_mb, loaded, chat, after, unloaded}));
"""


async def call(
    method: str, url: str, headers: dict[str, str] | None = None, body: Any = None
) -> tuple[int, Any]:
    data = json.dumps(body) if isinstance(body, dict) else body
    async with (
        aiohttp.ClientSession() as web,
        web.request(method, url, headers=headers, data=data) as answer,
    ):
        return answer.status, await answer.json(content_type=None)


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as server:
        tensors = {"model.embed": ("BF16", (256, 256))}
        server.add_repo(
            REPO, {"config.json": "{}", "model.safetensors": safetensors_bytes(tensors)}
        )
        yield server


@pytest.fixture
def agent(
    start_host: Callable[..., AgentProcess], host: Host, hub: FakeHub, tmp_path: Path
) -> Iterator[str]:
    port, settings = gateway_settings(api_keys=KEYS, compat_open_read=True)
    models = {
        "alpha": sim_model(12000, load_s=0.1, description="a chat model"),
        "beta": sim_model(24000, load_s=0.1, aliases=["the-big-one"]),
        "giant": sim_model(40000),
    }
    weights = {"dir": str(tmp_path / "weights"), "endpoint": hub.endpoint}
    start_host(models, http=settings, extra={"weights": weights})
    yield f"http://127.0.0.1:{port}"


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
async def test_the_first_orchestrators_n8n_pattern_runs_unchanged_with_nodes_fetch(
    agent: str, host: Host
) -> None:
    await host.online()
    environment = {**os.environ, "BASE": agent, "KEY": OPERATOR_KEY}
    ran = await asyncio.to_thread(
        subprocess.run,
        ["node", "--input-type=module", "-e", N8N_SCRIPT],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    seen = json.loads(ran.stdout)
    assert seen["free_mb"] == 32768
    loaded = seen["loaded"]
    assert loaded["model"] == "alpha" and loaded["status"] == "loaded"
    assert loaded["service"].startswith("http://127.0.0.1:") and loaded["loaded_at"]
    assert seen["chat"]["choices"][0]["message"]["content"]
    assert "alpha" in seen["after"]["loaded_models"] and seen["after"]["free_mb"] < 32768
    unloaded = seen["unloaded"]
    assert unloaded["status"] == "unload_requested" and unloaded["model"] == "alpha"
    assert unloaded["service"] == loaded["service"] and "MiB freed" in unloaded["note"]

    # Its bad inputs: no model, a model not in the catalog, a body that is not JSON.
    for body, status, code in (
        ({"service": "llama-cpp"}, 400, "invalid_request"),
        ({"model": "nope"}, 404, "unknown_model"),
        ({"model": "alpha", "priority": "high"}, 400, "invalid_payload"),
        ("{model", 400, "invalid_request"),
    ):
        answer = await call("POST", f"{agent}/models/load", OPERATOR, body)
        assert answer[0] == status and answer[1]["error"]["code"] == code, (body, answer)
        assert answer[1]["detail"] == answer[1]["error"]["message"]
    status, refused = await call("POST", f"{agent}/models/unload", OPERATOR, {"model": "ghost"})
    assert status == 404 and "ghost" in refused["detail"]


async def test_the_smart_switching_routers_status_and_switch(agent: str, host: Host) -> None:
    await host.online()
    status, described = await call("GET", f"{agent}/v1/models/status", VIEWER)
    assert status == 200 and set(described) == {"models", "gpu"}
    assert described["gpu"] == {"total_gb": 32.0, "used_gb": 0.0, "available_gb": 32.0}
    alpha = described["models"]["alpha"]
    assert alpha["status"] == "stopped" and alpha["size_gb"] == pytest.approx(11.72)
    assert alpha["description"] == "a chat model" and "gpu_memory_used_gb" not in alpha

    switch = f"{agent}/v1/models/switch?target_model="
    status, missing = await call("POST", f"{switch}nope", OPERATOR)
    assert status == 404 and "alpha" in missing["detail"]  # the available models, listed
    status, refused = await call("POST", f"{switch}giant", OPERATOR)
    assert status == 409 and refused["status"] == "error"
    assert refused["error"] == "insufficient_memory" and refused["required_gb"] > 32
    assert set(refused) >= {"message", "available_gb", "freed_gb", "total_available_gb"}
    assert (await call("POST", f"{agent}/v1/models/switch", OPERATOR))[0] == 400
    assert (await call("POST", f"{switch}alpha", VIEWER))[0] == 403

    status, switched = await call("POST", f"{switch}alpha", OPERATOR)
    assert status == 200 and switched["status"] == "success", switched
    assert switched["model"] == "alpha" and switched["unloaded_models"] == []
    assert switched["start_result"]["state"] == "succeeded"
    assert switched["memory_info"]["available_before_gb"] == 32.0
    status, again = await call("POST", f"{switch}alpha", OPERATOR)
    assert status == 200 and again["status"] == "already_loaded" and again["model"] == "alpha"
    status, switched = await call("POST", f"{switch}the-big-one", OPERATOR)  # an alias
    assert switched["status"] == "success" and switched["unloaded_models"] == ["alpha"]
    status, described = await call("GET", f"{agent}/v1/models/status", VIEWER)
    beta = described["models"]["beta"]
    assert beta["status"] == "running" and beta["gpu_memory_used_gb"] and beta["health"]
    # /v1/models/{id} still describes models by name; the static routes won.
    status, model = await call("GET", f"{agent}/v1/models/beta", VIEWER)
    assert status == 200 and model["id"] == "beta"


async def test_the_dynamic_orchestrators_gateway_ensure_model_and_status(
    agent: str, host: Host
) -> None:
    await host.online()
    app = openai.OpenAI(base_url=agent, api_key=USER_KEY, max_retries=0)  # no /v1
    answer = await asyncio.to_thread(app.chat.completions.create, model="alpha", messages=CHAT)
    assert answer.choices[0].message.content
    status, current = await call("GET", f"{agent}/status", VIEWER)
    assert status == 200 and current["current_model"] == "alpha" and current["state"] == "ready"
    assert current["models"]["beta"] == "stopped" and current["metrics"]["swaps_total"] >= 1
    status, ensured = await call("POST", f"{agent}/ensure_model", USER, {"model": "beta"})
    assert status == 200 and ensured["status"] == "ready" and ensured["evicted"] == ["alpha"]
    status, current = await call("GET", f"{agent}/status", VIEWER)
    assert current["current_model"] == "beta" and current["loaded_models"] == ["beta"]
    status, refused = await call("POST", f"{agent}/ensure_model", USER, {"model": "giant"})
    assert status == 409 and refused["error"]["code"] == "insufficient_vram"
    status, refused = await call("POST", f"{agent}/ensure_model", VIEWER, {"model": "alpha"})
    assert status == 403
    status, refused = await call("POST", f"{agent}/chat/completions", USER, {"messages": CHAT})
    assert status == 400 and refused["error"]["param"] == "model"
    status, refused = await call("POST", f"{agent}/ensure_model", USER, {"model": 7})
    assert status == 400


async def test_the_model_managers_weights_jobs_and_history(agent: str, host: Host) -> None:
    await host.online()
    status, accepted = await call(
        "POST", f"{agent}/weights/install", OPERATOR, {"hfModelId": REPO, "token": "hf_x"}
    )
    assert status == 202 and accepted["status"] in ("queued", "running"), accepted
    assert "token" in accepted["note"]
    status_url = f"{agent}{accepted['status_url']}"

    async def job() -> Any:
        return (await call("GET", status_url, VIEWER))[1]

    done = await eventually(job, lambda state: state["state"] in ("succeeded", "failed"))
    assert done["state"] == "succeeded", done
    name = done["result"]["name"]
    status, weights = await call("GET", f"{agent}/weights", VIEWER)
    assert status == 200 and [w["repo"] for w in weights["weights"]] == [REPO]
    status, info = await call("GET", f"{agent}/weights/{name}/info", VIEWER)
    assert status == 200 and info["repo"] == REPO and info["size_mb"] >= 0
    status, usage = await call("GET", f"{agent}/weights/usage", VIEWER)
    assert status == 200 and name in usage["weights"] and usage["disk_free_mb"] > 0
    status, jobs = await call("GET", f"{agent}/jobs", VIEWER)
    assert status == 200 and done["job_id"] in [j["job_id"] for j in jobs]
    status, one = await call("GET", f"{agent}/jobs/{done['job_id']}", VIEWER)
    assert status == 200 and one["command"] == "install"
    status, history = await call("GET", f"{agent}/history", VIEWER)
    assert status == 200 and history[0]["job_id"] == done["job_id"]
    status, system = await call("GET", f"{agent}/system/info", VIEWER)
    assert status == 200 and system["host"]["host_id"] == "lab" and len(system["gpus"]) == 1
    assert system["disk"]["weights_dir"]

    # Bad inputs, and a viewer's delete: refused, nothing removed.
    for body in ({}, {"hfModelId": "../../etc"}, {"hfModelId": REPO, "files": "*.bin"}):
        status, refused = await call("POST", f"{agent}/weights/install", OPERATOR, body)
        assert status == 400 and refused["error"]["message"], body
    status, _ = await call("DELETE", f"{agent}/weights/{name}", VIEWER)
    assert status == 403
    for path, code in (("/weights/nope/info", 404), ("/weights/install/status/nope", 404)):
        assert (await call("GET", f"{agent}{path}", VIEWER))[0] == code
    assert (await call("GET", f"{agent}/jobs/nope", VIEWER))[0] == 404
    status, spec = await call("GET", f"{agent}/openapi", VIEWER)
    assert status == 200 and "/weights/install" in spec["paths"]
    status, missing = await call("DELETE", f"{agent}/weights/nope", OPERATOR)
    assert status == 404 and missing["error"]["code"] == "not_found"
    status, deleted = await call("DELETE", f"{agent}/weights/{name}", OPERATOR)
    assert status == 200 and deleted["status"] == "deleted" and deleted["name"] == name
    status, weights = await call("GET", f"{agent}/weights", VIEWER)
    assert weights["weights"] == []


async def test_compat_open_read_opens_the_original_reads_to_this_machine_only(
    agent: str, host: Host
) -> None:
    await host.online()
    for path in ("/models/status", "/v1/models/status", "/status", "/weights", "/jobs"):
        status, _ = await call("GET", f"{agent}{path}")
        assert status == 200, path
    # Not the native API, not a mutating route, not the gateway.
    for method, path in (
        ("GET", "/api/v1/status"),
        ("POST", "/models/load"),
        ("POST", "/v1/models/switch?target_model=alpha"),
        ("GET", "/v1/models"),
    ):
        status, refused = await call(method, f"{agent}{path}", body={"model": "alpha"})
        assert status == 401 and refused["error"]["code"] == "invalid_api_key", path
