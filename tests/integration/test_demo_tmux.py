"""`modelbus demo` with its TUI, driven by keys in a real terminal (tmux), as a person would."""

from __future__ import annotations

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

from devtools.brokers import free_port
from tests.integration.test_demo import (
    SCRIPTS,
    Demo,
    alive,
    clean_env,
    descendants,
    reap,
    workdir_of,
)
from tests.support.agent_process import REPO_ROOT

pytestmark = pytest.mark.skipif(
    shutil.which("tmux") is None, reason="tmux is not installed (bash .ci/run installs it)"
)

DEMO_MODELS = ["infinitetalk", "ovi-11b", "qwen3-vl-30b", "wan2.1-14b", "whisperx"]
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
            env={**clean_env(), **_UTF8},
            timeout=10,
        )
        if result.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def start(self, command: str, cwd: Path, env: dict[str, str] | None = None) -> None:
        """Run ``command`` in a new session, with ``env`` added to the server's environment."""
        values = {**_UTF8, **(env or {})}
        env_args = [arg for name, value in values.items() for arg in ("-e", f"{name}={value}")]
        self("new-session", "-d", "-s", self.session, "-x", str(WIDTH), "-y", str(HEIGHT),
             "-c", str(cwd), *env_args, command)  # fmt: skip

    def keep_after_exit(self) -> None:
        """Keep the pane, and what was last written on it, after its command exits."""
        self("set-option", "-w", "-t", self.session, "remain-on-exit", "on")

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", self.session)

    def lines(self) -> list[str]:
        """The screen's lines, those the terminal wrapped joined again."""
        return self("capture-pane", "-p", "-J", "-t", self.session).splitlines()

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


def exit_code(exit_file: Path, tmux: Tmux, what: str) -> str:
    """The exit code a shell wrote to ``exit_file`` once ``what`` happened."""
    wait_until(
        lambda: exit_file.exists() and exit_file.read_text().strip() != "",
        timeout=30,
        what=what,
        show=tmux.last_screen,
    )
    return exit_file.read_text().strip()


def wait_until(
    condition: Callable[[], bool], *, timeout: float, what: str, show: Callable[[], str]
) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` s saying what the screen was."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}:\n{show()}")
        time.sleep(0.1)


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


def wait_for_dashboard(tmux: Tmux) -> None:
    def dashboard_up() -> bool:
        screen = tmux.screen()
        return "GPU0 [" in screen and stopped(screen) == DEMO_MODELS

    wait_until(
        dashboard_up,
        timeout=60,
        what="the VRAM bar and the five demo models, stopped, sorted by name",
        show=tmux.last_screen,
    )


def start_demo_tui(tmux: Tmux, tmp_path: Path, env: dict[str, str]) -> Path:
    """``modelbus demo`` in the tmux session; the file its exit code goes to. (Its stderr
    stays on the terminal: the TUI itself is drawn on stderr.)"""
    exit_file = tmp_path / "exit"
    demo = shlex.join([sys.executable, "-m", "modelbus", "demo"])
    shell = f"{demo}; echo $? > {shlex.quote(str(exit_file))}"
    tmux.start(f"sh -c {shlex.quote(shell)}", REPO_ROOT, env)
    return exit_file


def test_demo_tui_switches_a_model_by_keys_and_quits_cleanly(tmux: Tmux, tmp_path: Path) -> None:
    # Settings the user exported for their real bus must not steer the demo's agent or TUI.
    users_bus = {
        "MODELBUS_BROKER": f"mqtt://127.0.0.1:{free_port()}",
        "MODELBUS_HOST_ID": "gpu1",
        "MODELBUS_PREFIX": "elsewhere",
        "MODELBUS_STATE_DIR": str(tmp_path / "users-state"),
    }
    exit_file = start_demo_tui(tmux, tmp_path, users_bus)
    shell = tmux.pane_pid()
    started: dict[int, str] = {}
    try:
        wait_for_dashboard(tmux)

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
        assert any("devtools.simserver" in args for args in started.values()), started
        workdir = workdir_of(started)

        # A switch to wan2.1-14b (5 s to load) cancelled half-way with c, without first
        # moving to the jobs table: the confirmation names the job, the job ends
        # cancelled, and qwen3-vl-30b, evicted for it, comes back.
        tmux.keys("Down", "s")
        wait_until(
            lambda: "Switch demo to wan2.1-14b" in tmux.screen(),
            timeout=20,
            what="the switch confirmation for wan2.1-14b",
            show=tmux.last_screen,
        )
        tmux.keys("y")
        wait_until(
            lambda: re.search(r"wan2\.1-14b\s+◐ loading", tmux.screen()) is not None,
            timeout=30,
            what="wan2.1-14b to be loading",
            show=tmux.last_screen,
        )
        tmux.keys("c")
        wait_until(
            lambda: "Cancel switch wan2.1-14b (job " in " ".join(tmux.lines()),
            timeout=20,
            what="the cancel confirmation naming the switch",
            show=tmux.last_screen,
        )
        tmux.keys("y")
        wait_until(
            lambda: re.search(r"switch wan2\.1-14b\s+⊘ cancelled", tmux.screen()) is not None,
            timeout=30,
            what="the switch to show cancelled in the jobs table",
            show=tmux.last_screen,
        )
        wait_until(
            lambda: re.search(r"qwen3-vl-30b\s+● ready", tmux.screen()) is not None,
            timeout=30,
            what="qwen3-vl-30b, evicted for the cancelled switch, to be ready again",
            show=tmux.last_screen,
        )
        assert re.search(r"wan2\.1-14b\s+○ stopped", tmux.screen()), tmux.screen()
        started = descendants(shell)

        tmux.keys("q")
        assert exit_code(exit_file, tmux, "the demo to exit after q") == "0", tmux.last_screen()
        wait_until(
            lambda: not alive(started),
            timeout=10,
            what="everything the demo started to stop",
            show=lambda: "\n".join(alive(started).values()),
        )
        assert processes_matching(str(workdir)) == []
        assert not workdir.exists(), f"the demo left {workdir} behind"
        assert not (tmp_path / "users-state").exists()
    finally:
        if not started:
            started = descendants(shell)
        tmux.kill()
        reap(started)


def test_demo_tui_says_so_stops_everything_and_exits_1_when_its_broker_dies(
    tmux: Tmux, tmp_path: Path
) -> None:
    exit_file = start_demo_tui(tmux, tmp_path, {})
    tmux.keep_after_exit()  # to read the demo's last word on the terminal
    shell = tmux.pane_pid()
    started: dict[int, str] = {}
    try:
        wait_for_dashboard(tmux)
        started = descendants(shell)
        workdir = workdir_of(started)
        (broker,) = [pid for pid, args in started.items() if args.split()[0].endswith("mosquitto")]
        os.kill(broker, signal.SIGKILL)
        assert exit_code(exit_file, tmux, "the demo to exit after its broker died") == "1"
        said = next((line for line in tmux.lines() if line.startswith("modelbus demo:")), "")
        assert said.startswith("modelbus demo: its broker (mosquitto, mqtt://127.0.0.1:"), said
        assert "was killed by SIGKILL" in said and "stopped everything it started" in said, said
        wait_until(
            lambda: not alive(started),
            timeout=15,
            what="everything the demo started to stop",
            show=lambda: "\n".join(alive(started).values()),
        )
        assert not workdir.exists(), f"the demo left {workdir} behind"
    finally:
        if not started:
            started = descendants(shell)
        tmux.kill()
        reap(started)


def test_the_tui_line_the_headless_demo_prints_shows_the_demo(tmux: Tmux, tmp_path: Path) -> None:
    demo = Demo(env=clean_env())
    try:
        line = demo.instructions()["TUI"]
        exit_file = tmp_path / "exit"
        # As pasted into a shell where `modelbus` is installed (tmux resets PATH itself).
        path = f"PATH={shlex.quote(str(SCRIPTS))}{os.pathsep}$PATH"
        shell = f"{path}; {line}; echo $? > {shlex.quote(str(exit_file))}"
        tmux.start(f"sh -c {shlex.quote(shell)}", REPO_ROOT)
        wait_for_dashboard(tmux)
        assert "demo" in tmux.screen()
        tmux.keys("q")
        assert exit_code(exit_file, tmux, "the TUI to exit after q") == "0"
        assert demo.process.poll() is None  # quitting a TUI leaves the demo running
    finally:
        demo.close()
