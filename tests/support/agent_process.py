"""Run the real agent as a child process, as an operator would."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]


def write_agent_config(
    path: Path,
    *,
    broker_url: str,
    host_id: str,
    prefix: str,
    gpus: int = 1,
    memory_total_mb: int = 32768,
    interval_s: float = 1.0,
    models: dict[str, Any] | None = None,
    lifecycle: dict[str, Any] | None = None,
    http: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    config: dict[str, Any] = {
        "host_id": host_id,
        "prefix": prefix,
        "state_dir": str(path.parent / "state"),
        "broker": {"url": broker_url, "reconnect_min_s": 0.05, "reconnect_max_s": 0.5},
        "telemetry": {"interval_s": interval_s},
        "gpu": {
            "backend": "sim",
            "sim": {
                "release_delay_s": 0.1,
                "gpus": [
                    {"name": f"Sim GPU {i}", "memory_total_mb": memory_total_mb}
                    for i in range(gpus)
                ],
            },
        },
    }
    if models:
        config["models"] = models
    config["lifecycle"] = {
        "vram_wait_timeout_s": 10,
        "monitor_interval_s": 0.2,
        **(lifecycle or {}),
    }
    # Off unless a test asks for the gateway: agents of tests running side by side would
    # otherwise all want the default port.
    config["http"] = http or {"listen": None}
    for key, value in (extra or {}).items():
        config[key] = value
    path.write_text(yaml.safe_dump(config))
    return path


class AgentProcess:
    def __init__(
        self,
        config: Path,
        *args: str,
        env: dict[str, str] | None = None,
        module: str = "modelbus",
    ) -> None:
        self.log = config.parent / "agent.log"
        self.state_dir = config.parent / "state"
        self._log_handle = self.log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, "agent", "--config", str(config), *args],
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log_handle.close()
        stop_model_servers(self.state_dir)


def stop_model_servers(state_dir: Path) -> None:
    """Agents leave model servers running for the next agent to adopt; a test is
    over, so kill them through their pid files (their own process groups)."""
    for pid_file in (state_dir / "pids").glob("*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            os.killpg(json.loads(pid_file.read_text())["pid"], signal.SIGKILL)
