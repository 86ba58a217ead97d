"""Gateway benchmark: what the gateway adds to a request, how streams fare through it, and
how long a request that triggers a swap waits for its first token, against a real agent on
a local Mosquitto with simulated model servers.

Not a test: it prints figures beside the gateway issue's targets, each beside a baseline
measured in the same run (the same request sent straight to the model's server):

- added latency of a non-streaming request on a ready model, one client: requests are
  paired with the direct call and interleaved, after a warm-up; the median of 3 runs;
- 64 concurrent streams at a fixed chunk rate: throughput through the gateway against
  direct, the agent's CPU per 1,000 chunks, and meanwhile the bus: ``status`` round trips
  and the seconds between two telemetry publishes (one process serves both);
- time to first token of a request whose model must be switched in, against the switch
  job's own duration.

    .venv/bin/python bench/gateway.py            # 1,000 pairs x 3, 64 streams x 60 chunks
    .venv/bin/python bench/gateway.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bus.mqtt import Connection, ConnectionSettings, Subscription, connect
from devtools.brokers import DEMO_CONFIG, MosquittoBroker, free_port
from shared.topics import HostTopics

TARGETS = {"added_p50": 1.0, "added_p99": 5.0, "stream_share": 95.0, "rtt_p99": 10.0}
TTFT_SLACK_MS = 50.0
CHAT = [{"role": "user", "content": "hello"}]
STREAM_RATE = 20.0  # chunks per second per stream
_ids = itertools.count()


def sim(vram_mb: int, *extra: str) -> dict[str, Any]:
    argv = [sys.executable, "-m", "devtools.simserver", "--port", "${PORT}", "--model"]
    argv += ["${MODEL}", "--gpus", "${GPUS}", "--vram-mb", str(vram_mb), "--load-s", "0.5"]
    return {
        "runtime": "process",
        "process": {"argv": [*argv, *extra]},
        "port": free_port(),
        "vram_mb": vram_mb,
    }


def agent_config(workdir: Path, broker: MosquittoBroker, gateway_port: int, chunks: int) -> Path:
    stream = ["--answer-tokens", str(chunks), "--tokens-per-s", str(STREAM_RATE)]
    config: dict[str, Any] = {
        "host_id": "bench",
        "prefix": "bench-gateway",
        "state_dir": str(workdir / "state"),
        "log_level": "warning",
        "broker": {"url": broker.url},
        "telemetry": {"interval_s": 1.0},
        "gpu": {
            "backend": "sim",
            "sim": {"release_delay_s": 0.0, "gpus": [{"memory_total_mb": 32768}]},
        },
        "http": {"listen": f"127.0.0.1:{gateway_port}"},
        "models": {
            "alpha": sim(4096, "--tokens-per-s", "0"),  # answers at once: the overhead shows
            "streamer": sim(4096, *stream),
            "big": sim(30000),  # needs everything: a request for it switches
        },
        "lifecycle": {"job_retention_s": 3600},
    }
    path = workdir / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


async def chat(session: aiohttp.ClientSession, base: str, model: str) -> float:
    started = time.perf_counter()
    async with session.post(
        f"{base}/v1/chat/completions", json={"model": model, "messages": CHAT}
    ) as r:
        await r.read()
        assert r.status == 200, r.status
    return (time.perf_counter() - started) * 1000


async def added_latency(
    session: aiohttp.ClientSession, gateway: str, direct: str, pairs: int
) -> tuple[float, float, float]:
    """(p50 added, p99 added, p50 direct) in ms over ``pairs`` interleaved pairs."""
    for _ in range(100):  # warm-up: connections, caches, the gateway's first requests
        await chat(session, gateway, "alpha")
        await chat(session, direct, "alpha")
    added, baseline = [], []
    for i in range(pairs):
        if i % 2:
            via, straight = (
                await chat(session, gateway, "alpha"),
                await chat(session, direct, "alpha"),
            )
        else:
            straight, via = (
                await chat(session, direct, "alpha"),
                await chat(session, gateway, "alpha"),
            )
        added.append(via - straight)
        baseline.append(straight)
    return percentile(added, 0.5), percentile(added, 0.99), percentile(baseline, 0.5)


async def stream_once(session: aiohttp.ClientSession, base: str) -> int:
    body = {"model": "streamer", "messages": CHAT, "stream": True}
    chunks = 0
    async with session.post(f"{base}/v1/chat/completions", json=body) as response:
        async for line in response.content:
            if line.startswith(b"data: {"):
                chunks += 1
    return chunks


async def streams(session: aiohttp.ClientSession, base: str, count: int) -> tuple[int, float]:
    started = time.perf_counter()
    done = await asyncio.gather(*(stream_once(session, base) for _ in range(count)))
    return sum(done), time.perf_counter() - started


class Bus:
    """The bench's own bus connection: status round trips and telemetry arrivals."""

    def __init__(self, connection: Connection, topics: HostTopics) -> None:
        self.connection = connection
        self.topics = topics
        self.gpu_at: list[float] = []
        self._replies: dict[str, asyncio.Future[float]] = {}

    async def pump(self) -> None:
        async for message in self.connection.messages():
            if message.topic == self.topics.gpu(0):
                self.gpu_at.append(time.perf_counter())
            elif message.topic in self._replies:
                self._replies.pop(message.topic).set_result(time.perf_counter())

    async def status_rtt(self) -> float:
        topic = f"{self.topics.base}/reply/g{next(_ids)}"
        future = asyncio.get_running_loop().create_future()
        self._replies[topic] = future
        started = time.perf_counter()
        await self.connection.publish(
            self.topics.command("status"), "{}", qos=1, response_topic=topic
        )
        return (await future - started) * 1000

    async def ask(self, command: str, body: dict[str, Any]) -> dict[str, Any]:
        topic = f"{self.topics.base}/reply/g{next(_ids)}"
        future = asyncio.get_running_loop().create_future()
        self._replies[topic] = future
        await self.connection.publish(
            self.topics.command(command), json.dumps(body), qos=1, response_topic=topic
        )
        await future
        return {}


async def bus_during(bus: Bus, work: asyncio.Task[Any]) -> tuple[list[float], float]:
    """Status round trips every 50 ms while ``work`` runs, and the longest telemetry gap."""
    rtts: list[float] = []
    first_gpu = len(bus.gpu_at)
    while not work.done():
        rtts.append(await bus.status_rtt())
        await asyncio.sleep(0.05)
    arrivals = bus.gpu_at[first_gpu:]
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return rtts, max(gaps) if gaps else float("nan")


def job_seconds(job: dict[str, Any]) -> float:
    def at(text: str) -> float:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()

    return at(job["finished_at"]) - at(job["created_at"])


async def ttft_of_a_swap(
    session: aiohttp.ClientSession, gateway: str, watcher: Connection, topics: HostTopics
) -> tuple[float, float]:
    """(time to first token, the switch job's duration), ms, for a model not loaded."""
    body = {"model": "big", "messages": CHAT, "stream": True}
    started = time.perf_counter()
    async with session.post(f"{gateway}/v1/chat/completions", json=body) as response:
        async for line in response.content:
            if line.startswith(b"data: {"):
                ttft = (time.perf_counter() - started) * 1000
                break
        await response.read()
    job = None
    async for message in watcher.messages():
        if message.topic.startswith(topics.job("")) and message.payload:
            state = json.loads(message.payload)
            if state["model"] == "big" and state["state"] == "succeeded":
                job = state
                break
    assert job is not None
    return ttft, job_seconds(job) * 1000


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="modelbus-bench-gateway-") as tmp:
        workdir = Path(tmp)
        with MosquittoBroker(DEMO_CONFIG, workdir=workdir / "broker") as broker:
            port = free_port()
            config = agent_config(workdir, broker, port, args.chunks)
            agent = subprocess.Popen(
                [sys.executable, "-m", "modelbus", "agent", "--config", str(config)], cwd=REPO
            )
            spec = yaml.safe_load(config.read_text())["models"]
            try:
                await measure(args, broker, agent, port, spec)
            finally:
                agent.send_signal(signal.SIGTERM)
                agent.wait(30)


async def measure(
    args: argparse.Namespace,
    broker: MosquittoBroker,
    agent: subprocess.Popen[bytes],
    port: int,
    spec: dict[str, Any],
) -> None:
    topics = HostTopics("bench-gateway", "bench")
    settings = ConnectionSettings("127.0.0.1", broker.port, "bench-gw", persistent_session=False)
    gateway = f"http://127.0.0.1:{port}"
    connector = aiohttp.TCPConnector(limit=0)
    async with connect(settings) as connection, aiohttp.ClientSession(connector=connector) as web:
        await connection.subscribe(
            [
                Subscription(topics.status),
                Subscription(topics.reply_filter),
                Subscription(topics.gpu(0)),
            ]
        )
        bus = Bus(connection, topics)
        pump = asyncio.create_task(bus.pump())
        deadline = time.monotonic() + 30
        while True:
            try:
                async with web.get(f"{gateway}/v1/models") as probe:
                    if probe.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, "the agent's gateway did not come up"
            await asyncio.sleep(0.1)
        # Both small models side by side; big is left for the swap.
        await chat(web, gateway, "alpha")
        await chat(web, gateway, "streamer")
        alpha = f"http://127.0.0.1:{spec['alpha']['port']}"
        streamer = f"http://127.0.0.1:{spec['streamer']['port']}"

        runs = [await added_latency(web, gateway, alpha, args.pairs) for _ in range(3)]
        p50 = statistics.median(r[0] for r in runs)
        p99 = statistics.median(r[1] for r in runs)
        direct_p50 = statistics.median(r[2] for r in runs)

        # Direct and through the gateway in turn, twice; each side's better run counts.
        process = psutil.Process(agent.pid)
        direct_rates, gateway_rates, cpu_per_chunk = [], [], []
        rtts: list[float] = []
        telemetry_gaps: list[float] = []
        for _ in range(2):
            direct_chunks, direct_s = await streams(web, streamer, args.streams)
            direct_rates.append(direct_chunks / direct_s)
            cpu_before = sum(process.cpu_times()[:2])
            work = asyncio.create_task(streams(web, gateway, args.streams))
            round_trips, gap = await bus_during(bus, work)
            gateway_chunks, gateway_s = await work
            cpu_per_chunk.append((sum(process.cpu_times()[:2]) - cpu_before) / gateway_chunks)
            gateway_rates.append(gateway_chunks / gateway_s)
            rtts += round_trips
            telemetry_gaps.append(gap)
        share = max(gateway_rates) / max(direct_rates) * 100
        telemetry_gap = max(telemetry_gaps)
        pump.cancel()

    async with (
        connect(
            ConnectionSettings("127.0.0.1", broker.port, "bench-gw-jobs", persistent_session=False)
        ) as watcher,
        aiohttp.ClientSession() as web,
    ):
        await watcher.subscribe([Subscription(topics.job("+"))])
        ttft, job_ms = await ttft_of_a_swap(web, gateway, watcher, topics)

    print(f"{'figure':44} {'modelbus':>10} {'baseline':>10} {'target':>10}")
    row("added latency p50 (ms, direct p50 beside)", p50, direct_p50, TARGETS["added_p50"])
    row("added latency p99 (ms)", p99, None, TARGETS["added_p99"])
    row(
        f"{args.streams} streams: chunks/s (direct beside)",
        max(gateway_rates),
        max(direct_rates),
        None,
    )
    row("  share of direct throughput (%)", share, 100.0, TARGETS["stream_share"], higher=True)
    row("  agent CPU ms per 1,000 chunks", min(cpu_per_chunk) * 1e6, None, None)
    row("  status round trip p99 during (ms)", percentile(rtts, 0.99), None, TARGETS["rtt_p99"])
    row("  longest telemetry gap during (s)", telemetry_gap, 1.0, 1.5)
    row("swap: time to first token (ms, job beside)", ttft, job_ms, job_ms + TTFT_SLACK_MS)


def row(
    name: str, ours: float, base: float | None, target: float | None, *, higher: bool = False
) -> None:
    base_text = f"{base:10.2f}" if base is not None else f"{'-':>10}"
    target_text = f"{target:10.2f}" if target is not None else f"{'-':>10}"
    met = None if target is None else (ours >= target if higher else ours <= target)
    verdict = "" if met is None else ("meets" if met else "MISSES")
    print(f"{name:44} {ours:10.2f} {base_text} {target_text}  {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--chunks", type=int, default=60, help="chunks per stream")
    parser.add_argument("--quick", action="store_true", help="200 pairs, 16 streams x 40")
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.streams, args.chunks = 200, 16, 40
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
