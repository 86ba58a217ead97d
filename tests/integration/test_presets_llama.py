"""The llama-cpp preset against the real llama.cpp server (built by
.ci/build-llama-server.sh): two catalog entries of a few lines each, serving two GGUF
files of different sizes installed in the weights directory, switched over the bus: the
switch really stops one llama-server and starts the other, and each answers through the
gateway with the official openai client."""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from tests.integration.test_gateway_llama import CHAT, _llama_processes
from tests.support.agent_process import REPO_ROOT, AgentProcess
from tests.support.gateway import ARRIVAL_ORDER, Gateway, gateway_settings
from tests.support.host import Host
from tests.support.llama import llama_server_binary, tiny_models

pytestmark = pytest.mark.broker


async def test_two_llama_cpp_preset_entries_switch_over_the_bus(
    start_host: Callable[..., AgentProcess], host: Host, tmp_path: Path
) -> None:
    binary = llama_server_binary()
    weights = tmp_path / "state" / "weights"
    small, big = tiny_models(tmp_path / "gguf")
    for name, gguf in (("tiny-2l", small), ("tiny-4l", big)):
        (weights / name).mkdir(parents=True)
        shutil.copy(gguf, weights / name / gguf.name)
    # A real server holds no simulated memory: the holder holds MODELBUS_HOLD_MB for it.
    holder = [sys.executable, "-m", "tests.support.vram_holder", "--", str(binary)]
    presets = {
        "llama-cpp": {
            "command": holder,
            "args": ["-c", "512", "--threads", "1", "--parallel", "2", "--no-webui"],
            "env": {"PYTHONPATH": str(REPO_ROOT)},
        }
    }
    models = {  # 20 GB each on a 32 GB GPU: they never fit together
        "small": {
            "preset": "llama-cpp",
            "weights": "tiny-2l",
            "vram_mb": 20000,
            "env": {"MODELBUS_HOLD_MB": "20000"},
        },
        "big": {
            "preset": "llama-cpp",
            "weights": "tiny-4l",
            "vram_mb": 20000,
            "env": {"MODELBUS_HOLD_MB": "20000"},
        },
    }
    port, settings = gateway_settings()
    agent = start_host(models, http=settings, extra={"gateway": ARRIVAL_ORDER, "presets": presets})
    await host.online()
    gateway = Gateway(host, port, agent)

    reply = await host.ask("switch", {"model": "small", "wait": True}, timeout=90)
    assert reply.status == "ok", reply
    running = await asyncio.to_thread(_llama_processes)
    assert [str(weights / "tiny-2l" / small.name)] == [
        argv[argv.index("--model") + 1] for argv in running
    ]
    async with openai.AsyncOpenAI(
        base_url=gateway.base_url, api_key="none", max_retries=0
    ) as client:
        answer = await client.chat.completions.create(model="small", messages=CHAT, max_tokens=4)
        assert answer.choices[0].message.content is not None

        reply = await host.ask("switch", {"model": "big", "wait": True}, timeout=90)
        assert reply.status == "ok", reply
        assert (reply.data or {})["job"]["result"]["evicted"] == ["small"]
        running = await asyncio.to_thread(_llama_processes)
        assert [str(weights / "tiny-4l" / big.name)] == [
            argv[argv.index("--model") + 1] for argv in running
        ]
        answer = await client.chat.completions.create(model="big", messages=CHAT, max_tokens=4)
        assert answer.choices[0].message.content is not None
    assert host.model("small")["state"] == "stopped"
