"""`modelbus demo --headless`, as the README's first command runs it."""

from __future__ import annotations

import asyncio
import json
import shlex
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from agent.broker import port_accepts
from tests.support.agent_process import REPO_ROOT
from tests.support.bus import watch

pytestmark = pytest.mark.broker


def processes_matching(text: str) -> list[str]:
    listing = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in listing.splitlines() if text in line and "ps -eo" not in line]


def test_demo_switches_a_model_and_leaves_nothing_behind() -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "agent", "demo", "--headless"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert demo.stdout is not None
    try:
        lines: dict[str, str] = {}
        deadline = time.monotonic() + 30
        while "switch" not in lines and time.monotonic() < deadline:
            line = demo.stdout.readline()
            if ":" in line and line.startswith("  "):
                key, _, value = line.strip().partition(":")
                lines[key] = value.strip()
        assert "switch" in lines, lines
        assert "whisperx" in lines["models"]
        port = shlex.split(lines["switch"])[4]
        switch = shlex.split(lines["switch"])
        switch[-1] = json.dumps({"model": "whisperx", "wait": True})
        result = subprocess.run([*switch, "-W", "30"], capture_output=True, text=True, timeout=40)
        reply = json.loads(result.stdout)
        assert reply["status"] == "ok", reply
        assert reply["data"]["job"]["result"]["vram_used_mb"] == 6144
        assert processes_matching("--port 18102")  # whisperx's simulated server runs
    finally:
        demo.send_signal(signal.SIGINT)
        code = demo.wait(30)
    assert code == 0
    assert processes_matching("agent.simserver --port 18102") == []
    assert not port_accepts(int(port))  # the broker is gone too


def test_demo_without_mosquitto_runs_on_the_embedded_broker() -> None:
    """The development fallback: amqtt, MQTT 3.1.1; the agent falls back to it by itself."""
    demo = subprocess.Popen(
        [sys.executable, "-m", "agent", "demo", "--headless", "--embedded-broker"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert demo.stdout is not None
    try:
        output: list[str] = []
        deadline = time.monotonic() + 30
        while not any(line.startswith("  switch:") for line in output):
            assert time.monotonic() < deadline, output
            output.append(demo.stdout.readline())
        assert any(
            "embedded amqtt broker (development fallback, MQTT 3.1.1 only)" in line
            for line in output
        ), output
        switch = shlex.split(next(line for line in output if line.startswith("  switch:"))[9:])
        port = int(switch[switch.index("-p") + 1])
        command_topic = switch[switch.index("-t") + 1]
        reply = asyncio.run(_switch_over_311(port, command_topic, switch))
        assert reply["status"] == "ok", reply
        assert reply["data"]["job"]["result"]["vram_used_mb"] == 6144
    finally:
        demo.send_signal(signal.SIGINT)
        code = demo.wait(30)
    assert code == 0
    assert processes_matching("agent.simserver --port 18102") == []
    assert processes_matching("agent.embedded_broker") == []
    assert not port_accepts(port)


async def _switch_over_311(port: int, command_topic: str, printed: list[str]) -> Any:
    """Send the printed mosquitto_pub line (for whisperx, waiting) once subscribed to the
    reply: mosquitto_rr needs MQTT 5, a 3.1.1 client reads P/H/reply/<command>."""
    reply_topic = command_topic.replace("/cmd/", "/reply/")
    async with watch(port, reply_topic, protocol="3.1.1") as bus:
        command = [*printed[:-1], json.dumps({"model": "whisperx", "wait": True})]
        await asyncio.to_thread(subprocess.run, command, check=True, timeout=10)
        message = await bus.wait_topic(reply_topic, lambda _: True, timeout=30)
    return json.loads(message.payload)
