"""Telemetry benchmark: agent CPU and memory with 8 simulated GPUs at 1 s, and the
delay from a memory change in the simulator to the message at a subscriber.

Not a test: it prints figures beside the targets of the foundation issue, and
beside a baseline measured in the same run on the same machine: the same agent
publishing only at its interval (``publish_on_change: false``), which is how a
plain "poll and publish every second" exporter behaves.

    .venv/bin/python bench/telemetry.py            # 60 s per phase, as specified
    .venv/bin/python bench/telemetry.py --quick    # 10 s per phase, for a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.support import cpu_seconds
from bus.mqtt import ConnectionSettings, Subscription, connect
from devtools.brokers import DEMO_CONFIG, MosquittoBroker
from devtools.gpu_sim import SimGpuClient
from shared.topics import HostTopics

TARGET_CPU_PERCENT = 1.0
TARGET_RSS_MB = 80.0
TARGET_P50_MS = 20.0


@dataclass
class Figures:
    cpu_percent: float
    peak_rss_mb: float
    latencies_ms: list[float]

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies_ms)

    @property
    def p95(self) -> float:
        return statistics.quantiles(self.latencies_ms, n=20)[18]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def measure(
    broker: MosquittoBroker, workdir: Path, *, on_change: bool, duration_s: float, changes: int
) -> Figures:
    host = "bench"
    prefix = "bench-modelbus" if on_change else "bench-baseline"
    state_dir = workdir / f"state-{prefix}"
    config = {
        "host_id": host,
        "prefix": prefix,
        "state_dir": str(state_dir),
        "log_level": "warning",
        "broker": {"url": broker.url},
        "telemetry": {"interval_s": 1.0, "publish_on_change": on_change},
        "gpu": {
            "backend": "sim",
            "sim": {"gpus": [{"name": f"Sim {i}", "memory_total_mb": 81920} for i in range(8)]},
        },
        "http": {"listen": None},
    }
    config_file = workdir / f"{prefix}.yaml"
    config_file.write_text(yaml.safe_dump(config))
    agent = subprocess.Popen(
        [sys.executable, "-m", "modelbus", "agent", "--config", str(config_file)], cwd=REPO
    )
    topics = HostTopics(prefix, host)
    settings = ConnectionSettings(
        "127.0.0.1", broker.port, f"bench-sub-{prefix}", persistent_session=False
    )
    try:
        async with connect(settings) as connection:
            await connection.subscribe([Subscription(topics.status), Subscription(topics.gpu(0))])
            messages = connection.messages()
            async for message in messages:
                if message.topic == topics.status and message.payload == b"online":
                    break
            # Phase 1: steady state, nothing changing.
            await asyncio.sleep(2.0)  # let start-up work finish before the CPU window opens
            cpu_start, wall_start = cpu_seconds(agent.pid), time.monotonic()
            await asyncio.sleep(duration_s)
            cpu = (cpu_seconds(agent.pid) - cpu_start) / (time.monotonic() - wall_start) * 100
            # Phase 2: memory changes made by another party (this process) at random moments.
            client = SimGpuClient(state_dir / "sim-gpus.bin")
            latencies = []
            for i in range(changes):
                await asyncio.sleep(random.uniform(0.2, 0.6))
                target_mb = 1000 + 10 * (i + 1)
                started = time.monotonic()
                client.set_usage(0, target_mb, name="bench")
                async for message in messages:
                    if message.topic != topics.gpu(0):
                        continue
                    if json.loads(message.payload)["memory_used_mb"] == target_mb:
                        latencies.append((time.monotonic() - started) * 1000)
                        break
            client.release()
            return Figures(cpu, peak_rss_mb(agent.pid), latencies)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(10)


def verdict(value: float, target: float) -> str:
    return "meets" if value <= target else "MISSES"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of CPU window")
    parser.add_argument("--changes", type=int, default=50, help="memory changes to time")
    parser.add_argument("--quick", action="store_true", help="10 s window, 20 changes")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.changes = 10.0, 20
    with tempfile.TemporaryDirectory() as tmp, MosquittoBroker(DEMO_CONFIG) as broker:
        workdir = Path(tmp)
        ours = await measure(
            broker, workdir, on_change=True, duration_s=args.duration, changes=args.changes
        )
        base = await measure(
            broker, workdir, on_change=False, duration_s=args.duration, changes=args.changes
        )
    print(
        f"telemetry bench: 8 simulated GPUs, 1 s interval, {args.duration:.0f} s CPU window, "
        f"{args.changes} memory changes, local Mosquitto; {os.cpu_count()} cores"
    )
    print(f"{'figure':34} {'modelbus':>10} {'baseline':>10} {'target':>10}  verdict")
    rows = [
        ("agent CPU, % of one core", ours.cpu_percent, base.cpu_percent, TARGET_CPU_PERCENT),
        ("agent peak RSS, MB", ours.peak_rss_mb, base.peak_rss_mb, TARGET_RSS_MB),
        ("change -> subscriber p50, ms", ours.p50, base.p50, TARGET_P50_MS),
        ("change -> subscriber p95, ms", ours.p95, base.p95, float("nan")),
    ]
    for name, value, baseline, target in rows:
        check = verdict(value, target) if target == target else ""
        target_text = f"{target:10.1f}" if target == target else f"{'-':>10}"
        print(f"{name:34} {value:10.2f} {baseline:10.2f} {target_text}  {check}")
    print(f"change latency: modelbus is {base.p50 / ours.p50:.0f}x faster than the baseline (p50)")
    print("baseline: the same agent publishing only at its 1 s interval (publish_on_change: false)")


if __name__ == "__main__":
    asyncio.run(main())
