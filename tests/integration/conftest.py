"""Fixtures of the integration tests: a real agent process on the session broker
(``start_host``) and a client watching and commanding it (``host``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.brokers import MosquittoBroker
from shared.topics import HostTopics
from tests.conftest import TEST_USERS
from tests.support.agent_process import AgentProcess, write_agent_config
from tests.support.bus import BusWatcher, watch
from tests.support.host import Host
from tests.support.models import sim_model

HOST = "lab"


@pytest.fixture
def start_host(
    broker: MosquittoBroker, prefix: str, tmp_path: Path
) -> Iterator[Callable[..., AgentProcess]]:
    agents: list[AgentProcess] = []

    def start(models: dict[str, Any], *, module: str = "modelbus", **options: Any) -> AgentProcess:
        """Write a config for host ``lab`` and start ``python -m <module> agent`` on it."""
        config = write_agent_config(
            tmp_path / "agent.yaml",
            broker_url=broker.url,
            host_id=HOST,
            prefix=prefix,
            models=models,
            **options,
        )
        agent = AgentProcess(config, module=module)
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
    async with watch(broker.port, topics.everything_filter) as bus:
        yield Host(bus, topics, prefix)


# -- the shipped ACL's names: the broker's password listener, user and host gpu1 ----------

ACL_HOST = HostTopics("modelbus", "gpu1")


@pytest.fixture
async def observer(broker: MosquittoBroker) -> AsyncIterator[BusWatcher]:
    """Sees every message on the broker: the anonymous listener shares the broker, not the ACL."""
    async with watch(broker.port, "#") as bus:
        yield bus


@pytest.fixture
async def gpu1(
    broker: MosquittoBroker, observer: BusWatcher, tmp_path: Path
) -> AsyncIterator[AgentProcess]:
    """The agent of the ACL's agent role: user gpu1, host gpu1, prefix modelbus, one
    catalog model (whisperx)."""
    config = write_agent_config(
        tmp_path / "agent.yaml",
        broker_url=f"mqtt://gpu1:{TEST_USERS['gpu1']}@127.0.0.1:{broker.auth_port}",
        host_id="gpu1",
        prefix="modelbus",
        models={"whisperx": sim_model(6144)},
    )
    agent = AgentProcess(config)
    try:
        # A live "online" (not the retained one of an earlier agent).
        await observer.wait_for(
            lambda m: m.topic == ACL_HOST.status and m.payload == b"online" and not m.retain,
            timeout=20,
            what="gpu1 online",
        )
        yield agent
        running = agent.process.poll() is None
        assert agent.terminate() == 0 or not running, agent.output()
    finally:
        agent.close()
