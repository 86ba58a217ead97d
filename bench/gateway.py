"""Gateway benchmark: what the gateway adds to a request, how streams fare through it, and
how long a request that triggers a swap waits for its first token, against a real agent on
a local Mosquitto with simulated model servers.

Not a test: it prints figures beside the gateway issue's targets, each beside a baseline
measured in the same run (the same request sent straight to the model's server):

- added latency of a non-streaming request on a ready model, one client: requests are
  paired with the direct call and interleaved, after a warm-up; the median of 3 runs;
- 64 concurrent streams at a fixed chunk rate: throughput through the gateway against
  direct, the agent's CPU per 1,000 chunks, and meanwhile the bus: ``status`` round trips
  and the seconds between two telemetry publishes (one agent process serves both), timed
  by a probe process of its own, beside the same round trips while the streams go
  straight to the server (the machine as busy, the agent idle) and while nothing streams;
- time to first token of a request whose model must be switched in, against the switch
  job's own duration;
- batching: a seeded trace of 200 requests interleaved over three models that do not fit
  together, through an agent with the shipped batching policy (``gateway:``) and one that queues
  every switch in arrival order (``max_wait_s: 0``), the same trace: the swaps each made,
  and the longest wait against ``max_wait_s`` plus one swap;
- 2,000 mixed requests (chat, streamed chat, embeddings) from 50 clients over those three
  models: every one answered (200, or a documented 429), none lost, the agent's memory
  before, half-way and after.

    .venv/bin/python bench/gateway.py            # 1,000 pairs x 3, 64 streams x 60 chunks
    .venv/bin/python bench/gateway.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.config import GatewayConfig
from bench.support import agent_config as bench_agent
from bench.support import http_up, sim_model, stop_agent
from bus.mqtt import Connection, ConnectionSettings, Subscription, connect
from devtools.brokers import DEMO_CONFIG, MosquittoBroker, free_port
from shared.topics import HostTopics

TARGETS = {"added_p50": 1.0, "added_p99": 5.0, "stream_share": 95.0, "rtt_p99": 10.0}
TTFT_SLACK_MS = 50.0
SWAP_SHARE_TARGET = 50.0  # batched swaps, % of arrival order's
TRACE_MODELS = ("red", "green", "blue")  # 20 GB each on a 32 GB GPU: one at a time
TRACE_REQUESTS = 200
TRACE_RATE = 8.0  # requests a second, spread over the three models
# The shipped policy.
TRACE_MAX_WAIT_S = GatewayConfig().max_wait_s
TRACE_IDLE_AFTER_S = GatewayConfig().idle_after_s
TRACE_LOAD_S = 0.3
MIXED_CLIENTS = 50
MIXED_REQUESTS = 2000
CHAT = [{"role": "user", "content": "hello"}]
STREAM_RATE = 20.0  # chunks per second per stream
IDLE_PROBE_S = 5.0
TOPICS = HostTopics("bench-gateway", "bench")
T = TypeVar("T")
_ids = itertools.count()


def sim(vram_mb: int, *extra: str, load_s: float = 0.5) -> dict[str, Any]:
    return sim_model(vram_mb, *extra, load_s=load_s)


def agent_config(workdir: Path, broker: MosquittoBroker, gateway_port: int, chunks: int) -> Path:
    stream = ["--answer-tokens", str(chunks), "--tokens-per-s", str(STREAM_RATE)]
    config = bench_agent(
        workdir,
        broker,
        "bench-gateway",
        gpus=[{"memory_total_mb": 32768}],
        listen=f"127.0.0.1:{gateway_port}",
        telemetry={"interval_s": 1.0},
        # The swap's time to first token is the switch's own: not held back for batching.
        gateway={"max_wait_s": 0},
        models={
            "alpha": sim(4096, "--tokens-per-s", "0"),  # answers at once: the overhead shows
            "streamer": sim(4096, *stream),
            "big": sim(30000),  # needs everything: a request for it switches
        },
        lifecycle={"job_retention_s": 3600},
    )
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
    """A bus connection's ``status`` round trips and telemetry arrivals."""

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


async def probe_bus(broker_port: int) -> None:
    """``--probe-bus PORT``: a status round trip every 50 ms and every telemetry arrival,
    until standard input closes; then one JSON line, ``{"rtts": [ms], "gaps": [s]}``."""
    settings = ConnectionSettings(
        "127.0.0.1", broker_port, "bench-gw-probe", persistent_session=False
    )
    async with connect(settings) as connection:
        await connection.subscribe([Subscription(TOPICS.reply_filter), Subscription(TOPICS.gpu(0))])
        bus = Bus(connection, TOPICS)
        pump = asyncio.create_task(bus.pump())
        stdin_closed = asyncio.create_task(asyncio.to_thread(sys.stdin.read))
        print("ready", flush=True)
        rtts: list[float] = []
        while not stdin_closed.done():
            rtts.append(await bus.status_rtt())
            await asyncio.sleep(0.05)
        pump.cancel()
    gaps = [b - a for a, b in itertools.pairwise(bus.gpu_at[1:])]  # [0]: the retained one
    print(json.dumps({"rtts": rtts, "gaps": gaps}), flush=True)


async def bus_during(broker: MosquittoBroker, work: Awaitable[T]) -> tuple[T, list[float], float]:
    """``work``'s result, the status round trips (ms) and the longest telemetry gap (s)
    meanwhile, seen by a process of its own: in the process that reads 64 streams, its
    own busy event loop would delay the replies it times."""
    probe = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--probe-bus", str(broker.port),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    assert probe.stdin is not None and probe.stdout is not None
    assert await probe.stdout.readline() == b"ready\n"
    try:
        result = await work
    finally:
        probe.stdin.close()
        seen = json.loads(await probe.stdout.read())
        await probe.wait()
    return result, seen["rtts"], max(seen["gaps"], default=float("nan"))


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
                stop_agent(agent, config)


async def measure(
    args: argparse.Namespace,
    broker: MosquittoBroker,
    agent: subprocess.Popen[bytes],
    port: int,
    spec: dict[str, Any],
) -> None:
    gateway = f"http://127.0.0.1:{port}"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as web:
        await http_up(web, gateway)
        # Both small models side by side; big is left for the swap.
        await chat(web, gateway, "alpha")
        await chat(web, gateway, "streamer")
        alpha = f"http://127.0.0.1:{spec['alpha']['port']}"
        streamer = f"http://127.0.0.1:{spec['streamer']['port']}"

        runs = [await added_latency(web, gateway, alpha, args.pairs) for _ in range(3)]
        p50 = statistics.median(r[0] for r in runs)
        p99 = statistics.median(r[1] for r in runs)
        direct_p50 = statistics.median(r[2] for r in runs)

        # The bus with nothing else to do, and while the same streams go straight to the
        # server (the machine as busy, the agent not): the round trip's baselines.
        _, idle_rtts, _ = await bus_during(broker, asyncio.sleep(IDLE_PROBE_S))
        # Direct and through the gateway in turn, twice; each side's better run counts.
        process = psutil.Process(agent.pid)
        direct_rates, gateway_rates, cpu_per_chunk = [], [], []
        rtts: list[float] = []
        direct_rtts: list[float] = []
        telemetry_gaps: list[float] = []
        for _ in range(2):
            (direct_chunks, direct_s), round_trips, _ = await bus_during(
                broker, streams(web, streamer, args.streams)
            )
            direct_rates.append(direct_chunks / direct_s)
            direct_rtts += round_trips
            cpu_before = sum(process.cpu_times()[:2])
            (gateway_chunks, gateway_s), round_trips, gap = await bus_during(
                broker, streams(web, gateway, args.streams)
            )
            cpu_per_chunk.append((sum(process.cpu_times()[:2]) - cpu_before) / gateway_chunks)
            gateway_rates.append(gateway_chunks / gateway_s)
            rtts += round_trips
            telemetry_gaps.append(gap)
        share = max(gateway_rates) / max(direct_rates) * 100
        telemetry_gap = max(telemetry_gaps)

    async with (
        connect(
            ConnectionSettings("127.0.0.1", broker.port, "bench-gw-jobs", persistent_session=False)
        ) as watcher,
        aiohttp.ClientSession() as web,
    ):
        await watcher.subscribe([Subscription(TOPICS.job("+"))])
        ttft, job_ms = await ttft_of_a_swap(web, gateway, watcher, TOPICS)

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
    rtt_p99, direct_p99 = percentile(rtts, 0.99), percentile(direct_rtts, 0.99)
    row("  status round trip p99 (ms, direct beside)", rtt_p99, direct_p99, TARGETS["rtt_p99"])
    row("  status round trip p99, nothing streaming", percentile(idle_rtts, 0.99), None, None)
    row("  longest telemetry gap during (s)", telemetry_gap, 1.0, 1.5)
    row("swap: time to first token (ms, job beside)", ttft, job_ms, job_ms + TTFT_SLACK_MS)


# ---- batching: a seeded interleaved trace, and a mixed load -------------------------


def trace_config(workdir: Path, broker: MosquittoBroker, port: int, max_wait_s: float) -> Path:
    prefix = f"bench-trace-{int(max_wait_s * 1000)}"
    config = bench_agent(
        workdir,
        broker,
        prefix,
        gpus=[{"memory_total_mb": 32768}],
        listen=f"127.0.0.1:{port}",
        gateway={"max_wait_s": max_wait_s, "idle_after_s": TRACE_IDLE_AFTER_S},
        models={
            name: sim(20000, "--tokens-per-s", "0", load_s=TRACE_LOAD_S) for name in TRACE_MODELS
        },
        lifecycle={"job_retention_s": 3600},
    )
    path = workdir / f"{prefix}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def seeded_trace(seed: int = 612) -> list[tuple[float, str]]:
    """(seconds from the start, model) of each request: Poisson arrivals, models at random."""
    rng = random.Random(seed)
    at, trace = 0.0, []
    for _ in range(TRACE_REQUESTS):
        at += rng.expovariate(TRACE_RATE)
        trace.append((at, rng.choice(TRACE_MODELS)))
    return trace


@dataclass
class TraceRun:
    waits_ms: list[float]
    switches: list[dict[str, Any]]


async def replay(broker: MosquittoBroker, workdir: Path, max_wait_s: float) -> TraceRun:
    """The seeded trace through an agent with ``max_wait_s``: each request's wait (the
    server answers at once, so its latency is its wait) and the switch jobs it caused."""
    port = free_port()
    config = trace_config(workdir, broker, port, max_wait_s)
    prefix = yaml.safe_load(config.read_text())["prefix"]
    topics = HostTopics(prefix, "bench")
    agent = subprocess.Popen(
        [sys.executable, "-m", "modelbus", "agent", "--config", str(config)], cwd=REPO
    )
    gateway = f"http://127.0.0.1:{port}"
    settings = ConnectionSettings("127.0.0.1", broker.port, prefix, persistent_session=False)
    jobs: dict[str, dict[str, Any]] = {}
    try:
        async with (
            connect(settings) as watcher,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as web,
        ):
            await watcher.subscribe([Subscription(topics.job("+"))])

            async def collect() -> None:
                async for message in watcher.messages():
                    if message.payload:
                        job = json.loads(message.payload)
                        jobs[job["job_id"]] = job

            collector = asyncio.create_task(collect())
            await http_up(web, gateway)
            start = time.perf_counter()

            async def one(at: float, model: str) -> float:
                await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
                return await chat(web, gateway, model)

            waits = await asyncio.gather(*(one(at, model) for at, model in seeded_trace()))
            await asyncio.sleep(0.5)  # the last job's final state
            collector.cancel()
    finally:
        stop_agent(agent, config)
    switches = [job for job in jobs.values() if job["state"] == "succeeded"]
    return TraceRun(list(waits), switches)


async def mixed_load(broker: MosquittoBroker, workdir: Path) -> tuple[dict[str, int], list[int]]:
    """MIXED_REQUESTS requests from MIXED_CLIENTS clients over the trace's models, each
    client one request at a time: the answers by status, and the agent's RSS (bytes) at
    the start, half-way and at the end."""
    port = free_port()
    config = trace_config(workdir, broker, port, TRACE_MAX_WAIT_S)
    agent = subprocess.Popen(
        [sys.executable, "-m", "modelbus", "agent", "--config", str(config)], cwd=REPO
    )
    gateway = f"http://127.0.0.1:{port}"
    statuses: dict[str, int] = {}
    rss: list[int] = []
    rng = random.Random(50)
    per_client = MIXED_REQUESTS // MIXED_CLIENTS
    try:
        process = psutil.Process(agent.pid)
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as web:
            await http_up(web, gateway)
            rss.append(process.memory_info().rss)
            done = 0

            async def client(plan: list[tuple[str, str]]) -> None:
                nonlocal done
                for kind, model in plan:
                    key = await mixed_request(web, gateway, kind, model)
                    statuses[key] = statuses.get(key, 0) + 1
                    done += 1
                    if done == MIXED_REQUESTS // 2:
                        rss.append(process.memory_info().rss)

            plans = [
                [
                    (rng.choice(("chat", "stream", "embeddings")), rng.choice(TRACE_MODELS))
                    for _ in range(per_client)
                ]
                for _ in range(MIXED_CLIENTS)
            ]
            await asyncio.gather(*(client(plan) for plan in plans))
            rss.append(process.memory_info().rss)
    finally:
        stop_agent(agent, config)
    return statuses, rss


async def mixed_request(web: aiohttp.ClientSession, gateway: str, kind: str, model: str) -> str:
    """One request; what it got: its status, "ok" for a whole answer, "lost" otherwise."""
    if kind == "embeddings":
        url, body = f"{gateway}/v1/embeddings", {"model": model, "input": "hello"}
    else:
        url = f"{gateway}/v1/chat/completions"
        body = {"model": model, "messages": CHAT, "stream": kind == "stream"}
    try:
        async with web.post(url, json=body) as response:
            payload = await response.read()
    except (aiohttp.ClientError, TimeoutError):
        return "lost"
    if response.status != 200:
        return str(response.status)
    if kind == "stream":
        return "ok" if payload.rstrip().endswith(b"data: [DONE]") else "lost"
    answer = json.loads(payload)
    return "ok" if answer.get("choices") or answer.get("data") else "lost"


async def batching(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="modelbus-bench-batching-") as tmp:
        workdir = Path(tmp)
        with MosquittoBroker(DEMO_CONFIG, workdir=workdir / "broker") as broker:
            arrival = await replay(broker, workdir, 0.0)
            batched = await replay(broker, workdir, TRACE_MAX_WAIT_S)
            statuses, rss = await mixed_load(broker, workdir) if not args.quick else ({}, [])
    swap_ms = max(job_seconds(job) for job in batched.switches) * 1000
    bound = TRACE_MAX_WAIT_S * 1000 + swap_ms
    print(
        f"\nbatching: {TRACE_REQUESTS} requests at {TRACE_RATE:g}/s over {len(TRACE_MODELS)} "
        f"models of 20 GB on 32 GB ({TRACE_LOAD_S:g} s loads), max_wait_s {TRACE_MAX_WAIT_S:g}, "
        f"idle_after_s {TRACE_IDLE_AFTER_S:g}; baseline: max_wait_s 0 (arrival order)"
    )
    print(f"{'figure':44} {'modelbus':>10} {'baseline':>10} {'target':>10}")
    share = len(batched.switches) / len(arrival.switches) * 100
    row("swaps", len(batched.switches), len(arrival.switches), None)
    row("  swaps, % of arrival order", share, 100.0, SWAP_SHARE_TARGET)
    row("longest wait (ms; max_wait_s + one swap)", max(batched.waits_ms), max(arrival.waits_ms),
        bound)  # fmt: skip
    row("median wait (ms)", statistics.median(batched.waits_ms),
        statistics.median(arrival.waits_ms), None)  # fmt: skip
    if statuses:
        answered = sum(n for key, n in statuses.items() if key in ("ok", "429"))
        print(
            f"mixed: {MIXED_REQUESTS} requests (chat, streamed chat, embeddings) from "
            f"{MIXED_CLIENTS} clients over the same models: {statuses}; answered "
            f"{answered}/{MIXED_REQUESTS}, lost {statuses.get('lost', 0)} (target 0)  "
            + ("meets" if answered == MIXED_REQUESTS else "MISSES")
        )
        mib = [value / 2**20 for value in rss]
        print(
            "  agent RSS MiB at start, half-way, end: "
            + ", ".join(f"{value:.1f}" for value in mib)
            + f" (growth over the second half {mib[2] - mib[1]:+.1f} MiB)"
        )


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
    parser.add_argument(
        "--only", choices=("gateway", "batching"), help="one part of the bench only"
    )
    parser.add_argument("--probe-bus", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_bus:
        asyncio.run(probe_bus(args.probe_bus))
        return
    if args.quick:
        args.pairs, args.streams, args.chunks = 200, 16, 40
    if args.only != "batching":
        asyncio.run(run(args))
    if args.only != "gateway":
        asyncio.run(batching(args))


if __name__ == "__main__":
    main()
