"""The gateway in front of the real llama.cpp server (built from source by
.ci/build-llama-server.sh), with tiny random-weight GGUF models: a request loads its
model, streams come through as llama-server sends them, and a request for the other
model stops one llama-server and starts the other."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import openai
import psutil
import pytest

from agent import processes
from tests.support.agent_process import AgentProcess
from tests.support.gateway import ARRIVAL_ORDER, Gateway, gateway_settings
from tests.support.host import Host
from tests.support.llama import llama_model, llama_server_binary, tiny_models

pytestmark = pytest.mark.broker

CHAT = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_models(tmp_path_factory.mktemp("gguf"))


@pytest.fixture
async def llama_gateway(
    start_host: Callable[..., AgentProcess], host: Host, ggufs: tuple[Path, Path]
) -> Gateway:
    binary = llama_server_binary()
    small, big = ggufs
    # 20 GB each on a 32 GB GPU: the two never fit together.
    models = {
        "small": llama_model(binary, small, vram_mb=20000),
        "big": llama_model(binary, big, vram_mb=20000, aliases=["tiny/big"]),
    }
    port, settings = gateway_settings()
    agent = start_host(models, http=settings, extra={"gateway": ARRIVAL_ORDER})
    await host.online()
    return Gateway(host, port, agent)


def api(gateway: Gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.base_url, api_key="none", max_retries=0)


async def test_a_request_loads_llama_server_and_streams_its_tokens(
    llama_gateway: Gateway,
) -> None:
    mark = len(llama_gateway.host.bus.messages)
    async with api(llama_gateway) as client:
        answer = await client.chat.completions.create(model="small", messages=CHAT, max_tokens=8)
        assert answer.choices[0].message.content is not None
        assert answer.usage is not None and answer.usage.completion_tokens > 0
        stream = await client.chat.completions.create(
            model="small", messages=CHAT, max_tokens=6, stream=True
        )
        pieces = [chunk async for chunk in stream]
    # llama-server's own stream: a role delta first, the tokens, a finish reason.
    assert len(pieces) >= 3
    assert pieces[-1].choices[0].finish_reason in ("length", "stop")
    jobs = await llama_gateway.ended_jobs("small", after=mark)
    assert [(j["origin"], j["state"]) for j in jobs.values()] == [("gateway", "succeeded")]


async def test_a_request_for_the_other_model_swaps_llama_servers(
    llama_gateway: Gateway,
) -> None:
    async with api(llama_gateway) as client:
        await client.chat.completions.create(model="small", messages=CHAT, max_tokens=4)
        await llama_gateway.model_state("small", lambda v: v["state"] == "ready")
        assert any("tiny-2l.gguf" in " ".join(p) for p in await asyncio.to_thread(_llama_processes))
        mark = len(llama_gateway.host.bus.messages)
        answer = await client.chat.completions.create(model="tiny/big", messages=CHAT, max_tokens=4)
    assert answer.choices[0].message.content is not None
    jobs = list((await llama_gateway.ended_jobs("big", after=mark)).values())
    assert len(jobs) == 1 and jobs[0]["result"]["evicted"] == ["small"]
    await llama_gateway.model_state("small", lambda v: v["state"] == "stopped", after=mark)
    # The evicted llama-server is gone, not just unreachable.
    assert not any("tiny-2l.gguf" in " ".join(p) for p in await asyncio.to_thread(_llama_processes))


def _llama_processes() -> list[list[str]]:
    found = []
    for process in psutil.process_iter(["cmdline", "name"]):
        cmdline = process.info.get("cmdline") or []
        if cmdline and "llama-server" in cmdline[0] and processes.start_time(process.pid):
            found.append(cmdline)
    return found
