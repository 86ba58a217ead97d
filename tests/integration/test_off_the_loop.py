"""The known blocking calls (SQLite, NVML, deleting files, log files, the docker SDK) run off the
event loop's thread, where a slow disk or a hung dockerd cannot freeze keepalive,
telemetry and every other command. Each call is recorded where it runs, not timed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from devtools.brokers import MosquittoBroker
from tests.integration.conftest import HOST
from tests.support.agent_process import AgentProcess, write_agent_config
from tests.support.host import Host
from tests.support.models import plain_http_model

pytestmark = pytest.mark.broker


def watched_agent(
    tmp_path: Path, broker: MosquittoBroker, prefix: str, models: dict[str, Any]
) -> tuple[AgentProcess, Path]:
    config = write_agent_config(
        tmp_path / "agent.yaml",
        broker_url=broker.url,
        host_id=HOST,
        prefix=prefix,
        models=models,
        extra={"gpu": {"backend": "nvml"}},
    )
    record = tmp_path / "loop-calls.json"
    agent = AgentProcess(
        config,
        module="tests.support.loop_watch_agent",
        env={"MODELBUS_TEST_LOOP_CALLS": str(record)},
    )
    return agent, record


async def test_sqlite_nvml_and_deletions_run_off_the_loop(
    broker: MosquittoBroker, prefix: str, tmp_path: Path, host: Host
) -> None:
    models = {"alpha": plain_http_model(2048)}
    agent, record = watched_agent(tmp_path, broker, prefix, models)
    # Weights left half-downloaded: uninstalling them deletes a tree.
    partial = tmp_path / "state" / "weights" / "leftover"
    (partial / "sub").mkdir(parents=True)
    (partial / "sub" / "shard.safetensors").write_bytes(b"\0" * 4096)
    try:
        await host.online()
        for command, payload in [
            ("load", {"model": "alpha", "wait": True}),
            ("status", {}),
            ("logs", {"model": "alpha"}),
            ("history", {}),
            ("unload", {"model": "alpha", "wait": True}),
            ("logs", {"model": "alpha", "lines": 5}),
            ("uninstall", {"name": "leftover"}),
        ]:
            reply = await host.ask(command, payload)
            assert reply.status == "ok", reply
        assert not partial.exists()
        assert agent.terminate() == 0, agent.output()
    finally:
        agent.close()
    seen = json.loads(record.read_text())
    # The watch saw each kind of call (so an empty list below means something)...
    assert {"sqlite", "nvml", "delete", "logfile"} <= set(seen["calls"]), seen
    # ...and none of them on the event loop's thread.
    assert seen["on_loop"] == []
