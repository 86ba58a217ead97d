"""`modelbus demo --headless`, as the README's first command runs it."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time

import pytest

from agent.broker import port_accepts
from tests.support.agent_process import REPO_ROOT

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
