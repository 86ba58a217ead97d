"""``modelbus demo``: a private broker and a simulated-GPU agent on this machine.

Everything it starts is a child of this process and is stopped when it exits,
so a demo leaves nothing behind. It owns its broker, host, prefix, state and ports:
the user's exported ``MODELBUS_*`` settings (meant for their real bus) are kept from its
agent, and the model servers take free ports, so two demos can run side by side. When
its broker or its agent dies the demo says which, stops the rest and exits 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from devtools.brokers import BrokerError, MosquittoBroker, free_port
from devtools.embedded_broker import MOSQUITTO_DESCRIPTION, EmbeddedBroker, start_demo_broker

DEMO_HOST = "demo"
DEMO_PREFIX = "modelbus"
# How often the demo checks that its broker and its agent still run.
DEMO_POLL_S = 0.2


# The original VRAM budget table, on one simulated 32 GB GPU: name, MiB, load seconds
# (shortened from minutes), what it is.
# The demo's vLLM model speaks vLLM's sleep API: evicted, it sleeps (holding this much real
# host RAM) and wakes in WAKE_S instead of loading again.
SLEEPY = {"qwen3-vl-30b"}
SLEEP_RAM_MB = 32
WAKE_S = 0.5
DEMO_MODELS: tuple[tuple[str, int, float, str], ...] = (
    ("qwen3-vl-30b", 17408, 3.0, "Qwen3-VL 30B vision-language (vLLM: sleeps when evicted)"),
    ("whisperx", 6144, 1.5, "WhisperX speech recognition"),
    ("ovi-11b", 22528, 4.0, "Ovi 11B audio-video generation"),
    ("wan2.1-14b", 28672, 5.0, "Wan 2.1 14B video generation"),
    ("infinitetalk", 8192, 2.0, "InfiniteTalk talking-head video"),
)


def demo_catalog(
    ports: Sequence[int] | None = None, python: str = sys.executable
) -> dict[str, object]:
    """Simulated model servers (devtools.simserver) for the five demo models, on ``ports``
    (default: free ones, so that another demo or a real server keeps its own)."""
    ports = list(ports) if ports is not None else [free_port() for _ in DEMO_MODELS]
    models: dict[str, object] = {}
    for port, (name, vram_mb, load_s, description) in zip(ports, DEMO_MODELS, strict=True):
        argv = [python, "-m", "devtools.simserver", "--port", "${PORT}", "--model", "${MODEL}"]
        argv += ["--gpus", "${GPUS}", "--vram-mb", str(vram_mb), "--load-s", str(load_s)]
        entry: dict[str, object] = {
            "runtime": "process",
            "process": {"argv": argv},
            "port": port,
            "vram_mb": vram_mb,
            "description": description,
            "stop_timeout_s": 5,
            "load_timeout_s": 60,
        }
        if name in SLEEPY:
            argv += ["--sleep-api", "vllm", "--sleep-ram-mb", str(SLEEP_RAM_MB)]
            argv += ["--wake-s", str(WAKE_S)]
            # Until its first sleep measures it: what the server holds, and its interpreter.
            entry |= {"sleep": "vllm", "sleep_ram_mb": SLEEP_RAM_MB + 64}
        models[name] = entry
    return models


def demo_config(
    broker_url: str,
    state_dir: Path,
    catalog: dict[str, object] | None = None,
    *,
    gateway_port: int | None = None,
) -> dict[str, object]:
    return {
        "host_id": DEMO_HOST,
        "prefix": DEMO_PREFIX,
        "state_dir": str(state_dir),
        "broker": {"url": broker_url},
        "gpu": {
            "backend": "sim",
            "sim": {
                "release_delay_s": 0.5,
                "gpus": [
                    {
                        "name": "Simulated RTX 5090 32GB",
                        "memory_total_mb": 32768,
                        # a desktop session and a stray notebook: memory modelbus does not own
                        "foreign_mb": 1024,
                        "power_limit_w": 575,
                    }
                ],
            },
        },
        "models": catalog if catalog is not None else demo_catalog(),
        # On a free port of its own, so two demos (or a real agent) can run side by side.
        "http": {"listen": f"127.0.0.1:{gateway_port}" if gateway_port else None},
    }


def _agent_env() -> dict[str, str]:
    """This environment without ``MODELBUS_*``: the agent reads those over its config file,
    and what a user exported is for their real bus, not the demo's."""
    kept = {name: value for name, value in os.environ.items() if not name.startswith("MODELBUS_")}
    return {**kept, "PYTHONUNBUFFERED": "1"}


@dataclass(frozen=True, slots=True)
class _Children:
    """What the demo started and watches: when one dies the demo is over."""

    broker: MosquittoBroker | EmbeddedBroker
    broker_name: str
    agent: subprocess.Popen[bytes]

    def what_died(self) -> str | None:
        """A sentence saying which child died and how, or None while both run."""
        broker = self.broker.process
        if broker is None or broker.poll() is not None:
            how = _how_it_ended(broker.returncode if broker is not None else None)
            return f"its broker ({self.broker_name}, {self.broker.url}) {how}"
        if self.agent.poll() is not None:
            return f"its agent {_how_it_ended(self.agent.returncode)}"
        return None


def _how_it_ended(code: int | None) -> str:
    if code is None:
        return "is gone"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def run_demo(*, headless: bool, port: int | None, prefer_embedded: bool = False) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="modelbus-demo-"))
    catalog = demo_catalog()
    broker: MosquittoBroker | EmbeddedBroker | None = None
    agent: subprocess.Popen[bytes] | None = None
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    failure: str | None = None
    try:
        try:
            broker, broker_name = start_demo_broker(
                port, workdir / "broker", prefer_embedded=prefer_embedded
            )
        except BrokerError as exc:
            print(f"modelbus demo: {exc}", file=sys.stderr)
            return 1
        config_file = workdir / "agent.yaml"
        gateway_port = free_port()
        config = demo_config(broker.url, workdir / "state", catalog, gateway_port=gateway_port)
        config_file.write_text(yaml.safe_dump(config))
        # Under the TUI the agent's log would tear the screen: it goes to a file.
        agent_log = workdir / "agent.log"
        log_file = agent_log.open("wb") if not headless else None
        agent = subprocess.Popen(
            [sys.executable, "-m", "modelbus", "agent", "--config", str(config_file)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            env=_agent_env(),
        )
        if log_file is not None:
            log_file.close()  # the agent has its own copy
        children = _Children(broker, broker_name, agent)
        if not _wait_until_online(broker.port, agent):
            failure = children.what_died() or "its agent did not come online within 30 s"
        elif not headless:
            failure = _run_tui(broker.port, children, stop)
        else:
            print(_instructions(broker.url, broker.port, broker_name, gateway_port), flush=True)
            while failure is None and not stop.wait(DEMO_POLL_S):
                failure = children.what_died()
        if failure is not None and not headless:
            sys.stderr.write(_tail(agent_log))
    finally:
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(10)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        _stop_model_servers(workdir / "state", catalog)
        if broker is not None:
            broker.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(workdir)
    if failure is not None:
        print(
            f"modelbus demo: {failure}; the demo stopped everything it started "
            "(run modelbus demo again to start afresh)",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return 0


def _tail(log: Path, size: int = 2000) -> str:
    """The end of the agent's log, which under the TUI nobody saw."""
    try:
        text = log.read_text(errors="replace")[-size:]
    except OSError:
        return ""
    return f"--- the end of the demo agent's log ---\n{text}" if text else ""


def _run_tui(port: int, children: _Children, stop: threading.Event) -> str | None:
    """The TUI in this process until it is quit (or SIGTERM, SIGHUP), or until the broker or
    the agent dies; then what died, or None."""
    from bus.mqtt import ConnectionSettings
    from tui.app import build_app

    settings = ConnectionSettings(
        "127.0.0.1", port, f"modelbus-demo-tui-{os.getpid()}", persistent_session=False
    )
    app = build_app(settings, DEMO_PREFIX, host=DEMO_HOST)
    died: list[str] = []

    def on_signal(*_: object) -> None:
        stop.set()
        app.call_later(app.exit)

    def watch() -> None:
        while not stop.wait(DEMO_POLL_S):
            if not died and (what := children.what_died()) is not None:
                died.append(what)
            if died:
                try:
                    app.call_from_thread(app.exit)
                except RuntimeError:
                    continue  # the app is not running yet: again next round
                return

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)  # the SSH session went away
    watcher = threading.Thread(target=watch, name="modelbus-demo-watch", daemon=True)
    watcher.start()
    try:
        app.run()
    finally:
        stop.set()
    return died[0] if died else children.what_died()


def _instructions(url: str, port: int, broker_name: str, gateway_port: int) -> str:
    """What to paste: ``modelbus`` lines (with --prefix too, so that an exported
    MODELBUS_PREFIX cannot send them elsewhere), then the same over bare MQTT."""
    where = ["--broker", url, "--prefix", DEMO_PREFIX, "--host", DEMO_HOST]
    first_model = DEMO_MODELS[0][0]
    watch = shlex.join(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-t", f"{DEMO_PREFIX}/#", "-v"]
    )
    models = ", ".join(name for name, *_ in DEMO_MODELS)
    lines = [
        f"modelbus demo: broker {url} ({broker_name}), "
        f"agent '{DEMO_HOST}' on a simulated 32 GB GPU.",
        _line("models", models),
        _line("status", shlex.join(["modelbus", "status", *where])),
        _line("switch", shlex.join(["modelbus", "switch", first_model, "--wait", *where])),
        _line("TUI", shlex.join(["modelbus", "tui", *where])),
        _line("gateway", _curl(gateway_port, first_model)),
        _line("watch it", watch),
    ]
    if broker_name == MOSQUITTO_DESCRIPTION:
        ask = shlex.join(
            [
                "mosquitto_rr", "-h", "127.0.0.1", "-p", str(port),
                "-t", f"{DEMO_PREFIX}/{DEMO_HOST}/cmd/status",
                "-e", f"{DEMO_PREFIX}/{DEMO_HOST}/reply/me", "-m", "",
            ]
        )  # fmt: skip
        switch = shlex.join(
            [
                "mosquitto_rr", "-h", "127.0.0.1", "-p", str(port),
                "-t", f"{DEMO_PREFIX}/{DEMO_HOST}/cmd/switch",
                "-e", f"{DEMO_PREFIX}/{DEMO_HOST}/reply/me",
                "-m", json.dumps({"model": first_model, "wait": True}),
            ]
        )  # fmt: skip
        lines += [_line("raw status", ask), _line("raw switch", switch)]
    else:
        # mosquitto_rr needs MQTT 5; over 3.1.1 replies land on P/H/reply/<command>.
        switch = shlex.join(
            [
                "mosquitto_pub", "-h", "127.0.0.1", "-p", str(port),
                "-t", f"{DEMO_PREFIX}/{DEMO_HOST}/cmd/switch", "-m", first_model,
            ]
        )  # fmt: skip
        lines += [
            _line("raw switch", switch),
            f"  (replies arrive on {DEMO_PREFIX}/{DEMO_HOST}/reply/<command>)",
        ]
    lines.append("Press Ctrl-C to stop; everything started here stops with it.")
    return "\n".join(lines)


def _line(name: str, text: str) -> str:
    return f"  {name + ':':<12}{text}"


def _wait_until_online(port: int, agent: subprocess.Popen[bytes], timeout_s: float = 30) -> bool:
    """Print the commands only once the agent listens: a command sent before it
    subscribed would be lost."""
    import asyncio

    from bus.mqtt import ConnectionSettings, Subscription, connect
    from shared.topics import HostTopics

    status = HostTopics(DEMO_PREFIX, DEMO_HOST).status

    async def online() -> bool:
        settings = ConnectionSettings("127.0.0.1", port, "modelbus-demo", persistent_session=False)
        async with connect(settings) as connection:
            await connection.subscribe([Subscription(status)])
            async for message in connection.messages():
                if message.payload == b"online":
                    return True
        return False

    async def exited() -> bool:
        # An agent that stops at once (a bad setting) is reported at once, not after 30 s.
        # A Popen's end cannot be awaited, only polled.
        while agent.poll() is None:  # noqa: ASYNC110
            await asyncio.sleep(DEMO_POLL_S)
        return False

    async def wait() -> bool:
        async with asyncio.timeout(timeout_s), asyncio.TaskGroup() as group:
            tasks = [group.create_task(online()), group.create_task(exited())]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                task.cancel()
        return any(task.result() for task in done)

    try:
        return asyncio.run(wait())
    except Exception:  # unreachable broker, timeout: the caller says so
        return False


def _stop_model_servers(state_dir: Path, catalog: dict[str, object]) -> None:
    """An agent leaves its model servers running for the next agent to adopt; the
    demo is over, so it stops them too and leaves nothing behind."""
    import asyncio

    from agent.config import load_config
    from agent.runtimes.process import ProcessRuntime

    specs = load_config(None, environ={}, overrides={"models": catalog}).models

    async def stop_all() -> None:
        runtime = ProcessRuntime(state_dir)
        for instance in await runtime.adopt(specs):
            await runtime.stop(instance, specs[instance.model].stop_timeout_s)

    with contextlib.suppress(Exception):
        asyncio.run(stop_all())


def _curl(port: int, model: str) -> str:
    """An OpenAI-style request for a model not loaded yet: the gateway switches to it."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
    return shlex.join(
        [
            "curl", f"http://127.0.0.1:{port}/v1/chat/completions",
            "-H", "Content-Type: application/json", "-d", body,
        ]
    )  # fmt: skip
