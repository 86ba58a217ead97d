"""`modelbus demo` with its TUI, driven by keys in a real terminal (tmux), as a person would.

The demo's simulated model servers listen on the fixed ports 18101-18105, as in
test_demo.py; pytest runs tests one after the other and each test leaves nothing
behind, and this one checks the ports are free before it starts.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.broker import port_accepts
from tests.support.agent_process import REPO_ROOT

pytestmark = pytest.mark.skipif(
    shutil.which("tmux") is None, reason="tmux is not installed (bash .ci/run installs it)"
)

DEMO_MODEL_PORTS = range(18101, 18106)
WIDTH, HEIGHT = 100, 30
# tmux replaces what it thinks the terminal cannot show with "_" unless told UTF-8.
_UTF8 = {"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


class Tmux:
    """One tmux server of the test's own (a private socket), one session in it."""

    def __init__(self, socket: str) -> None:
        self.socket = socket
        self.session = "demo"

    def __call__(self, *args: str) -> str:
        result = subprocess.run(
            ["tmux", "-u", "-L", self.socket, "-f", "/dev/null", *args],
            capture_output=True,
            text=True,
            env={**os.environ, **_UTF8},
            timeout=10,
        )
        if result.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def start(self, command: str, cwd: Path) -> None:
        env = [arg for name, value in _UTF8.items() for arg in ("-e", f"{name}={value}")]
        self("new-session", "-d", "-s", self.session, "-x", str(WIDTH), "-y", str(HEIGHT),
             "-c", str(cwd), *env, command)  # fmt: skip

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", self.session)

    def last_screen(self) -> str:
        """The screen for a failure message; the session may be gone by then."""
        try:
            return self.screen()
        except AssertionError as exc:
            return str(exc)

    def keys(self, *keys: str) -> None:
        self("send-keys", "-t", self.session, *keys)

    def pane_pid(self) -> int:
        return int(self("display-message", "-p", "-t", self.session, "#{pane_pid}"))

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10)


def wait_until(
    condition: Callable[[], bool], *, timeout: float, what: str, show: Callable[[], str]
) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` s saying what the screen was."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}:\n{show()}")
        time.sleep(0.1)


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


def stopped(screen: str) -> list[str]:
    """The models the screen's table shows as stopped, top to bottom."""
    return re.findall(r"([\w.-]+)\s+○ stopped", screen)


def processes_matching(text: str) -> list[str]:
    listing = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in listing.splitlines() if text in line and "ps -ww" not in line]


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    server = Tmux(f"modelbus-test-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield server
    finally:
        server.kill()  # SIGHUP to the demo, which then stops what it started


def test_demo_tui_switches_a_model_by_keys_and_quits_cleanly(tmux: Tmux, tmp_path: Path) -> None:
    wait_until(
        lambda: not any(port_accepts(port) for port in DEMO_MODEL_PORTS),
        timeout=15,
        what="the demo's model ports 18101-18105 to be free (a demo still running?)",
        show=lambda: "\n".join(processes_matching("agent.simserver")),
    )
    exit_file = tmp_path / "exit"
    demo = shlex.join([sys.executable, "-m", "agent", "demo"])
    tmux.start(f"sh -c {shlex.quote(f'{demo}; echo $? > {exit_file}')}", REPO_ROOT)
    shell = tmux.pane_pid()
    started: dict[int, str] = {}
    try:
        demo_models = ["infinitetalk", "ovi-11b", "qwen3-vl-30b", "wan2.1-14b", "whisperx"]

        def dashboard_up() -> bool:
            screen = tmux.screen()
            return "GPU0 [" in screen and stopped(screen) == demo_models

        wait_until(
            dashboard_up,
            timeout=60,
            what="the VRAM bar and the five demo models, stopped, sorted by name",
            show=tmux.last_screen,
        )

        # The models table has focus, cursor on the first row: the third is qwen3-vl-30b.
        tmux.keys("Down", "Down", "s")
        wait_until(
            lambda: "Switch demo to qwen3-vl-30b" in tmux.screen(),
            timeout=20,
            what="the switch confirmation",
            show=tmux.last_screen,
        )
        tmux.keys("y")
        wait_until(
            lambda: re.search(r"qwen3-vl-30b\s+● ready", tmux.screen()) is not None,
            timeout=30,
            what="qwen3-vl-30b to be ready in the models table",
            show=tmux.last_screen,
        )
        wait_until(
            lambda: re.search(r"[█▓▆▚▞▇] qwen3-vl-30b \d+\.\dG", tmux.screen()) is not None,
            timeout=10,
            what="qwen3-vl-30b in the VRAM bar's legend",
            show=tmux.last_screen,
        )
        started = descendants(shell)
        assert any("agent.simserver" in args for args in started.values()), started
        configs = [re.search(r"--config (\S+)/agent\.yaml", a) for a in started.values()]
        workdirs = {m.group(1) for m in configs if m is not None}
        assert len(workdirs) == 1, started
        (workdir,) = workdirs

        tmux.keys("q")
        wait_until(
            lambda: exit_file.exists() and exit_file.read_text().strip() != "",
            timeout=30,
            what="the demo to exit after q",
            show=tmux.last_screen,
        )
        assert exit_file.read_text().strip() == "0", tmux.last_screen()
        wait_until(
            lambda: not alive(started),
            timeout=10,
            what="everything the demo started to stop",
            show=lambda: "\n".join(alive(started).values()),
        )
        assert processes_matching(workdir) == []
        assert not Path(workdir).exists(), f"the demo left {workdir} behind"
        assert not any(port_accepts(port) for port in DEMO_MODEL_PORTS)
    finally:
        if not started:
            started = descendants(shell)
        tmux.kill()
        _reap(started)


def _reap(pids: dict[int, str], timeout: float = 15) -> None:
    """After a failure: give the demo time to stop what it started, then kill what is left."""
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in alive(pids):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
