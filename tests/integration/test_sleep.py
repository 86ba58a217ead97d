"""Sleep and wake over the real broker: simulated servers that speak vLLM's sleep API
(devtools/simserver.py --sleep-api vllm) are put to sleep when a switch evicts them, holding
real host RAM, and woken, not restarted, when a switch brings them back; when host RAM is
short the agent stops them instead."""

from __future__ import annotations

import json
from typing import Any

import openai
import psutil
import pytest

from tests.support.gateway import ARRIVAL_ORDER, CHAT, gateway_settings
from tests.support.host import Host
from tests.support.models import sim_model

pytestmark = pytest.mark.broker

GB20 = 20000  # two never fit together on the 32 GB simulated GPU


def sleepy(*, sleep_ram_mb: int = 100, held_mb: int = 48, **spec: Any) -> dict[str, Any]:
    """A 20 GB model whose server sleeps (vLLM's API), holding ``held_mb`` of real RAM
    asleep; the catalog's estimate until a sleep measures it is ``sleep_ram_mb``."""
    extra = ["--sleep-api", "vllm", "--sleep-ram-mb", str(held_mb), "--wake-s", "0.3"]
    return sim_model(GB20, load_s=1.0, extra=extra, sleep="vllm", sleep_ram_mb=sleep_ram_mb, **spec)


async def switch(host: Host, model: str) -> dict[str, Any]:
    reply = await host.ask("switch", {"model": model, "wait": True})
    assert reply.status == "ok", reply.error
    assert reply.data is not None
    result: dict[str, Any] = reply.data["job"]["result"]
    return result


async def server_pid(host: Host, model: str) -> int:
    """The pid of the model's server, from its GPU process once it holds memory."""

    def owned(gpu: dict[str, Any]) -> list[int]:
        return [p["pid"] for p in gpu["processes"] if p.get("model") == model]

    message = await host.bus.wait_topic(host.topics.gpu(0), lambda v: len(owned(v)) == 1)
    return owned(json.loads(message.payload))[0]


async def test_a_switch_back_wakes_the_evicted_model_instead_of_starting_it(
    start_host, host: Host
) -> None:
    start_host({"a": sleepy(), "b": sleepy()}, lifecycle={"host_ram_mb": 1000})
    await host.online()
    await switch(host, "a")
    pid_a = await server_pid(host, "a")

    result = await switch(host, "b")
    assert result["evicted"] == ["a"] and result["slept"] == ["a"]
    assert result["timings"]["sleep_s"] > 0
    asleep = await host.wait_model("a", "sleeping")
    assert asleep["health"] == "asleep"
    # It keeps running, its VRAM back on the GPU, the RAM it holds measured.
    assert psutil.pid_exists(pid_a)
    assert asleep["sleep_ram_mb"] >= 48
    assert asleep["sleep_ram_mb"] == pytest.approx(
        psutil.Process(pid_a).memory_info().rss / 2**20, abs=16
    )
    await host.bus.wait_topic(host.topics.gpu(0), lambda v: v["memory_used_mb"] == GB20)
    assert host.events("model_asleep")[0]["model"] == "a"

    result = await switch(host, "a")
    assert result["woken"] is True and result["slept"] == ["b"]
    assert result["timings"]["wake_s"] >= 0.3  # the server's wake time, not its load time
    assert "start_s" not in {k for k, v in result["timings"].items() if v is not None}
    assert await server_pid(host, "a") == pid_a  # the same server, woken
    awake = host.model("a")
    assert awake["state"] == "ready" and awake["last_wake_s"] >= 0.3
    assert host.model("b")["state"] == "sleeping"


async def test_unload_stops_a_sleeping_model(start_host, host: Host) -> None:
    start_host({"a": sleepy(), "b": sleepy()}, lifecycle={"host_ram_mb": 1000})
    await host.online()
    await switch(host, "a")
    pid_a = await server_pid(host, "a")
    await switch(host, "b")
    await host.wait_model("a", "sleeping")
    reply = await host.ask("unload", {"model": "a", "wait": True})
    assert reply.status == "ok", reply.error
    assert host.model("a")["state"] == "stopped"
    assert not psutil.pid_exists(pid_a) or psutil.Process(pid_a).status() == "zombie"


async def test_short_host_ram_stops_instead_of_sleeping(start_host, host: Host) -> None:
    """Budget 150 MiB: a model estimated at 200 never sleeps; with 100 estimated, a second
    sleeper needs the first (measured at about 48 MiB of held RAM plus the interpreter)
    stopped to make room."""
    models = {"big": sleepy(sleep_ram_mb=200), "a": sleepy(), "b": sleepy(), "c": sleepy()}
    start_host(models, lifecycle={"host_ram_mb": 150})
    await host.online()
    await switch(host, "big")
    result = await switch(host, "a")
    assert result["evicted"] == ["big"] and result["slept"] == []
    assert host.model("big")["state"] == "stopped"

    result = await switch(host, "b")
    assert result["slept"] == ["a"]
    result = await switch(host, "c")
    assert result["slept"] == ["b"]
    # a held more than 50 MiB, b was estimated at 100: a was stopped for b.
    assert host.model("a")["state"] == "stopped"
    assert host.model("b")["state"] == "sleeping"
    unloaded = [e["model"] for e in host.events("model_unloaded")]
    assert unloaded.count("a") == 1


async def test_a_model_without_a_sleep_api_is_stopped(start_host, host: Host) -> None:
    start_host({"a": sim_model(GB20), "b": sleepy()}, lifecycle={"host_ram_mb": 1000})
    await host.online()
    await switch(host, "a")
    result = await switch(host, "b")
    assert result["evicted"] == ["a"] and result["slept"] == []
    assert host.model("a")["state"] == "stopped"


async def test_a_gateway_request_wakes_its_sleeping_model(start_host, host: Host) -> None:
    port, settings = gateway_settings()
    start_host(
        {"a": sleepy(), "b": sleepy()},
        lifecycle={"host_ram_mb": 1000},
        http=settings,
        extra={"gateway": ARRIVAL_ORDER},
    )
    await host.online()
    await switch(host, "a")
    await switch(host, "b")
    await host.wait_model("a", "sleeping")
    mark = len(host.bus.messages)
    async with openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0
    ) as client:
        answer = await client.chat.completions.create(model="a", messages=CHAT, max_tokens=4)
    assert answer.choices[0].message.content
    states = [
        json.loads(m.payload)["state"]
        for m in host.bus.messages[mark:]
        if m.topic == host.topics.model("a") and m.payload
    ]
    assert "waking" in states and states[-1] == "ready"
    assert host.model("b")["state"] == "sleeping"


@pytest.mark.parametrize(
    ("api", "spec"),
    [
        ("vllm", {"sleep_level": 2, "sleep_ram_mb": 0}),
        ("sglang", {"sleep": "sglang", "sleep_ram_mb": 100}),
    ],
)
async def test_level_2_and_sglang_sleep_and_wake(
    start_host, host: Host, api: str, spec: dict[str, Any]
) -> None:
    extra = ["--sleep-api", api, "--sleep-ram-mb", "16", "--wake-s", "0.2", "--reload-s", "0.2"]
    models = {
        name: {**sim_model(GB20, load_s=1.0, extra=extra, sleep="vllm"), **spec}
        for name in ("a", "b")
    }
    start_host(models, lifecycle={"host_ram_mb": 1000})
    await host.online()
    await switch(host, "a")
    pid_a = await server_pid(host, "a")
    assert (await switch(host, "b"))["slept"] == ["a"]
    result = await switch(host, "a")
    assert result["woken"] is True and await server_pid(host, "a") == pid_a
    # Level 2: its weights were reloaded (collective_rpc), so it answers requests again.
    assert host.model("a")["state"] == "ready"


async def test_a_server_that_will_not_sleep_is_stopped(start_host, host: Host) -> None:
    # The catalog says vLLM's API, the server speaks SGLang's: /sleep is a 404.
    extra = ["--sleep-api", "sglang"]
    models = {
        "a": sim_model(GB20, extra=extra, sleep="vllm", sleep_ram_mb=10),
        "b": sim_model(GB20),
    }
    start_host(models, lifecycle={"host_ram_mb": 1000})
    await host.online()
    await switch(host, "a")
    result = await switch(host, "b")
    assert result["evicted"] == ["a"] and result["slept"] == []
    assert host.model("a")["state"] == "stopped"


async def test_a_restarted_agent_finds_its_model_asleep(start_host, host: Host) -> None:
    models = {"a": sleepy(), "b": sleepy()}
    agent = start_host(models, lifecycle={"host_ram_mb": 1000})
    await host.online()
    await switch(host, "a")
    await switch(host, "b")
    measured = (await host.wait_model("a", "sleeping"))["sleep_ram_mb"]
    assert measured != 100  # measured, not the catalog's estimate
    mark = len(host.bus.messages)
    agent.kill()  # the servers outlive it, as after a crash
    start_host(models, lifecycle={"host_ram_mb": 1000})
    await host.bus.wait_topic(
        host.topics.status, lambda v: v == "online", after=mark, raw=True, timeout=20
    )
    # Asleep, and what its sleep measured is remembered (the database), not estimated again.
    await host.bus.wait_topic(
        host.topics.model("a"),
        lambda v: v and v["state"] == "sleeping" and v["sleep_ram_mb"] == measured,
        after=mark,
    )
    await host.bus.wait_topic(
        host.topics.model("b"), lambda v: v and v["state"] == "ready", after=mark
    )
    result = await switch(host, "a")
    assert result["woken"] is True
