"""Real GPU check: the agent's whole lifecycle on a real NVIDIA GPU, with no model to download.

Two simulated model servers hold REAL device memory through the CUDA driver
(``devtools.simserver --memory cuda``, devtools/cuda_memory.py) and speak vLLM's sleep API; an
agent with ``gpu.backend: nvml`` switches between them over the embedded broker (no mosquitto
needed). It prints, and writes as JSON:

- telemetry: the agent's ``P/H/gpu/0`` against ``nvidia-smi`` (memory used and total), idle
  and with a model loaded;
- cold switches (``lifecycle.sleep: false``): each switch's time and the agent's overhead
  beyond the servers' stop and start, p50 / p99;
- how long freed memory takes to show as free in NVML after a server exits (sampled every
  10 ms);
- warm switches (sleep and wake, real ``cuMemFree``/``cuMemAlloc``): switch-back time;
- whether NVML lists the servers' processes (in sandboxed machines it may not: recorded as
  ``not observable``, not a failure).

One command on a GPU machine, at most 8 minutes; on the device machine (Python 3.12, nothing
fetched from outside) with the wheels that ``bash bench/gpu_check_wheels.sh`` put in
``.gpu-wheels/`` (carried), installed beside its own packages, not into them, and nothing
built::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu-wheels/*.whl && \\
        PYTHONPATH=/tmp/site:$PWD python3 bench/gpu_check.py --out "$OUT/gpu_check.json"

Without an NVIDIA driver it says so and exits 2. ``--simulate`` runs the same steps on a
simulated GPU (simulated memory, no nvidia-smi, no NVML sampling), to check the script
itself where there is no GPU; its figures say nothing about a real card.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bus.mqtt import Connection, ConnectionSettings, Subscription, connect
from devtools.embedded_broker import EmbeddedBroker
from shared.topics import HostTopics

HOST = "gpu-check"
PREFIX = "modelbus"
DEADLINE_S = 8 * 60


@dataclass
class Report:
    gpu: dict[str, Any] = field(default_factory=dict)
    telemetry: list[dict[str, Any]] = field(default_factory=list)
    cold: dict[str, Any] = field(default_factory=dict)
    warm: dict[str, Any] = field(default_factory=dict)
    memory_back_ms: list[float] = field(default_factory=list)  # from the server's SIGTERM
    memory_back_after_exit_ms: list[float] = field(default_factory=list)
    nvml_processes: str = "not observed yet"
    notes: list[str] = field(default_factory=list)


def preflight() -> tuple[str, int] | str:
    """(GPU name, MiB in all), or why this machine cannot run the check."""
    if shutil.which("nvidia-smi") is None:
        return "no nvidia-smi here: this check needs an NVIDIA GPU and its driver"
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(handle)
        total = pynvml.nvmlDeviceGetMemoryInfo(handle).total // 2**20
    except Exception as error:  # pynvml raises its own NVMLError family
        return f"NVML does not answer ({error}): this check needs an NVIDIA GPU and its driver"
    from devtools.cuda_memory import CudaDriver, CudaError

    try:
        CudaDriver()
    except CudaError as error:
        return str(error)
    return (name.decode() if isinstance(name, bytes) else str(name)), int(total)


class NvmlSampler(threading.Thread):
    """GPU 0's used memory every 10 ms, with the wall-clock time of each sample."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        if SIMULATE:
            return
        import pynvml

        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)

    def run(self) -> None:
        while not SIMULATE and not self._stop.wait(0.01):
            used = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used // 2**20
            self.samples.append((time.time(), int(used)))

    def stop(self) -> None:
        self._stop.set()


def nvidia_smi() -> tuple[int, int]:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.splitlines()[0]
    used, total = (int(value.strip()) for value in out.split(","))
    return used, total


SIMULATE = False  # --simulate


def server(vram_mb: int, timings: Path) -> dict[str, Any]:
    argv = [sys.executable, "-m", "devtools.simserver", "--port", "${PORT}", "--model"]
    argv += ["${MODEL}", "--gpus", "${GPUS}", "--vram-mb", str(vram_mb), "--load-s", "0"]
    argv += ["--memory", "sim" if SIMULATE else "cuda"]
    argv += ["--sleep-api", "vllm", "--sleep-ram-mb", "64", "--wake-s", "0"]
    from devtools.brokers import free_port

    return {
        "process": {"argv": argv, "env": {"MODELBUS_SIM_TIMINGS": str(timings)}},
        "port": free_port(),
        "vram_mb": vram_mb,
        "sleep": "vllm",
        "sleep_ram_mb": 100,
        "load_timeout_s": 120,
    }


class Agent:
    def __init__(self, workdir: Path, broker_url: str, models: dict[str, Any], sleep: bool):
        self.config = workdir / f"agent-{'warm' if sleep else 'cold'}.yaml"
        config = {
            "host_id": HOST,
            "prefix": PREFIX,
            "state_dir": str(workdir / f"state-{'warm' if sleep else 'cold'}"),
            "log_level": "warning",
            "broker": {"url": broker_url},
            "gpu": {"backend": "sim"} if SIMULATE else {"backend": "nvml"},
            "telemetry": {"interval_s": 0.5},
            "http": {"listen": None},
            "lifecycle": {"sleep": sleep, "host_ram_mb": 4096, "vram_wait_timeout_s": 60},
            "models": models,
        }
        self.config.write_text(yaml.safe_dump(config))
        command = [sys.executable, "-m", "modelbus", "agent", "--config", str(self.config)]
        self.process = subprocess.Popen(command, cwd=REPO)

    def stop(self) -> None:
        from bench.support import stop_agent

        stop_agent(self.process, self.config)


class Bus:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.topics = HostTopics(PREFIX, HOST)
        self.retained: dict[str, bytes] = {}
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._ids = 0

    async def pump(self) -> None:
        async for message in self.connection.messages():
            self.retained[message.topic] = message.payload
            if "/reply/" in message.topic and message.payload:
                reply = json.loads(message.payload)
                waiting = self._replies.pop(reply.get("request_id"), None)
                if waiting is not None and not waiting.done():
                    waiting.set_result(reply)

    def value(self, topic: str) -> Any:
        payload = self.retained.get(topic)
        return None if not payload else json.loads(payload)

    async def ask(self, command: str, body: dict[str, Any], timeout_s: float = 180) -> Any:
        self._ids += 1
        request_id = f"gc{self._ids}"
        answered = asyncio.get_running_loop().create_future()
        self._replies[request_id] = answered
        payload = json.dumps({**body, "request_id": request_id})
        await self.connection.publish(self.topics.command(command), payload, qos=1)
        reply = await asyncio.wait_for(answered, timeout_s)
        if reply["status"] != "ok":
            raise RuntimeError(f"{command} {body}: {reply.get('error')}")
        return reply["data"]

    async def online(self) -> None:
        for _ in range(600):
            if self.retained.get(self.topics.status) == b"online":
                return
            await asyncio.sleep(0.05)
        raise RuntimeError("the agent did not come online within 30 s")


def seconds(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def run_phase(
    broker: EmbeddedBroker, workdir: Path, sizes: dict[str, int], switches: int, sleep: bool,
    report: Report,
) -> None:  # fmt: skip
    timings = workdir / f"timings-{'warm' if sleep else 'cold'}.jsonl"
    models = {name: server(mb, timings) for name, mb in sizes.items()}
    agent = Agent(workdir, broker.url, models, sleep)
    sampler = NvmlSampler()
    sampler.start()
    settings = ConnectionSettings(
        "127.0.0.1", broker.port, f"gpu-check-{os.getpid()}-{sleep}", persistent_session=False
    )
    try:
        async with connect(settings) as connection:
            bus = Bus(connection)
            await connection.subscribe([Subscription(f"{PREFIX}/{HOST}/#")])
            pump = asyncio.create_task(bus.pump())
            try:
                await bus.online()
                if not sleep:
                    await asyncio.sleep(1.5)  # a telemetry interval or two
                    report.telemetry.append(compare_telemetry(bus, "idle"))
                jobs = []
                for i in range(switches + 2):
                    data = await bus.ask("switch", {"model": ("big", "small")[i % 2], "wait": True})
                    if i == 0 and not sleep:
                        await asyncio.sleep(1.5)
                        report.telemetry.append(compare_telemetry(bus, "big loaded"))
                        processes = bus.value(bus.topics.gpu(0))["processes"]
                        owned = [p for p in processes if p.get("model")]
                        report.nvml_processes = (
                            f"listed: {len(owned)} process(es) attributed to models"
                            if owned
                            else "not observable (NVML lists no processes here)"
                        )
                    if i >= 2:
                        jobs.append(data["job"])
            finally:
                pump.cancel()
    finally:
        agent.stop()
        sampler.stop()
    summarize(jobs, timings, sampler.samples, sizes, sleep, report)


def compare_telemetry(bus: Bus, when: str) -> dict[str, Any]:
    gpu = bus.value(bus.topics.gpu(0))
    smi_used, smi_total = (
        (gpu["memory_used_mb"], gpu["memory_total_mb"]) if SIMULATE else nvidia_smi()
    )
    return {
        "when": when,
        "agent_used_mb": gpu["memory_used_mb"],
        "nvidia_smi_used_mb": smi_used,
        "agent_total_mb": gpu["memory_total_mb"],
        "nvidia_smi_total_mb": smi_total,
        "used_difference_mb": gpu["memory_used_mb"] - smi_used,
    }


def summarize(
    jobs: list[dict[str, Any]],
    timings: Path,
    samples: list[tuple[float, int]],
    sizes: dict[str, int],
    sleep: bool,
    report: Report,
) -> None:
    events = [json.loads(line) for line in timings.read_text().splitlines()]
    durations, overheads = [], []
    for job in jobs:
        start, end = seconds(job["started_at"]), seconds(job["finished_at"])
        timing = job["result"]["timings"]
        server_s = sum(timing.get(k) or 0.0 for k in ("stop_s", "start_s", "sleep_s", "wake_s"))
        if not sleep:
            server_s += timing.get("healthy_s") or 0.0
        durations.append((end - start) * 1000)
        overheads.append((end - start - server_s) * 1000)
    figures = {
        "switches": len(jobs),
        "switch_ms_p50": round(statistics.median(durations), 1),
        "switch_ms_p99": round(percentile(durations, 99), 1),
        "overhead_ms_p50": round(statistics.median(overheads), 1),
        "overhead_ms_p99": round(percentile(overheads, 99), 1),
        "slept": sum(bool(job["result"]["slept"]) for job in jobs),
        "woken": sum(bool(job["result"]["woken"]) for job in jobs),
    }
    if sleep:
        report.warm = figures
        return
    report.cold = figures
    # Memory back: from the SIGTERM a server got (it frees its memory on the way out, before
    # it exits) until NVML shows 90 % of what it held as free; and the same from its exit
    # (negative: the memory was free before the process ended).
    for term in (e for e in events if e["event"] == "term"):
        held = sizes[term["model"]]
        before = [used for t, used in samples if term["t"] - 1.0 <= t <= term["t"]]
        if not before:
            continue
        target = max(before) - 0.9 * held
        back = next((t for t, used in samples if t >= term["t"] and used <= target), None)
        if back is None:
            continue
        report.memory_back_ms.append(round((back - term["t"]) * 1000, 1))
        exits = [e["t"] for e in events if e["pid"] == term["pid"] and e["event"] == "exit"]
        if exits:
            report.memory_back_after_exit_ms.append(round((back - exits[0]) * 1000, 1))


def print_report(report: Report) -> None:
    print(f"GPU: {report.gpu}")
    print("telemetry (agent P/H/gpu/0 vs nvidia-smi, MiB):")
    for row in report.telemetry:
        print(
            f"  {row['when']:12} used {row['agent_used_mb']} vs {row['nvidia_smi_used_mb']} "
            f"(difference {row['used_difference_mb']}), total {row['agent_total_mb']} vs "
            f"{row['nvidia_smi_total_mb']}"
        )
    for name, figures in (("cold (stop/start)", report.cold), ("warm (sleep/wake)", report.warm)):
        print(f"{name}: {figures}")
    if report.memory_back_ms:
        print(
            "memory free in NVML after a server's SIGTERM: p50 "
            f"{statistics.median(report.memory_back_ms)} ms, max {max(report.memory_back_ms)} "
            f"ms over {len(report.memory_back_ms)} stops"
        )
    if report.memory_back_after_exit_ms:
        print(
            "  and after its exit: p50 "
            f"{statistics.median(report.memory_back_after_exit_ms)} ms (negative: free before)"
        )
    print(f"NVML process list: {report.nvml_processes}")
    for note in report.notes:
        print(f"note: {note}")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switches", type=int, default=10)
    parser.add_argument("--big-share", type=float, default=0.55, help="of the GPU's memory")
    parser.add_argument("--small-share", type=float, default=0.5, help="of the GPU's memory")
    default_out = Path(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") else None
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--simulate", action="store_true", help="a simulated GPU (see above)")
    args = parser.parse_args()
    global SIMULATE
    SIMULATE = args.simulate
    found = ("Simulated GPU", 32768) if SIMULATE else preflight()
    if isinstance(found, str):
        print(f"gpu_check: {found}", file=sys.stderr)
        return 2
    name, total_mb = found
    report = Report(
        gpu={"name": name, "memory_total_mb": total_mb, "python": sys.version.split()[0]}
    )
    # Together they do not fit: every switch evicts.
    sizes = {"big": int(total_mb * args.big_share), "small": int(total_mb * args.small_share)}
    began = time.monotonic()
    with (
        tempfile.TemporaryDirectory() as tmp,
        EmbeddedBroker(workdir=Path(tmp) / "broker") as broker,
    ):
        broker.start()
        workdir = Path(tmp)
        async with asyncio.timeout(DEADLINE_S - 30):
            await run_phase(broker, workdir, sizes, args.switches, False, report)
            await run_phase(broker, workdir, sizes, args.switches, True, report)
    report.notes.append(f"took {time.monotonic() - began:.0f} s")
    if SIMULATE:
        report.notes.append("--simulate: a simulated GPU; these figures say nothing of a real one")
    print_report(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(asdict(report), indent=2) + "\n")
        print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
