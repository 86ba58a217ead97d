"""What the layers of docs/architecture.md promise at run time: ``modelbus agent`` on a
GPU host loads the daemon, the bus client and the contract, and nothing of the UI, the
development brokers or the simulator (lint-imports checks the code; this checks a
running process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devtools.brokers import MosquittoBroker
from tests.integration.conftest import HOST
from tests.support.agent_process import AgentProcess, write_agent_config
from tests.support.host import Host

pytestmark = pytest.mark.broker


async def test_the_daemon_on_a_gpu_host_loads_no_ui_no_dev_broker_no_simulator(
    broker: MosquittoBroker, prefix: str, tmp_path: Path, host: Host
) -> None:
    config = write_agent_config(
        tmp_path / "agent.yaml",
        broker_url=broker.url,
        host_id=HOST,
        prefix=prefix,
        extra={"gpu": {"backend": "nvml"}},
    )
    loaded = tmp_path / "modules.json"
    agent = AgentProcess(
        config, module="tests.support.nvml_agent", env={"MODELBUS_TEST_MODULES": str(loaded)}
    )
    try:
        await host.online()
        status = await host.ask("status")  # a command through every layer and back
        assert status.data is not None and status.data["info"]["gpu_backend"] == "nvml"
        assert agent.terminate() == 0, agent.output()
    finally:
        agent.close()
    modules = set(json.loads(loaded.read_text()))
    # It really ran the daemon on NVML, over the bus client...
    assert {"agent.service", "agent.gpu.nvml", "bus.mqtt", "shared.messages"} <= modules
    # ...and loaded none of these.
    unwanted = {"textual", "amqtt", "devtools", "tui"}
    assert sorted(m for m in modules if m.split(".")[0] in unwanted) == []
