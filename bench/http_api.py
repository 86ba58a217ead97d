"""HTTP benchmark: what Prometheus's scrapes cost the agent, and how its HTTP routes hold
up under 50 concurrent clients, against a real agent on a local Mosquitto with 8 simulated
GPUs and 20 simulated models (8 of them loaded, one per GPU). (Not ``http.py``: in bench/,
that name would hide the standard library's ``http`` from every bench's aiohttp.)

Not a test: it prints figures beside the metrics issue's targets, each beside a baseline from
the same run:

- the agent's CPU while Prometheus-style scrapes of ``/metrics`` come every second, against
  the same agent idle in the windows just before and after (each at least 60 s, from the
  process's CPU time): the scrapes' added share of a core;
- ``GET /models/status`` and ``GET /metrics`` under 50 concurrent clients: p50/p99 latency
  and requests/s, beside ``GET /healthz`` (the HTTP stack's own floor: a route that does no
  work).

    .venv/bin/python bench/http_api.py            # 60 s windows, 5,000 requests per route
    .venv/bin/python bench/http_api.py --quick    # 15 s windows, 1,000 requests
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.support import agent_config as bench_agent
from bench.support import cpu_seconds, http_up, sim_model, stop_agent
from devtools.brokers import DEMO_CONFIG, MosquittoBroker, free_port

GPUS = 8
MODELS = 20
CLIENTS = 50
TARGETS = {"scrape_cpu_added": 0.5}


def agent_config(workdir: Path, broker: MosquittoBroker, port: int) -> Path:
    config = bench_agent(
        workdir,
        broker,
        "bench-http",
        gpus=[{"memory_total_mb": 81920} for _ in range(GPUS)],
        listen=f"127.0.0.1:{port}",
        telemetry={"interval_s": 1.0},
        gateway={"max_wait_s": 0},
        models={
            f"model-{i:02d}": sim_model(8192, load_s=0.1, gpus=[i % GPUS]) for i in range(MODELS)
        },
    )
    path = workdir / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def cpu_share(pid: int, seconds: float, scrape: str | None) -> float:
    """The agent's CPU, % of one core, over ``seconds``; with a GET of ``scrape`` every
    second meanwhile (from this process: its own CPU is not the agent's)."""
    started_cpu, started = cpu_seconds(pid), time.monotonic()
    async with aiohttp.ClientSession() as web:
        while (elapsed := time.monotonic() - started) < seconds:
            if scrape is not None:
                async with web.get(scrape) as response:
                    assert response.status == 200, response.status
                    await response.read()
            await asyncio.sleep(1.0 - (time.monotonic() - started - elapsed) % 1.0)
    return (cpu_seconds(pid) - started_cpu) / (time.monotonic() - started) * 100


async def under_load(url: str, requests: int) -> tuple[float, float, float]:
    """(p50 ms, p99 ms, requests/s) of ``requests`` GETs of ``url`` from 50 clients."""
    latencies: list[float] = []
    remaining = requests
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as web:

        async def client() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                sent = time.perf_counter()
                async with web.get(url) as response:
                    assert response.status == 200, response.status
                    await response.read()
                latencies.append((time.perf_counter() - sent) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(CLIENTS)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return statistics.median(latencies), p99, len(latencies) / elapsed


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="modelbus-bench-http-") as tmp:
        workdir = Path(tmp)
        with MosquittoBroker(DEMO_CONFIG, workdir=workdir / "broker") as broker:
            port = free_port()
            config = agent_config(workdir, broker, port)
            agent = subprocess.Popen(
                [sys.executable, "-m", "modelbus", "agent", "--config", str(config)], cwd=REPO
            )
            try:
                await measure(args, agent.pid, f"http://127.0.0.1:{port}")
            finally:
                stop_agent(agent, config)


async def measure(args: argparse.Namespace, pid: int, root: str) -> None:
    async with aiohttp.ClientSession() as web:
        await http_up(web, root)
        # One model per GPU, loaded through the gateway: 8 ready, 12 stopped.
        body = {"messages": [{"role": "user", "content": "hi"}]}
        answers = [
            web.post(f"{root}/v1/chat/completions", json={**body, "model": f"model-{i:02d}"})
            for i in range(GPUS)
        ]
        for answer in await asyncio.gather(*answers):
            assert answer.status == 200, answer.status
            answer.release()
    await asyncio.sleep(3.0)  # the loads' own aftermath (publishes, saves) is not idle
    idle_before = await cpu_share(pid, args.window, None)
    scraped = await cpu_share(pid, args.window, f"{root}/metrics")
    idle_after = await cpu_share(pid, args.window, None)
    idle = (idle_before + idle_after) / 2
    added = scraped - idle
    floor = await under_load(f"{root}/healthz", args.requests)
    metrics = await under_load(f"{root}/metrics", args.requests)
    status = await under_load(f"{root}/models/status", args.requests)

    print(
        f"http bench: {GPUS} simulated GPUs, {MODELS} models ({GPUS} loaded), local "
        f"Mosquitto, {os.cpu_count()} cores; CPU windows of {args.window:.0f} s"
    )
    print(f"{'figure':48} {'modelbus':>10} {'baseline':>10} {'target':>8}")
    verdict = "meets" if added <= TARGETS["scrape_cpu_added"] else "MISSES"
    print(f"{'agent CPU, % of a core, 1 s scrapes (idle beside)':48} {scraped:10.2f} {idle:10.2f}")
    print(
        f"{'  added by the scrapes, % of a core':48} {added:10.2f} {'-':>10} "
        f"{TARGETS['scrape_cpu_added']:8.2f}  {verdict}"
    )
    print(
        f"{'  idle windows before / after, % of a core':48} {idle_before:10.2f} {idle_after:10.2f}"
    )
    for name, (p50, p99, rate) in (
        ("/models/status", status),
        ("/metrics", metrics),
        ("/healthz", floor),
    ):
        print(
            f"{CLIENTS} clients, GET {name}: p50 {p50:.2f} ms, p99 {p99:.2f} ms, {rate:.0f} req/s"
        )
    print("(/healthz does no work: it is the HTTP stack's floor, the baseline for the others)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, default=60.0, help="seconds per CPU window")
    parser.add_argument("--requests", type=int, default=5000, help="per route under load")
    parser.add_argument("--quick", action="store_true", help="15 s windows, 1,000 requests")
    args = parser.parse_args()
    if args.quick:
        args.window, args.requests = 15.0, 1000
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
