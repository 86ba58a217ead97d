"""``modelbus demo``: a private broker and a simulated-GPU agent on this machine.

Everything it starts is a child of this process and is stopped when it exits,
so a demo leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import yaml

from agent.broker import BrokerError, MosquittoBroker
from agent.embedded_broker import MOSQUITTO_DESCRIPTION, EmbeddedBroker, start_demo_broker

DEMO_HOST = "demo"
DEMO_PREFIX = "modelbus"


# The original VRAM budget table, on one simulated 32 GB GPU: name, MiB, load seconds
# (shortened from minutes), what it is.
DEMO_MODELS: tuple[tuple[str, int, float, str], ...] = (
    ("qwen3-vl-30b", 17408, 3.0, "Qwen3-VL 30B vision-language (llama.cpp)"),
    ("whisperx", 6144, 1.5, "WhisperX speech recognition"),
    ("ovi-11b", 22528, 4.0, "Ovi 11B audio-video generation"),
    ("wan2.1-14b", 28672, 5.0, "Wan 2.1 14B video generation"),
    ("infinitetalk", 8192, 2.0, "InfiniteTalk talking-head video"),
)


def demo_catalog(python: str = sys.executable, first_port: int = 18101) -> dict[str, object]:
    """Simulated model servers (agent.simserver) for the five demo models."""
    models: dict[str, object] = {}
    for offset, (name, vram_mb, load_s, description) in enumerate(DEMO_MODELS):
        argv = [python, "-m", "agent.simserver", "--port", "${PORT}", "--model", "${MODEL}"]
        argv += ["--gpus", "${GPUS}", "--vram-mb", str(vram_mb), "--load-s", str(load_s)]
        models[name] = {
            "runtime": "process",
            "process": {"argv": argv},
            "port": first_port + offset,
            "vram_mb": vram_mb,
            "description": description,
            "stop_timeout_s": 5,
            "load_timeout_s": 60,
        }
    return models


def demo_config(broker_url: str, state_dir: Path) -> dict[str, object]:
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
        "models": demo_catalog(),
    }


def run_demo(*, headless: bool, port: int | None, prefer_embedded: bool = False) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="modelbus-demo-"))
    broker: MosquittoBroker | EmbeddedBroker | None = None
    agent: subprocess.Popen[bytes] | None = None
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        try:
            broker, broker_name = start_demo_broker(
                port, workdir / "broker", prefer_embedded=prefer_embedded
            )
        except BrokerError as exc:
            print(f"modelbus demo: {exc}", file=sys.stderr)
            return 1
        config_file = workdir / "agent.yaml"
        config_file.write_text(yaml.safe_dump(demo_config(broker.url, workdir / "state")))
        # Under the TUI the agent's log would tear the screen: it goes to a file.
        agent_log = (workdir / "agent.log").open("wb") if not headless else None
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent", "agent", "--config", str(config_file)],
            stdin=subprocess.DEVNULL,
            stdout=agent_log,
            stderr=agent_log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        if not _wait_until_online(broker.port, agent):
            print("modelbus demo: the agent did not come online", file=sys.stderr)
            if agent_log is not None:
                agent_log.close()
                sys.stderr.write((workdir / "agent.log").read_text()[-2000:])
            return 1
        if not headless:
            return _run_tui(broker.port, agent, stop)
        print(_instructions(broker.port, broker.url, broker_name), flush=True)
        while not stop.is_set():
            if agent.poll() is not None:
                print(
                    f"modelbus demo: the agent exited with code {agent.returncode}", file=sys.stderr
                )
                return 1
            stop.wait(0.2)
        return 0
    finally:
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(10)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        _stop_model_servers(workdir / "state")
        if broker is not None:
            broker.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(workdir)


def _run_tui(port: int, agent: subprocess.Popen[bytes], stop: threading.Event) -> int:
    """The TUI in this process; quitting it (or SIGTERM) ends the demo."""
    from agent.mqtt import ConnectionSettings
    from tui.app import build_app

    settings = ConnectionSettings(
        "127.0.0.1", port, f"modelbus-demo-tui-{os.getpid()}", persistent_session=False
    )
    app = build_app(settings, DEMO_PREFIX, host=DEMO_HOST)

    def on_signal(*_: object) -> None:
        stop.set()
        app.call_later(app.exit)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)  # the SSH session went away
    app.run()
    if agent.poll() is not None:
        print(f"modelbus demo: the agent exited with code {agent.returncode}", file=sys.stderr)
        return 1
    return 0


def _instructions(port: int, url: str, broker_name: str) -> str:
    watch = shlex.join(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-t", f"{DEMO_PREFIX}/#", "-v"]
    )
    models = ", ".join(name for name, *_ in DEMO_MODELS)
    lines = [
        f"modelbus demo: broker {url} ({broker_name}), "
        f"agent '{DEMO_HOST}' on a simulated 32 GB GPU.",
        f"  models:     {models}",
        f"  watch it:   {watch}",
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
                "-m", '{"model": "qwen3-vl-30b", "wait": true}',
            ]
        )  # fmt: skip
        lines += [f"  ask status: {ask}", f"  switch:     {switch}"]
    else:
        # mosquitto_rr needs MQTT 5; over 3.1.1 replies land on P/H/reply/<command>.
        switch = shlex.join(
            [
                "mosquitto_pub", "-h", "127.0.0.1", "-p", str(port),
                "-t", f"{DEMO_PREFIX}/{DEMO_HOST}/cmd/switch", "-m", "qwen3-vl-30b",
            ]
        )  # fmt: skip
        lines += [
            f"  switch:     {switch}",
            f"  (replies arrive on {DEMO_PREFIX}/{DEMO_HOST}/reply/<command>)",
        ]
    lines.append("Press Ctrl-C to stop; everything started here stops with it.")
    return "\n".join(lines)


def _wait_until_online(port: int, agent: subprocess.Popen[bytes], timeout_s: float = 30) -> bool:
    """Print the commands only once the agent listens: a command sent before it
    subscribed would be lost."""
    import asyncio

    from agent.mqtt import ConnectionSettings, Subscription, connect
    from shared.topics import HostTopics

    status = HostTopics(DEMO_PREFIX, DEMO_HOST).status

    async def wait() -> bool:
        settings = ConnectionSettings("127.0.0.1", port, "modelbus-demo", persistent_session=False)
        async with asyncio.timeout(timeout_s), connect(settings) as connection:
            await connection.subscribe([Subscription(status)])
            async for message in connection.messages():
                if message.payload == b"online":
                    return True
        return False

    try:
        return agent.poll() is None and asyncio.run(wait())
    except Exception:  # unreachable broker, timeout: the caller says so
        return False


def _stop_model_servers(state_dir: Path) -> None:
    """An agent leaves its model servers running for the next agent to adopt; the
    demo is over, so it stops them too and leaves nothing behind."""
    import asyncio

    from agent.config import load_config
    from agent.runtimes.process import ProcessRuntime

    specs = load_config(None, environ={}, overrides={"models": demo_catalog()}).models

    async def stop_all() -> None:
        runtime = ProcessRuntime(state_dir)
        for instance in await runtime.adopt(specs):
            await runtime.stop(instance, specs[instance.model].stop_timeout_s)

    with contextlib.suppress(Exception):
        asyncio.run(stop_all())
