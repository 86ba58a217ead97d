"""The catalog over the bus (issue 18, point 2): `catalog add` of a preset serving installed
weights, then `switch`, with no file edit; persisted across a restart; `remove`; the
configuration's models read-only; what only an admin may add (the admin topic, an admin
key), and the client's `modelbus catalog` and `install --add`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.weights import WeightsDir, manifest_for
from tests.support.agent_process import REPO_ROOT, AgentProcess
from tests.support.fake_hub import FakeHub
from tests.support.gateway import gateway_settings
from tests.support.host import Host
from tests.support.llama import llama_server_binary, tiny_models
from tests.support.models import sim_model

pytestmark = pytest.mark.broker


def install(state: Path, name: str, gguf: Path | None = None) -> None:
    """Weights as a finished install leaves them (their files, then their manifest)."""
    weights = WeightsDir(state / "weights")
    weights.ensure()
    folder = weights.path_for(name)
    folder.mkdir()
    if gguf is not None:
        shutil.copy(gguf, folder / gguf.name)
    else:
        (folder / "config.json").write_text("{}")
    weights.commit(
        manifest_for(
            name,
            f"org/{name}",
            "0" * 40,
            requested_revision=None,
            include=None,
            exclude=None,
            path=folder,
            files=1,
            vram_estimate_mb=1500,
        )
    )


def simserver_command() -> list[str]:
    """What an admin's openai entry runs: the simulated server."""
    return [sys.executable, "-m", "devtools.simserver", "--port", "${PORT}", "--model", "${MODEL}",
            "--gpus", "${GPUS}", "--vram-mb", "3000"]  # fmt: skip


async def catalog(host: Host, body: dict[str, Any], *, admin: bool = False) -> Any:
    if not admin:
        return await host.ask("catalog", body)
    return await host.ask_on(host.topics.admin_command("catalog"), "catalog", body)


async def test_an_operator_adds_a_llama_cpp_entry_and_switches_to_it_with_no_file_edit(
    start_host: Callable[..., AgentProcess], host: Host, tmp_path: Path
) -> None:
    binary = llama_server_binary()
    small, _ = tiny_models(tmp_path / "gguf")
    state = tmp_path / "state"
    install(state, "tiny-2l", small)
    holder = [sys.executable, "-m", "tests.support.vram_holder", "--", str(binary)]
    presets = {
        "llama-cpp": {
            "command": holder,
            "args": ["-c", "512", "--threads", "1", "--no-webui"],
            "env": {"PYTHONPATH": str(REPO_ROOT), "MODELBUS_HOLD_MB": "1000"},
        }
    }
    start_host({"fixed": sim_model(2000)}, extra={"presets": presets})
    await host.online()

    # Only the weights' name: the entry their install suggested.
    reply = await catalog(host, {"action": "add", "weights": "tiny-2l"})
    assert reply.status == "ok", reply.error
    assert reply.data is not None and reply.data["changes"] == ["added tiny-2l"]
    entry = reply.data["entry"]
    assert entry["source"] == "bus" and entry["spec"]["preset"] == "llama-cpp"
    assert entry["entry"]["vram_mb"] == 1500 and entry["entry"]["port"] == entry["spec"]["port"]
    await host.bus.wait_topic(host.topics.model("tiny-2l"), lambda v: v and v["state"] == "stopped")

    switched = await host.ask("switch", {"model": "tiny-2l", "wait": True}, timeout=60)
    assert switched.status == "ok", switched.error
    assert host.model("tiny-2l")["state"] == "ready"
    shown = await catalog(host, {"action": "show"})
    assert shown.data is not None
    assert {m["name"]: m["source"] for m in shown.data["models"]} == {
        "fixed": "config",
        "tiny-2l": "bus",
    }
    assert json.loads((state / "catalog.json").read_text())["models"]["tiny-2l"]["weights"] == (
        "tiny-2l"
    )


async def test_what_only_an_admin_may_add(
    start_host: Callable[..., AgentProcess], host: Host, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    install(state, "qwen")
    start_host({"fixed": sim_model(2000)})
    await host.online()
    refusals = {
        "a command line": {"preset": "openai", "command": simserver_command(), "vram_mb": 3000},
        "extra arguments": {"preset": "vllm", "weights": "qwen", "vram_mb": 1, "args": ["-x"]},
        "an image": {"preset": "vllm", "weights": "qwen", "vram_mb": 1, "image": "evil:1"},
        "a path": {"preset": "vllm", "model_path": "/etc", "vram_mb": 1},
        "weights not installed": {"preset": "vllm", "weights": "absent", "vram_mb": 1},
        "a process block": {"process": {"argv": ["sh"]}, "port": 9999, "vram_mb": 1},
    }
    for what, entry in refusals.items():
        reply = await catalog(host, {"action": "add", "name": "evil", "entry": entry})
        assert reply.status == "error" and reply.error is not None, what
        assert reply.error.code == "forbidden", (what, reply.error)
    assert "evil" not in [m["name"] for m in (await catalog(host, {})).data["models"]]
    # The configuration file's models are the file's.
    readonly = {"action": "add", "name": "fixed", "entry": refusals["weights not installed"]}
    for body in ({"action": "remove", "name": "fixed"}, readonly):
        reply = await catalog(host, body)
        assert reply.error is not None and reply.error.code == "forbidden"

    # On the admin topic the command line is taken, and the model runs.
    entry = {"preset": "openai", "command": simserver_command(), "vram_mb": 3000}
    reply = await catalog(host, {"action": "add", "name": "sim", "entry": entry}, admin=True)
    assert reply.status == "ok", reply.error
    switched = await host.ask("switch", {"model": "sim", "wait": True})
    assert switched.status == "ok", switched.error
    # Removed while it runs: it stays until unloaded (as a reload leaves it).
    reply = await catalog(host, {"action": "remove", "name": "sim"})
    assert reply.status == "ok" and "still running" in reply.data["changes"][0]
    await host.ask("unload", {"model": "sim", "wait": True})
    await host.bus.wait_topic(host.topics.model("sim"), lambda v: v is None)
    reply = await catalog(host, {"action": "remove", "name": "sim"})
    assert reply.error is not None and reply.error.code == "not_found"


async def test_entries_added_over_the_bus_survive_a_restart(
    start_host: Callable[..., AgentProcess], host: Host, tmp_path: Path
) -> None:
    install(tmp_path / "state", "qwen")
    models = {"fixed": sim_model(2000)}
    agent = start_host(models)
    await host.online()
    entry = {"preset": "vllm", "weights": "qwen", "vram_mb": 9000, "gpus": [0]}
    assert (await catalog(host, {"action": "add", "name": "q", "entry": entry})).status == "ok"
    port = (await catalog(host, {})).data["models"][1]["spec"]["port"]
    mark = len(host.bus.messages)
    assert agent.terminate() == 0
    start_host(models)
    await host.bus.wait_topic(host.topics.status, lambda v: v == "online", after=mark, raw=True)
    shown = (await catalog(host, {})).data["models"]
    assert [(m["name"], m["source"], m["spec"]["port"]) for m in shown] == [
        ("fixed", "config", models["fixed"]["port"]),
        ("q", "bus", port),
    ]
    spec = shown[1]["spec"]
    assert spec["process"]["argv"][:2] == ["vllm", "serve"] and spec["sleep"] == "vllm"


async def test_http_operator_and_admin_keys(
    start_host: Callable[..., AgentProcess], host: Host, tmp_path: Path
) -> None:
    install(tmp_path / "state", "qwen")
    keys = [
        {"name": "n8n", "role": "operator", "key": "operator-key-0123456789"},
        {"name": "root", "role": "admin", "key": "admin-key-0123456789"},
    ]
    port, settings = gateway_settings(api_keys=keys)
    start_host({"fixed": sim_model(2000)}, http=settings)
    await host.online()
    url = f"http://127.0.0.1:{port}/api/v1/catalog"
    body = {"action": "add", "name": "sim", "entry": {
        "preset": "openai", "command": simserver_command(), "vram_mb": 3000}}  # fmt: skip
    async with aiohttp.ClientSession() as web:
        async with web.post(url, json=body, headers={"X-API-Key": keys[0]["key"]}) as answer:
            refused = await answer.json()
            assert answer.status == 403 and refused["error"]["code"] == "forbidden"
        async with web.post(url, json=body, headers={"X-API-Key": keys[1]["key"]}) as answer:
            assert answer.status == 200, await answer.text()
        async with web.post(url, json={}, headers={"X-API-Key": keys[0]["key"]}) as answer:
            names = [m["name"] for m in (await answer.json())["data"]["models"]]
    assert names == ["fixed", "sim"]


def test_the_client_adds_shows_and_removes(
    broker: Any, prefix: str, start_host: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    install(tmp_path / "state", "qwen")
    start_host({"fixed": sim_model(2000)})
    bus = ["--broker", broker.url, "--prefix", prefix, "--host", "lab"]

    def modelbus(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "modelbus", *argv, *bus, "--timeout", "20"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    added = modelbus("catalog", "add", "q", "--preset", "vllm", "--weights", "qwen",
                     "--vram-mb", "9000")  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert added.stdout.strip() == "catalog on lab: added q"
    shown = modelbus("catalog")
    assert shown.returncode == 0, shown.stderr
    rows = [line.split() for line in shown.stdout.splitlines()[1:-1]]
    assert [(r[0], r[1], r[2]) for r in rows] == [("fixed", "config", "-"), ("q", "bus", "vllm")]
    refused = modelbus("catalog", "add", "x", "--preset", "openai", "--vram-mb", "9")
    assert refused.returncode == 1 and "forbidden" in refused.stderr
    removed = modelbus("catalog", "remove", "q")
    assert removed.returncode == 0 and removed.stdout.strip() == "catalog on lab: removed q"


def test_install_add_installs_then_adds_the_suggested_entry(
    broker: Any, prefix: str, start_host: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    with FakeHub() as hub:
        hub.add_repo("acme/tiny-GGUF", {"tiny-Q4_K_M.gguf": 2 * 1024 * 1024, "README.md": "hi"})
        weights = {"endpoint": hub.endpoint}
        start_host({"fixed": sim_model(2000)}, extra={"weights": weights})
        bus = ["--broker", broker.url, "--prefix", prefix, "--host", "lab", "--timeout", "60"]
        command = [sys.executable, "-m", "modelbus", "install", "acme/tiny-GGUF", "--add", *bus]
        result = subprocess.run(
            [*command, "--name", "tiny"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=90, check=False,
        )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == "catalog on lab: added tiny"
    entry = json.loads((tmp_path / "state" / "catalog.json").read_text())["models"]["tiny"]
    assert (entry["preset"], entry["weights"], entry["hf_repo"]) == (
        "llama-cpp",
        "tiny",
        "acme/tiny-GGUF",
    )
    assert entry["vram_mb"] >= 2  # the GGUF's size and the overhead
