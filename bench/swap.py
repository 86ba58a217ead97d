"""Swap benchmark: the agent's own overhead per switch, command round trips, and a
burst of commands, over a local Mosquitto with simulated model servers.

Not a test: it prints figures beside the model-lifecycle issue's targets and beside
a baseline measured in the same run, the same agent configured to wait like the
original orchestrators did (a fixed sleep after every stop, health polled once a
second).

Overhead of one switch = the job's duration minus what the servers themselves took:
the evicted server's stop (SIGTERM until the process is reaped, which the agent awaits
without polling: the job reports it as timings.stop_s) and the new server's start
(process creation to ready, which the server reports itself). Everything else,
planning, forking, waiting for memory, noticing health, bookkeeping, publishing, is
the agent's.

The warm tier: A -> B -> A between two servers that can sleep (vLLM's sleep API, simulated:
a 2 s load, a 0.3 s wake), once with sleep and once with lifecycle.sleep off (every evicted
server stopped, every switch back a cold start), and once with too little host RAM for a
sleeper (the planner must stop instead). Overhead beyond the wake = the switch's duration
minus what the servers took: the evicted one falling asleep and the target waking, as they
report it.

    .venv/bin/python bench/swap.py            # 50 switches, 1,000-command burst, 20 warm
    .venv/bin/python bench/swap.py --quick    # 10 switches, 200-command burst, 6 warm
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.support import agent_config as bench_agent
from bench.support import sim_model, stop_agent
from bus.mqtt import Connection, ConnectionSettings, Subscription, connect
from devtools.brokers import DEMO_CONFIG, MosquittoBroker
from shared.topics import HostTopics
from tests.support.burst import BurstResult, burst

# The shipped broker's limits (mosquitto/mosquitto.conf), which a burst must live with.
SHIPPED_LIMITS = [
    line
    for line in (REPO / "mosquitto" / "mosquitto.conf").read_text().splitlines()
    if line.startswith(("max_inflight_messages", "max_queued_messages", "max_queued_bytes"))
]
BURST_RUNS = 5

LOAD_S = 0.3
TARGETS = {"overhead_p50": 25.0, "overhead_p99": 100.0, "rtt_p50": 3.0, "rtt_p99": 10.0}
# The warm tier's servers: a cold start takes WARM_LOAD_S, a wake WAKE_S.
WARM_LOAD_S = 2.0
WAKE_S = 0.3
WARM_MODES = {
    "sleep": {"host_ram_mb": 1000},
    "stop": {"host_ram_mb": 1000, "sleep": False},
    "ram-short": {"host_ram_mb": 50},
}
BASELINE_SETTLE_S = 2.0  # the originals slept after stopping a server
BASELINE_HEALTH_POLL_S = 1.0  # and polled health once a second
_ids = itertools.count()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


@dataclass
class Figures:
    overheads_ms: list[float]
    rtts_ms: list[float]
    bursts: list[BurstResult]


def agent_config(workdir: Path, broker: MosquittoBroker, prefix: str, *, baseline: bool) -> Path:
    timings = {"MODELBUS_SIM_TIMINGS": str(workdir / f"{prefix}.timings")}
    models = {name: sim_model(20000, load_s=LOAD_S) for name in ("alpha", "beta")}
    for entry in models.values():
        entry["process"]["env"] = timings
    lifecycle: dict[str, Any] = {"job_retention_s": 3600}
    if baseline:
        lifecycle.update(
            {"stop_settle_s": BASELINE_SETTLE_S, "health_poll_s": BASELINE_HEALTH_POLL_S}
        )
    config = bench_agent(
        workdir,
        broker,
        prefix,
        gpus=[{"memory_total_mb": 32768}],
        listen=None,  # two agents at once: no gateway fights for the port
        models=models,
        lifecycle=lifecycle,
    )
    path = workdir / f"{prefix}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def request(
    connection: Connection,
    messages: Any,
    topics: HostTopics,
    prefix: str,
    command: str,
    body: dict[str, Any],
) -> tuple[dict[str, Any], float]:
    request_id = f"b{next(_ids)}"
    reply_topic = f"{topics.base}/reply/{request_id}"
    loop = asyncio.get_running_loop()
    started = loop.time()
    await connection.publish(
        topics.command(command),
        json.dumps({**body, "request_id": request_id}),
        qos=1,
        response_topic=reply_topic,
    )
    async for message in messages:
        if message.topic == reply_topic:
            return json.loads(message.payload), (loop.time() - started) * 1000
    raise RuntimeError("the connection closed")


def server_times(timings: Path) -> dict[int, dict[str, float]]:
    by_pid: dict[int, dict[str, float]] = {}
    for line in timings.read_text().splitlines():
        record = json.loads(line)
        by_pid.setdefault(record["pid"], {})[record["event"]] = record["t"]
    return by_pid


def seconds(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def measure(
    broker: MosquittoBroker,
    workdir: Path,
    *,
    baseline: bool,
    switches: int,
    round_trips: int,
    burst_total: int,
) -> Figures:
    prefix = "bench-baseline" if baseline else "bench-modelbus"
    config = agent_config(workdir, broker, prefix, baseline=baseline)
    agent = subprocess.Popen(
        [sys.executable, "-m", "modelbus", "agent", "--config", str(config)], cwd=REPO
    )
    topics = HostTopics(prefix, "bench")
    settings = ConnectionSettings(
        "127.0.0.1", broker.port, f"bench-{prefix}", persistent_session=False
    )
    try:
        async with connect(settings) as connection:
            await connection.subscribe(
                [Subscription(topics.status), Subscription(topics.reply_filter)]
            )
            messages = connection.messages()
            async for message in messages:
                if message.topic == topics.status and message.payload == b"online":
                    break
            jobs = []
            for i in range(switches + 1):
                reply, _ = await request(
                    connection,
                    messages,
                    topics,
                    prefix,
                    "switch",
                    {"model": ("alpha", "beta")[i % 2], "wait": True},
                )
                assert reply["status"] == "ok", reply
                if i:  # the first switch evicts nothing
                    jobs.append(reply["data"]["job"])
            rtts = []
            for _ in range(round_trips):
                reply, rtt = await request(connection, messages, topics, prefix, "status", {})
                assert reply["status"] == "ok"
                rtts.append(rtt)
        bursts = [
            await burst(broker.port, topics, models=["alpha", "beta"], total=burst_total, seed=n)
            for n in range(BURST_RUNS if burst_total else 0)
        ]
    finally:
        stop_agent(agent, config)
    times = server_times(workdir / f"{prefix}.timings")
    overheads = []
    for job in jobs:
        start, end = seconds(job["started_at"]), seconds(job["finished_at"])
        # The new server's own start: process creation to ready, as it reports it.
        spawned = [r for r in times.values() if "ready" in r and start <= r["spawn"] <= end]
        server_s = sum(r["ready"] - r["spawn"] for r in spawned)
        # The old server's stop: SIGTERM to its exit, which the agent only waits on.
        server_s += job["result"]["timings"].get("stop_s", 0.0)
        overheads.append((end - start - server_s) * 1000)
    return Figures(overheads, rtts, bursts)


@dataclass
class Warm:
    switch_ms: list[float]  # each switch back, whole
    overhead_ms: list[float]  # beyond what the servers took (sleep + wake, or stop + start)
    slept: int  # switches that put the evicted model to sleep


async def measure_warm(broker: MosquittoBroker, workdir: Path, mode: str, switches: int) -> Warm:
    prefix = f"bench-warm-{mode}"
    timings = workdir / f"{prefix}.timings"
    extra = ("--sleep-api", "vllm", "--sleep-ram-mb", "64", "--wake-s", str(WAKE_S))
    models = {
        name: sim_model(20000, *extra, load_s=WARM_LOAD_S, sleep="vllm", sleep_ram_mb=100)
        for name in ("alpha", "beta")
    }
    for entry in models.values():
        entry["process"]["env"] = {"MODELBUS_SIM_TIMINGS": str(timings)}
    config_data = bench_agent(
        workdir,
        broker,
        prefix,
        gpus=[{"memory_total_mb": 32768}],
        listen=None,
        models=models,
        lifecycle={"job_retention_s": 3600, **WARM_MODES[mode]},
    )
    config = workdir / f"{prefix}.yaml"
    config.write_text(yaml.safe_dump(config_data))
    agent = subprocess.Popen(
        [sys.executable, "-m", "modelbus", "agent", "--config", str(config)], cwd=REPO
    )
    topics = HostTopics(prefix, "bench")
    settings = ConnectionSettings("127.0.0.1", broker.port, f"b-{prefix}", persistent_session=False)
    jobs = []
    try:
        async with connect(settings) as connection:
            await connection.subscribe(
                [Subscription(topics.status), Subscription(topics.reply_filter)]
            )
            messages = connection.messages()
            async for message in messages:
                if message.topic == topics.status and message.payload == b"online":
                    break
            for i in range(switches + 2):
                body = {"model": ("alpha", "beta")[i % 2], "wait": True}
                reply, _ = await request(connection, messages, topics, prefix, "switch", body)
                assert reply["status"] == "ok", reply
                if i >= 2:  # both have run once: every switch from here is a switch back
                    jobs.append(reply["data"]["job"])
    finally:
        stop_agent(agent, config)
    events = [json.loads(line) for line in timings.read_text().splitlines()]
    warm = Warm([], [], 0)
    for job in jobs:
        start, end = seconds(job["started_at"]), seconds(job["finished_at"])
        result = job["result"]
        warm.slept += bool(result["slept"])
        server_s = _servers_took(events, start, end) + (result["timings"].get("stop_s") or 0.0)
        warm.switch_ms.append((end - start) * 1000)
        warm.overhead_ms.append((end - start - server_s) * 1000)
    return warm


def _servers_took(events: list[dict[str, Any]], start: float, end: float) -> float:
    """Seconds the servers themselves took within a job: falling asleep, waking, starting
    (the stop is the job's own stop_s)."""
    spans = {"sleep": "asleep", "wake": "awake", "spawn": "ready"}
    took = 0.0
    for begin in events:
        finish = spans.get(begin["event"])
        if finish is None or not start <= begin["t"] <= end:
            continue
        ends = [
            e["t"] for e in events if e["pid"] == begin["pid"] and e["event"] == finish
            and e["t"] >= begin["t"]
        ]  # fmt: skip
        if ends:
            took += min(ends) - begin["t"]
    return took


def row(name: str, ours: float, base: float | None, target: float | None) -> None:
    base_text = f"{base:10.1f}" if base is not None else f"{'-':>10}"
    target_text = f"{target:10.1f}" if target is not None else f"{'-':>10}"
    verdict = "" if target is None else ("meets" if ours <= target else "MISSES")
    print(f"{name:34} {ours:10.1f} {base_text} {target_text}  {verdict}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switches", type=int, default=50)
    parser.add_argument("--round-trips", type=int, default=500)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--warm-switches", type=int, default=20)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.switches, args.round_trips, args.burst, args.warm_switches = 10, 100, 200, 6
    broker_config = DEMO_CONFIG + "".join(f"{line}\n" for line in SHIPPED_LIMITS)
    with tempfile.TemporaryDirectory() as tmp, MosquittoBroker(broker_config) as broker:
        workdir = Path(tmp)
        ours = await measure(
            broker,
            workdir,
            baseline=False,
            switches=args.switches,
            round_trips=args.round_trips,
            burst_total=args.burst,
        )
        base = (
            await measure(
                broker, workdir, baseline=True, switches=args.switches, round_trips=0, burst_total=0
            )
            if args.switches
            else None
        )
        warm = {
            mode: await measure_warm(broker, workdir, mode, args.warm_switches)
            for mode in WARM_MODES
        }
    print(
        f"swap bench: {args.switches} switches between two simulated servers "
        f"(20 GB each on a 32 GB GPU, {LOAD_S:g} s load), local Mosquitto, {os.cpu_count()} cores"
    )
    print(f"{'figure':34} {'modelbus':>10} {'baseline':>10} {'target':>10}  verdict")
    b = base.overheads_ms if base else None
    row(
        "agent overhead per switch p50, ms",
        statistics.median(ours.overheads_ms),
        statistics.median(b) if b else None,
        TARGETS["overhead_p50"],
    )
    row(
        "agent overhead per switch p99, ms",
        percentile(ours.overheads_ms, 99),
        percentile(b, 99) if b else None,
        TARGETS["overhead_p99"],
    )
    row("status round trip p50, ms", statistics.median(ours.rtts_ms), None, TARGETS["rtt_p50"])
    row("status round trip p99, ms", percentile(ours.rtts_ms, 99), None, TARGETS["rtt_p99"])
    if b:
        ratio = statistics.median(b) / statistics.median(ours.overheads_ms)
        print(f"overhead ratio baseline/modelbus (p50): {ratio:.0f}x (target >= 20x)")
    print(
        f"burst: {args.burst} commands from 20 clients at once (half load, a quarter switch, "
        f"a quarter status), broker limits as shipped ({', '.join(SHIPPED_LIMITS)}); "
        "target: lost 0 in every run"
    )
    for number, result in enumerate(ours.bursts, start=1):
        verdict = "meets" if result.lost == 0 and result.duplicates == 0 else "MISSES"
        print(
            f"  run {number}: {result.answered}/{result.sent} answered, lost {result.lost}, "
            f"{result.duplicates} duplicates, {result.out_of_order} out of order, "
            f"{result.seconds:.2f} s ({result.sent / result.seconds:.0f} commands/s), "
            f"{dict(sorted(result.outcomes.items()))}  {verdict}"
        )
    print(
        f"baseline: fixed {BASELINE_SETTLE_S:g} s sleep after each stop, health polled every "
        f"{BASELINE_HEALTH_POLL_S:g} s (the original orchestrators' waits)"
    )
    print(
        f"warm tier: {args.warm_switches} switches back between two sleepable servers "
        f"({WARM_LOAD_S:g} s load, {WAKE_S:g} s wake, 20 GB each on 32 GB)"
    )
    print(f"{'figure':34} {'sleep':>10} {'stop':>10} {'RAM short':>10}  target")
    switch_p50 = {mode: statistics.median(w.switch_ms) for mode, w in warm.items()}
    print(
        f"{'switch back p50, ms':34} {switch_p50['sleep']:10.1f} {switch_p50['stop']:10.1f} "
        f"{switch_p50['ram-short']:10.1f}"
    )
    beyond = statistics.median(warm["sleep"].overhead_ms)
    print(
        f"{'agent overhead beyond the wake p50':34} {beyond:10.1f} "
        f"{statistics.median(warm['stop'].overhead_ms):10.1f} "
        f"{statistics.median(warm['ram-short'].overhead_ms):10.1f}  <= 25 "
        f"{'meets' if beyond <= 25 else 'MISSES'}"
    )
    slept = (warm["sleep"].slept, warm["stop"].slept, warm["ram-short"].slept)
    verdict = "meets" if slept == (args.warm_switches, 0, 0) else "MISSES"
    print(
        f"{'switches that slept the evicted':34} {slept[0]:>10} {slept[1]:>10} {slept[2]:>10}"
        f"  all / none / none: {verdict}"
    )
    print(f"switch back with sleep vs stop: {switch_p50['stop'] / switch_p50['sleep']:.1f}x faster")


if __name__ == "__main__":
    asyncio.run(main())
