"""An agent with its gateway on, for the tests that call it as OpenAI clients do."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import openai

from bus.mqtt import Message
from devtools.brokers import free_port
from tests.support.agent_process import AgentProcess
from tests.support.host import Host


@dataclass
class Gateway:
    host: Host
    port: int
    agent: AgentProcess | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def jobs_seen(self, *models: str, after: int = 0) -> dict[str, dict[str, Any]]:
        """The jobs seen on the bus so far for ``models`` (each job's last state), by id."""
        seen: dict[str, dict[str, Any]] = {}
        for message in self.host.bus.messages[after:]:
            job = _job(self.host, message)
            if job is not None and job.get("model") in models:
                seen[job["job_id"]] = job
        return seen

    async def ended_jobs(
        self, *models: str, after: int = 0, count: int = 1
    ) -> dict[str, dict[str, Any]]:
        """The jobs for ``models`` once ``count`` of them are seen and every one has ended.
        An HTTP answer can reach the test before its job's final state does: both leave
        the agent at the same moment, by different sockets."""

        def settled(jobs: dict[str, dict[str, Any]]) -> bool:
            return len(jobs) >= count and all(job["state"] in ENDED for job in jobs.values())

        jobs: dict[str, dict[str, Any]] = await eventually(
            lambda: asyncio.sleep(0, self.jobs_seen(*models, after=after)), settled
        )
        return jobs

    async def model_state(self, model: str, check: Any, *, after: int = 0) -> dict[str, Any]:
        message = await self.host.bus.wait_topic(
            self.host.topics.model(model), lambda v: bool(v) and check(v), after=after, timeout=30
        )
        state: dict[str, Any] = json.loads(message.payload)
        return state


# Unless a test is about batching, its switches are queued as its requests ask for
# them (the default policy would hold one that evicts a model in use).
ARRIVAL_ORDER = {"max_wait_s": 0}

ENDED = {"succeeded", "failed", "cancelled"}

CHAT = [{"role": "user", "content": "hello"}]


async def start_gateway(
    start_host: Callable[..., AgentProcess],
    host: Host,
    models: dict[str, Any],
    *,
    memory_total_mb: int = 32768,
    batching: dict[str, Any] | None = None,
    **http: Any,
) -> Gateway:
    port, settings = gateway_settings(**http)
    agent = start_host(
        models,
        http=settings,
        memory_total_mb=memory_total_mb,
        extra={"gateway": batching or ARRIVAL_ORDER},
    )
    await host.online()
    return Gateway(host, port, agent)


def client(gateway: Gateway, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="none", max_retries=0, **options)


def async_client(gateway: Gateway, **options: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.base_url, api_key="none", max_retries=0, **options)


async def eventually(probe: Callable[[], Any], check: Callable[[Any], bool]) -> Any:
    deadline = time.monotonic() + 20
    while True:
        value = await probe()
        if check(value):
            return value
        assert time.monotonic() < deadline, f"still {value!r}"
        await asyncio.sleep(0.05)


def gateway_settings(**extra: Any) -> tuple[int, dict[str, Any]]:
    """A free port and the agent's ``http:`` section listening on it."""
    port = free_port()
    return port, {"listen": f"127.0.0.1:{port}", **extra}


def _job(host: Host, message: Message) -> dict[str, Any] | None:
    if not message.topic.startswith(host.topics.job("")) or not message.payload:
        return None
    job: dict[str, Any] = json.loads(message.payload)
    return job
