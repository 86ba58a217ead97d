"""The gateway's batching policy through the official ``openai`` client: interleaved
requests for models that do not fit together are served in batches by model, one
switch each, not in arrival order; while a switch drains a streaming model, models
already loaded keep answering, and a drain past ``drain_timeout_s`` fails ``busy``."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

import openai
import pytest

from tests.support.agent_process import AgentProcess
from tests.support.gateway import CHAT, Gateway, async_client, eventually, start_gateway
from tests.support.host import Host
from tests.support.models import sim_model

pytestmark = pytest.mark.broker


async def test_a_seeded_interleaved_trace_is_served_in_batches_by_model(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    """24 requests over three models that do not fit together, interleaved within a
    second: arrival order would switch at almost every request; the policy switches
    once per model (alpha's batch, then the others' in the order they first waited)."""
    models = {name: sim_model(20000, load_s=0.2) for name in ("alpha", "beta", "gamma")}
    gateway = await start_gateway(
        start_host, host, models, batching={"max_wait_s": 4, "idle_after_s": 1}
    )
    rng = random.Random(15)
    later = [(rng.choice(["alpha", "beta", "gamma"]), rng.uniform(0.05, 1.0)) for _ in range(23)]
    trace = [("alpha", 0.0), *sorted(later, key=lambda entry: entry[1])]
    assert {model for model, _ in trace} == {"alpha", "beta", "gamma"}
    mark = len(host.bus.messages)
    first_wait: dict[str, float] = {}

    async def ask(api: openai.AsyncOpenAI, model: str, at: float, start: float) -> str:
        await asyncio.sleep(max(0.0, start + at - time.monotonic()))
        first_wait.setdefault(model, time.monotonic())
        answer = await api.chat.completions.create(model=model, messages=CHAT)
        return answer.choices[0].message.content or ""

    async with async_client(gateway, timeout=60) as api:
        start = time.monotonic()
        answers = await asyncio.gather(*(ask(api, model, at, start) for model, at in trace))
    assert answers == [f"Simulated answer from {model}." for model, _ in trace]
    ended = await gateway.ended_jobs("alpha", "beta", "gamma", after=mark, count=3)
    switches = list(ended.values())
    assert all(job["state"] == "succeeded" and job["origin"] == "gateway" for job in switches)
    by_start = sorted(switches, key=lambda job: job["created_at"])
    others = sorted(("beta", "gamma"), key=lambda model: first_wait[model])
    assert [job["model"] for job in by_start] == ["alpha", *others], [
        (job["model"], job["created_at"][14:], job["finished_at"][14:]) for job in by_start
    ] + sorted((m, round(t - start, 2)) for m, t in first_wait.items())


async def test_loaded_models_keep_answering_while_a_switch_drains_and_a_long_drain_is_busy(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    """alpha streams for 4 s; beta needs alpha's memory and alpha's drain_timeout_s is
    1 s. While beta's switch waits for the drain, gamma (loaded beside alpha) answers;
    then the switch fails busy with the numbers, beta's caller gets a 503 naming it,
    and alpha's stream ends whole, alpha still loaded."""
    models = {
        "alpha": sim_model(
            20000,
            load_s=0.1,
            extra=["--answer-tokens", "16", "--tokens-per-s", "4"],
            drain_timeout_s=1,
        ),
        "beta": sim_model(20000, load_s=0.1),
        "gamma": sim_model(4000, load_s=0.1),
    }
    gateway = await start_gateway(start_host, host, models)
    async with async_client(gateway, timeout=60) as api:
        await api.chat.completions.create(model="gamma", messages=CHAT)
        mark = len(host.bus.messages)
        stream = await api.chat.completions.create(model="alpha", messages=CHAT, stream=True)
        chunks = [await anext(aiter(stream))]
        beta = asyncio.create_task(api.chat.completions.create(model="beta", messages=CHAT))
        await eventually(
            lambda: asyncio.sleep(0, [m.payload for m in host.bus.messages[mark:]]),
            lambda payloads: any(
                b"waiting for alpha to finish 1 request(s)" in p for p in payloads
            ),
        )
        during_drain = await api.chat.completions.create(model="gamma", messages=CHAT)
        assert not beta.done()
        with pytest.raises(openai.APIStatusError) as refused:
            await beta
        async for chunk in stream:
            chunks.append(chunk)
    assert during_drain.choices[0].message.content == "Simulated answer from gamma."
    assert refused.value.status_code == 503
    message = refused.value.body["message"]  # type: ignore[index]
    assert "alpha still had 1 request(s) in flight when the drain timeout ran out" in message
    assert len(chunks) == 16 and chunks[-1].choices[0].finish_reason == "length"
    (job,) = (await gateway.ended_jobs("beta", after=mark)).values()
    assert job["state"] == "failed" and job["error"]["code"] == "busy"
    assert job["error"]["details"] == {"models": ["alpha"], "in_flight": 1}
    async with async_client(gateway) as api:
        alpha = await api.models.retrieve("alpha")
    assert alpha.state == "ready"  # type: ignore[attr-defined]
    await eventually(
        lambda: api_model_in_flight(gateway, "alpha"), lambda in_flight: in_flight == 0
    )


async def api_model_in_flight(gateway: Gateway, name: str) -> int:
    async with async_client(gateway) as api:
        model = await api.models.retrieve(name)
    in_flight: int = model.in_flight  # type: ignore[attr-defined]
    return in_flight
