"""`modelbus demo --headless`, as the README's first command runs it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from devtools.brokers import free_port, port_accepts
from shared.messages import Reply
from shared.topics import HostTopics
from tests.support.agent_process import REPO_ROOT
from tests.support.bus import watch
from tests.support.host import Host

pytestmark = pytest.mark.broker

# Where the README's `pip install -e .` puts the `modelbus` command the demo's lines name.
SCRIPTS = Path(sys.executable).parent


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the developer's own MODELBUS_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELBUS_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def descendants(root: int) -> dict[int, str]:
    """Every live process under ``root`` (pid -> command line), ``root`` included."""
    listing = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True, check=True
    ).stdout
    children: dict[int, list[int]] = {}
    args: dict[int, str] = {}
    for line in listing.splitlines():
        parts = line.split(None, 2)
        if len(parts) < 2:
            continue
        pid, ppid = int(parts[0]), int(parts[1])
        children.setdefault(ppid, []).append(pid)
        args[pid] = parts[2] if len(parts) == 3 else ""
    found: dict[int, str] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in args and pid not in found:
            found[pid] = args[pid]
            todo.extend(children.get(pid, []))
    return found


def alive(pids: dict[int, str]) -> dict[int, str]:
    """Those of ``pids`` still running the same command (not reused, not zombies)."""
    left: dict[int, str] = {}
    for pid, command in pids.items():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        state = stat.rsplit(")", 1)[1].split()[0]
        if state != "Z" and cmdline.startswith(command[:40]):
            left[pid] = command
    return left


def reap(pids: dict[int, str], timeout: float = 15) -> None:
    """After a failure: give the demo time to stop what it started, then kill what is left."""
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in alive(pids):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def wait_until(condition: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def workdir_of(started: dict[int, str]) -> Path:
    """The demo's working directory, from its agent's ``--config DIR/agent.yaml``."""
    found = {m.group(1) for a in started.values() if (m := re.search(r"--config (\S+)/agent", a))}
    assert len(found) == 1, started
    return Path(found.pop())


class Demo:
    """One ``modelbus demo --headless`` and every line it printed, read as they come."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "modelbus", "demo", "--headless", *args],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env or clean_env(),
        )
        self.output: list[str] = []
        self._arrived = threading.Condition()
        self._ended = False
        self._started: dict[int, str] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._arrived:
                self.output.append(line.rstrip("\n"))
                self._arrived.notify_all()
        with self._arrived:
            self._ended = True
            self._arrived.notify_all()

    def wait_line(self, predicate: Callable[[str], bool], *, timeout: float, what: str) -> str:
        """The first printed line that satisfies ``predicate``."""

        def find() -> str | None:
            return next((line for line in self.output if predicate(line)), None)

        with self._arrived:
            self._arrived.wait_for(lambda: find() is not None or self._ended, timeout)
            line = find()
        if line is None:
            printed = "\n".join(self.output[-40:])
            raise AssertionError(
                f"no line with {what} within {timeout:.0f} s; it printed:\n{printed}"
            )
        return line

    def all_output(self, timeout: float = 10) -> list[str]:
        """Every line, once the demo has closed its output."""
        with self._arrived:
            self._arrived.wait_for(lambda: self._ended, timeout)
            assert self._ended, "the demo's output is still open"
            return list(self.output)

    def instructions(self, timeout: float = 60) -> dict[str, str]:
        """The ``  name: line`` pairs the demo prints once its agent is online."""
        self.wait_line(lambda line: line.startswith("Press Ctrl-C"), timeout=timeout, what="Ctrl-C")
        start = next(i for i, line in enumerate(self.output) if line.startswith("modelbus demo: "))
        end = next(i for i, line in enumerate(self.output) if line.startswith("Press Ctrl-C"))
        pairs = (line.strip().partition(":") for line in self.output[start + 1 : end])
        self._started = descendants(self.process.pid)
        return {name: value.strip() for name, _, value in pairs}

    @property
    def url(self) -> str:
        header = next(line for line in self.output if line.startswith("modelbus demo: broker"))
        match = re.search(r"broker (mqtt://127\.0\.0\.1:\d+)", header)
        assert match is not None, header
        return match.group(1)

    @property
    def port(self) -> int:
        port = urlsplit(self.url).port
        assert port is not None
        return port

    def started(self) -> dict[int, str]:
        """What the demo had started when its instructions came out."""
        assert self._started, "call instructions() first"
        return self._started

    def run_line(
        self, line: str, *, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """A printed command line, pasted into a shell where `modelbus` is installed."""
        env = env or clean_env()
        env = {**env, "PATH": f"{SCRIPTS}{os.pathsep}{env.get('PATH', '')}"}
        return subprocess.run(
            ["sh", "-c", line], capture_output=True, text=True, env=env, timeout=timeout
        )

    def interrupt(self, timeout: float = 30) -> int:
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout)

    def close(self) -> None:
        started = self._started or descendants(self.process.pid)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        reap(started)


@pytest.fixture
def start_demo() -> Iterator[Callable[..., Demo]]:
    demos: list[Demo] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Demo:
        demo = Demo(*args, env=env)
        demos.append(demo)
        return demo

    yield start
    for demo in demos:
        demo.close()


async def ask_demo(port: int, command: str, payload: dict[str, Any], timeout: float = 40) -> Reply:
    """One command to the demo's agent over its broker, as any MQTT 5 client sends it."""
    topics = HostTopics("modelbus", "demo")
    async with watch(port, topics.reply_filter) as bus:
        return await Host(bus, topics, "modelbus").ask(command, payload, timeout=timeout)


def service_port(reply: Reply) -> int:
    assert reply.status == "ok", reply
    assert reply.data is not None
    port = urlsplit(reply.data["job"]["result"]["service"]).port
    assert port is not None
    return port


def test_demo_switches_a_model_and_leaves_nothing_behind(start_demo: Callable[..., Demo]) -> None:
    demo = start_demo()
    lines = demo.instructions()
    assert "whisperx" in lines["models"]
    switch = shlex.split(lines["raw switch"])
    assert switch[0] == "mosquitto_rr"
    switch[-1] = json.dumps({"model": "whisperx", "wait": True})
    result = subprocess.run([*switch, "-W", "30"], capture_output=True, text=True, timeout=40)
    reply = json.loads(result.stdout)
    assert reply["status"] == "ok", reply
    assert reply["data"]["job"]["result"]["vram_used_mb"] == 6144
    model_port = urlsplit(reply["data"]["job"]["result"]["service"]).port
    assert model_port is not None and port_accepts(model_port)  # whisperx's server runs
    started, workdir = demo.started(), workdir_of(demo.started())
    assert demo.interrupt() == 0
    wait_until(lambda: not alive(started), timeout=15, what="everything the demo started to stop")
    assert not port_accepts(model_port)
    assert not port_accepts(demo.port)  # the broker is gone too
    assert not workdir.exists()


def test_headless_prints_modelbus_lines_that_work_when_pasted(
    start_demo: Callable[..., Demo],
) -> None:
    demo = start_demo()
    lines = demo.instructions()
    where = f"--broker {demo.url} --prefix modelbus --host demo"
    assert lines["status"] == f"modelbus status {where}"
    assert lines["switch"] == f"modelbus switch qwen3-vl-30b --wait {where}"
    assert lines["TUI"] == f"modelbus tui {where}"  # run in a terminal: test_demo_tmux.py
    status = demo.run_line(lines["status"])
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith("host demo ") and "qwen3-vl-30b" in status.stdout
    switch = demo.run_line(lines["switch"])
    assert switch.returncode == 0, switch.stderr
    assert "switch qwen3-vl-30b: succeeded" in switch.stdout.splitlines()[-1]
    after = demo.run_line(lines["status"])
    assert re.search(r"qwen3-vl-30b\s+ready", after.stdout), after.stdout


def test_the_printed_curl_line_loads_a_model_through_the_gateway(
    start_demo: Callable[..., Demo],
) -> None:
    demo = start_demo()
    line = demo.instructions()["gateway"]
    assert line.startswith("curl http://127.0.0.1:") and "qwen3-vl-30b" in line
    answered = demo.run_line(line)
    assert answered.returncode == 0, answered.stderr
    answer = json.loads(answered.stdout)
    assert answer["choices"][0]["message"]["content"] == "Simulated answer from qwen3-vl-30b."
    status = demo.run_line(demo.instructions()["status"])
    assert re.search(r"qwen3-vl-30b\s+ready", status.stdout), status.stdout


def test_demo_ignores_the_users_modelbus_environment(
    start_demo: Callable[..., Demo], tmp_path: Path
) -> None:
    """An exported MODELBUS_* (the user's real broker, host, prefix, state) must not pull
    the demo's agent off the demo's own broker, nor break the lines it prints."""
    elsewhere = clean_env(
        MODELBUS_BROKER=f"mqtt://127.0.0.1:{free_port()}",
        MODELBUS_HOST_ID="gpu1",
        MODELBUS_PREFIX="elsewhere",
        MODELBUS_STATE_DIR=str(tmp_path / "users-state"),
        MODELBUS_GPU_BACKEND="nvml",
    )
    demo = start_demo(env=elsewhere)
    lines = demo.instructions()
    status = demo.run_line(lines["status"], env=elsewhere)
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith("host demo ") and "sim GPUs" in status.stdout
    assert not (tmp_path / "users-state").exists()


def test_two_demos_run_side_by_side(start_demo: Callable[..., Demo]) -> None:
    first, second = start_demo(), start_demo()
    first.instructions()
    second.instructions()
    assert first.port != second.port
    replies = [
        asyncio.run(ask_demo(demo.port, "switch", {"model": "whisperx", "wait": True}))
        for demo in (first, second)
    ]
    ports = [service_port(reply) for reply in replies]
    assert ports[0] != ports[1], ports
    assert all(port_accepts(port) for port in ports)


def test_demo_stops_everything_and_exits_1_when_its_broker_dies(
    start_demo: Callable[..., Demo],
) -> None:
    demo = start_demo()
    demo.instructions()
    switch = asyncio.run(ask_demo(demo.port, "switch", {"model": "whisperx", "wait": True}))
    model_port = service_port(switch)
    started = descendants(demo.process.pid)
    workdir = workdir_of(started)
    (broker,) = [pid for pid, args in started.items() if args.split()[0].endswith("mosquitto")]
    os.kill(broker, signal.SIGKILL)
    try:
        code = demo.process.wait(30)
    except subprocess.TimeoutExpired:
        raise AssertionError("the demo still runs 30 s after its broker died") from None
    assert code == 1
    said = demo.all_output()[-1]  # after stopping everything, so nothing comes after it
    assert said.startswith("modelbus demo: its broker (mosquitto, mqtt://127.0.0.1:"), said
    assert "was killed by SIGKILL" in said and "stopped everything it started" in said, said
    wait_until(lambda: not alive(started), timeout=15, what="everything the demo started to stop")
    assert not port_accepts(model_port)
    assert not workdir.exists()


def test_demo_without_mosquitto_runs_on_the_embedded_broker(
    start_demo: Callable[..., Demo],
) -> None:
    """The development fallback: amqtt, MQTT 3.1.1; the agent falls back to it by itself."""
    demo = start_demo("--embedded-broker")
    lines = demo.instructions()
    assert any(
        "embedded amqtt broker (development fallback, MQTT 3.1.1 only)" in line
        for line in demo.output
    ), demo.output
    switch = shlex.split(lines["raw switch"])
    command_topic = switch[switch.index("-t") + 1]
    try:
        reply = asyncio.run(_switch_over_311(demo.port, command_topic, switch))
    except AssertionError as missed:
        # The demo's own output (its agent's log among it) says where the command stopped.
        raise AssertionError(f"{missed}; the demo said: {list(demo.output)[-40:]}") from None
    assert reply["status"] == "ok", reply
    assert reply["data"]["job"]["result"]["vram_used_mb"] == 6144
    status = demo.run_line(lines["status"])  # the modelbus client falls back to 3.1.1 too
    assert status.returncode == 0, status.stderr
    assert re.search(r"whisperx\s+ready", status.stdout), status.stdout
    started = demo.started()
    assert demo.interrupt() == 0
    wait_until(lambda: not alive(started), timeout=15, what="everything the demo started to stop")
    assert not port_accepts(demo.port)


async def _switch_over_311(port: int, command_topic: str, printed: list[str]) -> Any:
    """Send the printed mosquitto_pub line (for whisperx, waiting) once subscribed to the
    reply: mosquitto_rr needs MQTT 5, a 3.1.1 client reads P/H/reply/<command>."""
    reply_topic = command_topic.replace("/cmd/", "/reply/")
    async with watch(port, reply_topic, protocol="3.1.1") as bus:
        command = [*printed[:-1], json.dumps({"model": "whisperx", "wait": True})]
        await asyncio.to_thread(subprocess.run, command, check=True, timeout=10)
        message = await bus.wait_topic(reply_topic, lambda _: True, timeout=30)
    return json.loads(message.payload)
