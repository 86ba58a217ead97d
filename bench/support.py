"""What the benches share: a simulated model server's catalog entry, an agent's
configuration around it, stopping that agent and its servers, waiting for its HTTP
server, and a process's CPU time."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from devtools.brokers import MosquittoBroker, free_port
from tests.support.agent_process import stop_model_servers

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def sim_model(vram_mb: int, *extra: str, load_s: float, **spec: Any) -> dict[str, Any]:
    """A catalog entry for devtools.simserver holding ``vram_mb``, loading in ``load_s``."""
    argv = [sys.executable, "-m", "devtools.simserver", "--port", "${PORT}", "--model"]
    argv += ["${MODEL}", "--gpus", "${GPUS}", "--vram-mb", str(vram_mb), "--load-s", str(load_s)]
    entry: dict[str, Any] = {
        "runtime": "process",
        "process": {"argv": [*argv, *extra]},
        "port": free_port(),
        "vram_mb": vram_mb,
    }
    return {**entry, **spec}


def agent_config(
    workdir: Path,
    broker: MosquittoBroker,
    prefix: str,
    *,
    gpus: list[dict[str, Any]],
    listen: str | None,
    **sections: Any,
) -> dict[str, Any]:
    """An agent on simulated ``gpus``, quiet in its log, with its state under ``workdir``;
    ``sections`` add to (or replace) the configuration's top-level sections."""
    config: dict[str, Any] = {
        "host_id": "bench",
        "prefix": prefix,
        "state_dir": str(workdir / prefix),
        "log_level": "warning",
        "broker": {"url": broker.url},
        "gpu": {"backend": "sim", "sim": {"release_delay_s": 0.0, "gpus": gpus}},
        "http": {"listen": listen},
    }
    return {**config, **sections}


def stop_agent(agent: subprocess.Popen[bytes], config: Path, timeout_s: float = 30) -> None:
    """SIGTERM the agent started with ``config``, then its model servers, which an agent
    leaves running for the next one to adopt (each bench run left its servers behind)."""
    agent.send_signal(signal.SIGTERM)
    agent.wait(timeout_s)
    stop_model_servers(Path(yaml.safe_load(config.read_text())["state_dir"]))


def cpu_seconds(pid: int) -> float:
    """User and system time of ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


async def http_up(web: aiohttp.ClientSession, root: str) -> None:
    """Until the agent at ``root`` (``http://host:port``) answers HTTP."""
    deadline = time.monotonic() + 30
    while True:
        try:
            async with web.get(f"{root}/healthz") as probe:
                if probe.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        assert time.monotonic() < deadline, "the agent's HTTP server did not come up"
        await asyncio.sleep(0.1)
