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

from agent.broker import DEMO_CONFIG, BrokerError, MosquittoBroker

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


def run_demo(*, headless: bool, port: int | None) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="modelbus-demo-"))
    broker = MosquittoBroker(DEMO_CONFIG, port=port, workdir=workdir / "broker")
    agent: subprocess.Popen[bytes] | None = None
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        try:
            broker.start()
        except BrokerError as exc:
            print(f"modelbus demo: {exc}", file=sys.stderr)
            return 1
        config_file = workdir / "agent.yaml"
        config_file.write_text(yaml.safe_dump(demo_config(broker.url, workdir / "state")))
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent", "agent", "--config", str(config_file)],
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        if not _wait_until_online(broker.port, agent):
            print("modelbus demo: the agent did not come online", file=sys.stderr)
            return 1
        watch = shlex.join(
            [
                "mosquitto_sub",
                "-h",
                "127.0.0.1",
                "-p",
                str(broker.port),
                "-t",
                f"{DEMO_PREFIX}/#",
                "-v",
            ]
        )
        ask = shlex.join(
            [
                "mosquitto_rr", "-h", "127.0.0.1", "-p", str(broker.port),
                "-t", f"{DEMO_PREFIX}/{DEMO_HOST}/cmd/status",
                "-e", f"{DEMO_PREFIX}/reply/me", "-m", "",
            ]
        )  # fmt: skip
        switch = shlex.join(
            [
                "mosquitto_rr", "-h", "127.0.0.1", "-p", str(broker.port),
                "-t", f"{DEMO_PREFIX}/{DEMO_HOST}/cmd/switch", "-e", f"{DEMO_PREFIX}/reply/me",
                "-m", '{"model": "qwen3-vl-30b", "wait": true}',
            ]
        )  # fmt: skip
        models = ", ".join(name for name, *_ in DEMO_MODELS)
        if not headless:
            print("The terminal UI is not built yet; running the demo headless.")
        print(
            f"modelbus demo: broker {broker.url}, agent '{DEMO_HOST}' on a simulated 32 GB GPU.\n"
            f"  models:     {models}\n"
            f"  watch it:   {watch}\n"
            f"  ask status: {ask}\n"
            f"  switch:     {switch}\n"
            "Press Ctrl-C to stop; everything started here stops with it.",
            flush=True,
        )
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
        broker.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(workdir)


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
