"""Threshold alerts from a real agent on a simulated GPU: one event when VRAM use goes
above the threshold, the alert in the GPU's list while it lasts, one event when it clears."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from tests.support.agent_process import REPO_ROOT, AgentProcess
from tests.support.host import Host

pytestmark = pytest.mark.broker


def gpu_alerts(host: Host) -> list[str]:
    message = host.bus.latest(host.topics.gpu(0))
    assert message is not None
    alerts: list[str] = json.loads(message.payload)["alerts"]
    return alerts


async def test_vram_high_starts_once_shows_in_the_gpu_and_clears_once(
    start_host: Callable[..., AgentProcess], host: Host
) -> None:
    agent = start_host(
        {},
        interval_s=0.2,
        extra={"alerts": {"vram_high": {"above": 50, "clear_below": 40}}},
    )
    await host.online()
    state_file = agent.state_dir / "sim-gpus.bin"
    hog = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "modelbus", "sim", "alloc", "--state", str(state_file)],
        *["--mb", "20000"],
        cwd=REPO_ROOT,
    )
    try:
        started = await host.wait_event("vram_high")
        assert started["severity"] == "warning" and started["gpu"] == 0
        assert "above 50 %" in started["message"]
        await host.bus.wait_topic(host.topics.gpu(0), lambda v: "vram_high" in v["alerts"])
    finally:
        hog.send_signal(signal.SIGTERM)
        await hog.wait()
    cleared = await host.wait_event("vram_high_cleared")
    assert cleared["severity"] == "info" and "below 40 %" in cleared["message"]
    mark = len(host.bus.messages)
    await host.bus.wait_topic(host.topics.gpu(0), after=mark)
    # Once each, however many telemetry ticks the condition lasted.
    assert len(host.events("vram_high")) == 1
    assert len(host.events("vram_high_cleared")) == 1
    assert gpu_alerts(host) == []


@pytest.mark.parametrize(
    ("alerts", "words"),
    [
        ({"vram_high": {"above": 80, "clear_below": 90}}, "clear_below (90) must be below"),
        ({"temperature_high": {"above": 500, "clear_below": 80}}, "between 0 and 150"),
        ({"vram_high": {"for_s": -1}}, "alerts.vram_high.for_s"),
    ],
)
def test_impossible_alert_rules_stop_the_agent_with_one_line(
    tmp_path: Any, alerts: dict[str, Any], words: str
) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(json.dumps({"gpu": {"backend": "sim"}, "alerts": alerts}))
    result = subprocess.run(
        [sys.executable, "-m", "modelbus", "agent", "--config", str(config)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert words in result.stderr and result.stderr.count("\n") == 1, result.stderr
