"""The gateway through the official ``openai`` client (and curl): a request for a model
that is not loaded gets its answer after the swap, which is a job like any other on the
bus; requests share a loading job; streams pass through as they come; errors are
OpenAI's; a model with requests in flight is drained, never cut off."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.support.agent_process import AgentProcess
from tests.support.gateway import (
    CHAT,
    Gateway,
    async_client,
    client,
    eventually,
    gateway_settings,
    start_gateway,
)
from tests.support.host import Host
from tests.support.models import sim_model

pytestmark = pytest.mark.broker


async def test_a_request_for_a_model_not_loaded_is_answered_after_its_switch(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    gateway = await start_gateway(start_host, host, {"alpha": sim_model(4096, load_s=0.3)})
    mark = len(host.bus.messages)
    answer = await asyncio.to_thread(
        client(gateway).chat.completions.create, model="alpha", messages=CHAT
    )
    assert answer.choices[0].message.content == "Simulated answer from alpha."
    jobs = await gateway.ended_jobs("alpha", after=mark)
    assert [(j["command"], j["origin"], j["state"]) for j in jobs.values()] == [
        ("switch", "gateway", "succeeded")
    ]
    # The request counted as use: the model says so on the bus (at most once a second).
    state = await gateway.model_state("alpha", lambda v: v["requests_total"] == 1, after=mark)
    assert state["state"] == "ready" and state["last_request_at"] is not None


async def test_concurrent_requests_for_a_loading_model_share_one_job(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    gateway = await start_gateway(start_host, host, {"alpha": sim_model(4096, load_s=1.0)})
    mark = len(host.bus.messages)
    async with async_client(gateway) as api:
        answers = await asyncio.gather(
            *(api.chat.completions.create(model="alpha", messages=CHAT) for _ in range(8)),
            api.embeddings.create(model="alpha", input=["one", "two"]),
        )
    assert all(a.choices[0].message.content for a in answers[:8])  # type: ignore[union-attr]
    assert len(answers[8].data) == 2  # type: ignore[union-attr]
    assert len(await gateway.ended_jobs("alpha", after=mark)) == 1


async def test_a_stream_reaches_the_client_chunk_by_chunk(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    slow = sim_model(2048, load_s=0.1, extra=["--answer-tokens", "6", "--tokens-per-s", "6"])
    gateway = await start_gateway(start_host, host, {"slow": slow})
    async with async_client(gateway) as api:
        stream = await api.chat.completions.create(model="slow", messages=CHAT, stream=True)
        arrivals = []
        async for chunk in stream:
            arrivals.append((time.monotonic(), chunk.choices[0].delta.content))
    assert len(arrivals) == 6
    # Six tokens at six a second: passed through as they came, not gathered at the end.
    assert arrivals[-1][0] - arrivals[0][0] > 0.5


async def test_curl_sees_server_sent_events_as_they_come(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    slow = sim_model(2048, load_s=0.1, extra=["--answer-tokens", "4", "--tokens-per-s", "2"])
    gateway = await start_gateway(start_host, host, {"slow": slow})
    body = json.dumps({"model": "slow", "messages": CHAT, "stream": True})
    curl = await asyncio.create_subprocess_exec(
        "curl", "-sN", f"{gateway.base_url}/chat/completions", "-H",
        "Content-Type: application/json", "-d", body,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert curl.stdout is not None
    async with asyncio.timeout(30):
        first = await curl.stdout.readline()
    # The first event is out while the server still generates the others.
    assert first.startswith(b"data: {") and curl.returncode is None
    rest = (await curl.stdout.read()).decode()
    await curl.wait()
    assert rest.strip().endswith("data: [DONE]")


async def test_models_list_the_catalog_with_states_and_aliases(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    models = {
        "alpha": sim_model(2048, aliases=["org/alpha-7b", "gpt-4o"]),
        "beta": sim_model(2048),
    }
    gateway = await start_gateway(start_host, host, models)
    api = client(gateway)
    listed = await asyncio.to_thread(api.models.list)
    assert [(m.id, m.state, m.aliases) for m in listed.data] == [  # type: ignore[attr-defined]
        ("alpha", "stopped", ["org/alpha-7b", "gpt-4o"]),
        ("beta", "stopped", []),
    ]
    one = await asyncio.to_thread(api.models.retrieve, "org/alpha-7b")
    assert one.id == "alpha"
    # An alias is a name for the model: the request loads and reaches it.
    answer = await asyncio.to_thread(api.chat.completions.create, model="gpt-4o", messages=CHAT)
    assert answer.choices[0].message.content == "Simulated answer from alpha."


async def test_errors_come_in_openais_shape(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    models = {"alpha": sim_model(2048), "broken": sim_model(2048, extra=["--exit-at-once"])}
    gateway = await start_gateway(start_host, host, models)
    api = client(gateway)
    with pytest.raises(openai.NotFoundError) as unknown:
        await asyncio.to_thread(api.chat.completions.create, model="nosuch", messages=CHAT)
    assert "alpha, broken" in unknown.value.message
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.InternalServerError) as failed:
        await asyncio.to_thread(api.chat.completions.create, model="broken", messages=CHAT)
    assert failed.value.status_code == 503 and "could not be loaded (job " in failed.value.message
    async with aiohttp.ClientSession() as raw:
        for method, path, body, code in [
            ("POST", "/chat/completions", json.dumps({"messages": CHAT}), 400),
            ("POST", "/chat/completions", "{nope", 400),
            ("GET", "/nothing", None, 404),
        ]:
            async with raw.request(method, gateway.base_url + path, data=body) as response:
                assert response.status == code
                error = (await response.json())["error"]
                assert set(error) >= {"message", "type", "code"}
    # Nothing was left queued or loaded by the refusals.
    status = await host.ask("status")
    assert status.data is not None
    assert [j for j in status.data["jobs"] if j["state"] in ("queued", "running")] == []
    loaded = {m["name"] for m in status.data["models"] if m["state"] == "ready"}
    assert loaded == set()


async def test_a_full_queue_is_429_with_retry_after(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    models = {"alpha": sim_model(2048, load_s=2.0, max_queued=2)}
    gateway = await start_gateway(start_host, host, models)
    async with async_client(gateway) as api:
        waiting = [
            asyncio.create_task(api.chat.completions.create(model="alpha", messages=CHAT))
            for _ in range(2)
        ]
        await gateway.model_state("alpha", lambda v: v["state"] == "loading")
        with pytest.raises(openai.RateLimitError) as refused:
            await api.chat.completions.create(model="alpha", messages=CHAT)
        assert int(refused.value.response.headers["Retry-After"]) >= 1
        answers = await asyncio.gather(*waiting)
    assert all(answer.choices for answer in answers)


async def test_a_model_answering_requests_is_drained_before_it_is_evicted(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    """beta needs alpha's memory while alpha streams an answer: beta's switch stops
    alpha only once the stream ended, and alpha took no new request meanwhile."""
    streaming = ["--answer-tokens", "8", "--tokens-per-s", "4"]
    models = {
        "alpha": sim_model(20000, load_s=0.1, extra=streaming),
        "beta": sim_model(20000, load_s=0.1),
    }
    gateway = await start_gateway(start_host, host, models)
    mark = len(host.bus.messages)
    async with async_client(gateway) as api:
        stream = await api.chat.completions.create(model="alpha", messages=CHAT, stream=True)
        chunks = []
        async for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == 1:
                # beta is asked for with alpha mid-answer.
                beta = asyncio.create_task(api.chat.completions.create(model="beta", messages=CHAT))
        stream_ended = time.monotonic()
        answer = await beta
        beta_answered = time.monotonic()
    assert len(chunks) == 8 and chunks[-1].choices[0].finish_reason == "length"
    assert answer.choices[0].message.content == "Simulated answer from beta."
    assert beta_answered > stream_ended
    messages = [
        json.loads(m.payload).get("message") or ""
        for m in host.bus.messages[mark:]
        if m.topic.startswith(host.topics.job("")) and m.payload
    ]
    assert any("waiting for alpha to finish 1 request(s)" in text for text in messages)
    evicted = await gateway.model_state("alpha", lambda v: v["state"] == "stopped", after=mark)
    assert evicted["in_flight"] == 0


async def test_a_request_for_a_model_being_drained_waits_for_its_return(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    """alpha is draining for beta's switch when another alpha request comes: it is not
    let in (beta would wait for it too), but waits until beta's caller was answered and
    alpha is loaded again; beta's request, admitted as its switch ended, is not cut off
    by the switch back."""
    streaming = ["--answer-tokens", "8", "--tokens-per-s", "4"]
    models = {
        "alpha": sim_model(20000, load_s=0.1, extra=streaming),
        "beta": sim_model(20000, load_s=0.1, extra=["--answer-tokens", "4", "--tokens-per-s", "8"]),
    }
    gateway = await start_gateway(start_host, host, models)
    mark = len(host.bus.messages)
    answered: dict[str, float] = {}

    async def ask(api: openai.AsyncOpenAI, model: str, label: str) -> str:
        answer = await api.chat.completions.create(model=model, messages=CHAT)
        answered[label] = time.monotonic()
        return answer.choices[0].message.content or ""

    async with async_client(gateway) as api:
        stream = await api.chat.completions.create(model="alpha", messages=CHAT, stream=True)
        async for _ in stream:
            beta = asyncio.create_task(ask(api, "beta", "beta"))
            await eventually(
                lambda: asyncio.sleep(0, [m.payload for m in host.bus.messages[mark:]]),
                lambda payloads: any(b"waiting for alpha to finish" in p for p in payloads),
            )
            late = asyncio.create_task(ask(api, "alpha", "late alpha"))
            break
        async for _ in stream:
            pass
        answers = await asyncio.gather(beta, late)
    assert "from beta" in answers[0] and "from alpha" in answers[1]
    assert answered["beta"] < answered["late alpha"]
    jobs = await gateway.ended_jobs("alpha", "beta", after=mark, count=3)
    assert sorted((job["model"], job["state"]) for job in jobs.values()) == [
        ("alpha", "succeeded"),  # the stream's
        ("alpha", "succeeded"),  # the late request's, after beta's
        ("beta", "succeeded"),
    ]
    # The switch back found beta's request admitted, and waited for it.
    payloads = [m.payload for m in host.bus.messages[mark:]]
    assert any(b"waiting for beta to finish 1 request(s)" in p for p in payloads)


async def test_a_client_that_goes_away_leaves_the_queue_and_ends_its_stream_upstream(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    streaming = ["--answer-tokens", "100", "--tokens-per-s", "5"]
    models = {
        "slowload": sim_model(2048, load_s=3.0),
        "talker": sim_model(2048, load_s=0.1, extra=streaming),
    }
    gateway = await start_gateway(start_host, host, models)
    async with async_client(gateway) as api:
        # Waiting for a load: the caller gives up, and its place in the queue goes too.
        waiting = asyncio.create_task(api.chat.completions.create(model="slowload", messages=CHAT))
        await gateway.model_state("slowload", lambda v: v["state"] == "loading")
        now = await listed(gateway)
        assert now["slowload"]["waiting"] == 1, now
        # The bus tells it too (P/H/models/<name>.waiting), as the TUI's Req column shows it.
        await gateway.model_state("slowload", lambda v: v["waiting"] == 1)
        mark = len(host.bus.messages)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await eventually(lambda: listed(gateway), lambda m: m["slowload"]["waiting"] == 0)
        await gateway.model_state("slowload", lambda v: v["waiting"] == 0, after=mark)

        # Mid-stream: the upstream request ends with it, long before its 20 s.
        mark = len(host.bus.messages)
        stream = await api.chat.completions.create(model="talker", messages=CHAT, stream=True)
        async for _ in stream:
            break
        await stream.close()
    await gateway.model_state(
        "talker", lambda v: v["requests_total"] == 1 and v["in_flight"] == 0, after=mark
    )
    assert gateway.agent is not None
    server_log = gateway.agent.state_dir / "logs" / "talker.log"
    await eventually(
        lambda: asyncio.to_thread(server_log.read_text),
        lambda text: "the client went away; stopped generating" in text,
    )


async def test_a_server_that_dies_mid_stream_ends_the_stream_with_an_error(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    dying = ["--answer-tokens", "100", "--tokens-per-s", "4", "--crash-after", "3"]
    gateway = await start_gateway(start_host, host, {"dying": sim_model(2048, extra=dying)})
    async with async_client(gateway) as api:
        stream = await api.chat.completions.create(model="dying", messages=CHAT, stream=True)
        received = 0
        with pytest.raises(openai.APIError) as broke:
            async for _ in stream:
                received += 1
    assert 0 < received < 100
    assert "dying's server failed to answer" in broke.value.message


async def test_keys_carry_roles(start_host: Callable[..., AgentProcess], host: Host) -> None:
    keys = [
        {"name": "app", "role": "user", "key": "user-key-0123456789"},
        {"name": "dashboard", "role": "viewer", "key": "viewer-key-0123456789"},
    ]
    gateway = await start_gateway(start_host, host, {"alpha": sim_model(2048)}, api_keys=keys)

    def api(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0)

    with pytest.raises(openai.AuthenticationError):
        await asyncio.to_thread(api("wrong-key-0123456789").models.list)
    with pytest.raises(openai.PermissionDeniedError) as viewer:
        await asyncio.to_thread(
            api("viewer-key-0123456789").chat.completions.create, model="alpha", messages=CHAT
        )
    assert "'dashboard' has the role viewer; this needs user" in viewer.value.message
    listed_by_viewer = await asyncio.to_thread(api("viewer-key-0123456789").models.list)
    assert [m.id for m in listed_by_viewer.data] == ["alpha"]
    answer = await asyncio.to_thread(
        api("user-key-0123456789").chat.completions.create, model="alpha", messages=CHAT
    )
    assert answer.choices
    async with aiohttp.ClientSession() as raw:
        async with raw.get(f"{gateway.base_url}/models") as anonymous:
            assert anonymous.status == 401
            assert (await anonymous.json())["error"]["code"] == "invalid_api_key"
        headers = {"X-API-Key": "viewer-key-0123456789"}
        async with raw.get(f"{gateway.base_url}/models", headers=headers) as by_header:
            assert by_header.status == 200


async def test_metrics_and_healthz_open_or_behind_a_viewer_key(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    keys = [{"name": "prometheus", "role": "viewer", "key": "viewer-key-0123456789"}]
    gateway = await start_gateway(
        start_host, host, {"alpha": sim_model(2048)}, api_keys=keys, metrics_open=False
    )
    root = f"http://127.0.0.1:{gateway.port}"
    async with aiohttp.ClientSession() as raw:
        async with raw.get(f"{root}/healthz") as health:
            assert health.status == 200 and await health.json() == {"status": "ok"}
        async with raw.get(f"{root}/metrics") as anonymous:
            assert anonymous.status == 401
            assert (await anonymous.json())["error"]["code"] == "invalid_api_key"
        headers = {"Authorization": "Bearer viewer-key-0123456789"}
        async with raw.get(f"{root}/metrics", headers=headers) as scraped:
            assert scraped.status == 200
            assert scraped.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert 'modelbus_model_state{model="alpha",state="stopped"} 1.0' in (
                await scraped.text()
            )


async def test_metrics_need_no_key_by_default(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    keys = [{"name": "app", "role": "user", "key": "user-key-0123456789"}]
    gateway = await start_gateway(start_host, host, {"alpha": sim_model(2048)}, api_keys=keys)
    root = f"http://127.0.0.1:{gateway.port}"
    async with aiohttp.ClientSession() as raw:
        async with raw.get(f"{root}/metrics") as scraped:
            assert scraped.status == 200 and "modelbus_build_info" in await scraped.text()
        # Only /metrics: the rest still wants the key.
        async with raw.get(f"{gateway.base_url}/models") as anonymous:
            assert anonymous.status == 401


async def listed(gateway: Gateway) -> dict[str, dict[str, Any]]:
    async with aiohttp.ClientSession() as raw, raw.get(f"{gateway.base_url}/models") as response:
        return {m["id"]: m for m in (await response.json())["data"]}


async def test_a_taken_port_stops_the_agent_at_start_with_one_sentence(
    start_host: Callable[..., AgentProcess],
) -> None:
    port, settings = gateway_settings()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        agent = start_host({"alpha": sim_model(2048)}, http=settings)
        code = await asyncio.to_thread(agent.process.wait, 30)
    assert code == 1
    output = agent.output()
    assert f"the gateway cannot listen on 127.0.0.1:{port}" in output
    assert "Traceback" not in output


async def test_a_body_over_the_limit_is_413_and_a_slow_answer_times_out(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    slow = ["--answer-tokens", "40", "--tokens-per-s", "4"]
    models = {"slow": sim_model(2048, extra=slow, request_timeout_s=1.5)}
    gateway = await start_gateway(start_host, host, models, max_body_mb=1)
    async with aiohttp.ClientSession() as raw:
        huge = json.dumps({"model": "slow", "messages": CHAT, "padding": "x" * 1_500_000})
        async with raw.post(f"{gateway.base_url}/chat/completions", data=huge) as response:
            assert response.status == 413
            assert (await response.json())["error"]["code"] == "payload_too_large"
    async with async_client(gateway) as api:
        with pytest.raises(openai.APIStatusError) as late:
            # Not streamed: the whole answer would take 10 s, the model allows 1.5.
            await api.chat.completions.create(model="slow", messages=CHAT)
        assert late.value.status_code == 504
        stream = await api.chat.completions.create(model="slow", messages=CHAT, stream=True)
        with pytest.raises(openai.APIError) as cut:
            async for _ in stream:
                pass
        assert "took longer than 1.5 s" in cut.value.message


async def test_an_agent_with_http_off_does_not_load_aiohttp(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    """aiohttp costs an agent 12 MiB of memory: one that serves no HTTP never loads it."""
    quiet = start_host({"alpha": sim_model(4096)})
    await host.online()
    assert "aiohttp" not in _mapped_files(quiet.process.pid)
    assert quiet.terminate() == 0
    # The same look finds it in an agent that serves HTTP.
    mark = len(host.bus.messages)
    port, settings = gateway_settings()
    serving = start_host({"alpha": sim_model(4096)}, http=settings)
    await host.bus.wait_topic(host.topics.status, lambda v: v == "online", raw=True, after=mark)
    url = f"http://127.0.0.1:{port}/v1/models"
    async with aiohttp.ClientSession() as session, session.get(url) as listed:
        assert listed.status == 200
    assert "/aiohttp/_http_parser" in _mapped_files(serving.process.pid)


def _mapped_files(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()
