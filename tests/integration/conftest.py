"""Fixtures of the integration tests: a real agent process on the session broker
(``start_host``) and a client watching and commanding it (``host``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.broker import MosquittoBroker
from shared.topics import HostTopics
from tests.support.agent_process import AgentProcess, write_agent_config
from tests.support.bus import watch
from tests.support.host import Host

HOST = "lab"


@pytest.fixture
def start_host(
    broker: MosquittoBroker, prefix: str, tmp_path: Path
) -> Iterator[Callable[..., AgentProcess]]:
    agents: list[AgentProcess] = []

    def start(models: dict[str, Any], **options: Any) -> AgentProcess:
        config = write_agent_config(
            tmp_path / "agent.yaml",
            broker_url=broker.url,
            host_id=HOST,
            prefix=prefix,
            models=models,
            **options,
        )
        agent = AgentProcess(config)
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        try:
            running = agent.process.poll() is None
            code = agent.terminate()
            # A clean shutdown, every time: a hang here once hid a swallowed cancel.
            assert code == 0 or not running, agent.output()
        finally:
            agent.close()


@pytest.fixture
async def host(broker: MosquittoBroker, prefix: str) -> AsyncIterator[Host]:
    topics = HostTopics(prefix, HOST)
    async with watch(broker.port, topics.everything_filter, f"{prefix}/reply/#") as bus:
        yield Host(bus, topics, prefix)
