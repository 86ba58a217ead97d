"""TUI benchmark: the terminal UI's CPU and time to first frame while a fleet of
20 hosts x 8 GPUs publishes telemetry at 1 Hz and 100 models sit in the catalog.

Not a test: it prints figures beside the TUI issue's targets (at most 15 % of one
core, first frame within 1.0 s) and beside baselines measured in the same run on
the same machine, and exits 0 whatever the verdicts; only a crash exits non-zero.

- The fleet is a separate process (``bench/tui.py --publish URL``) that publishes
  real contract payloads to a private Mosquitto: per host a retained status, info,
  state, five models, their weights and a few finished jobs, then every second, at a
  random phase per host (agents are not synchronised), eight retained ``gpu/<i>`` with
  slightly changed figures and a ``state``: 180 messages a second.
- The TUI is ``python -m modelbus tui`` in a 160x48 pseudo-terminal (TERM=xterm-256color,
  COLORTERM=truecolor), so it really renders and writes escape sequences; everything
  it writes is drained and counted. The measured TUI shows every panel issue 17 added:
  the sparklines, the weights panel (shown at 48 rows), the finished jobs the agent
  keeps, and each GPU's processes (``g`` is pressed before the CPU window).
- First frame: from spawning the TUI, with the retained fleet already on the broker,
  until its output shows the first GPU bar (``GPU0 [``). Baseline: a bare Textual app
  painting one line in the same terminal, the floor of Python and Textual start-up.
- CPU: the TUI's user+system time over a window after a warm-up. Baselines:
  ``mosquitto_sub`` receiving the same stream over the same window (the raw cost of
  the messages), and the same TUI once the fleet pauses (only its clocks tick).
- Socket backlog: the most bytes seen waiting unread in the TUI's socket; a TUI that
  falls behind the stream shows a growing backlog.

    .venv/bin/python bench/tui.py             # 20 s CPU window, about 60 s in all
    .venv/bin/python bench/tui.py --quick     # 5 s CPU window, a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import fcntl
import os
import random
import re
import signal
import statistics
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.telemetry import host_state
from bus.mqtt import ConnectionSettings, connect
from devtools.brokers import DEMO_CONFIG, MosquittoBroker
from shared import PROTOCOL_VERSION
from shared.messages import (
    Availability,
    GpuInfo,
    GpuProcess,
    GpuState,
    HostInfo,
    HostState,
    InstalledWeights,
    JobCommand,
    JobPhase,
    JobState,
    JobStatus,
    LoadedModel,
    ModelLifecycle,
    ModelState,
    WeightsState,
    encode,
    utc_now,
)
from shared.topics import CommandName, HostTopics, all_hosts_filter

# Issue 17's targets, with its panels (processes, sparklines, traffic): the first TUI
# issue's were 25 % and 1.5 s.
TARGET_CPU_PERCENT = 15.0
TARGET_FIRST_FRAME_S = 1.0
HOSTS = 20
GPUS = 8
MODELS_PER_HOST = 5
GPU_TOTAL_MB = 81559  # an H100 80GB as NVML reports it
PREFIX = "bench-tui"
ROWS, COLUMNS = 48, 160
FIRST_FRAME_MARK = "GPU0 ["  # tui/widgets/vram_bar.py: the first line of GPU 0
BARE_MARK = "bare-textual-ready"
WARM_UP_S = 3.0
START_TIMEOUT_S = 20.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# CSI sequences, OSC strings and two-byte escapes: what stands between the characters.
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_=>()]")
BARE_APP = f"""
from textual.app import App
from textual.widgets import Static
class Bare(App):
    def compose(self):
        yield Static({BARE_MARK!r})
Bare().run()
"""

# -- the fleet ----------------------------------------------------------------------

_FAMILIES = (
    ("llama-3.1-8b-instruct", 17000),
    ("llama-3.1-70b-instruct", 36000),
    ("llama-3.3-70b-instruct", 36000),
    ("llama-3.2-3b-instruct", 8000),
    ("llama-3.2-11b-vision-instruct", 24000),
    ("qwen2.5-7b-instruct", 16000),
    ("qwen2.5-14b-instruct", 30000),
    ("qwen2.5-32b-instruct", 34000),
    ("qwen2.5-72b-instruct", 38000),
    ("qwen2.5-coder-32b-instruct", 34000),
    ("qwen2-vl-7b-instruct", 18000),
    ("mistral-7b-instruct-v0.3", 16000),
    ("mistral-small-24b-instruct", 26000),
    ("mixtral-8x7b-instruct", 30000),
    ("gemma-2-9b-it", 20000),
    ("gemma-2-27b-it", 28000),
    ("phi-3.5-mini-instruct", 9000),
    ("phi-4", 30000),
    ("deepseek-r1-distill-qwen-32b", 34000),
    ("deepseek-coder-v2-lite-instruct", 32000),
    ("codestral-22b", 24000),
    ("command-r-35b", 36000),
    ("yi-1.5-34b-chat", 36000),
    ("bge-m3", 3000),
    ("e5-mistral-7b-instruct", 16000),
)
_VARIANTS = ("", "-awq", "-fp8", "-gptq-int4")


def model_catalog() -> list[tuple[str, int]]:
    """100 distinct, realistic names with a VRAM estimate per GPU."""
    return [
        (f"{name}{v}", mb if not v else mb * 2 // 3) for v in _VARIANTS for name, mb in _FAMILIES
    ]


class SimHost:
    """One agent's worth of payloads. Its five models play fixed roles so every GPU
    has two or three model processes plus one foreign process:

    0 ready on all 8 GPUs, 1 ready on GPUs 0-3, 2 loading (or unloading) on 4-7,
    3 ready on GPUs 0 and 4, 4 stopped (or failed).
    """

    ROLES = (
        (ModelLifecycle.READY, list(range(8))),
        (ModelLifecycle.READY, [0, 1, 2, 3]),
        (ModelLifecycle.LOADING, [4, 5, 6, 7]),
        (ModelLifecycle.READY, [0, 4]),
        (ModelLifecycle.STOPPED, []),
    )

    def __init__(self, number: int, models: Sequence[tuple[str, int]], rng: random.Random):
        self.host_id = f"gpu-node-{number:02d}"
        self.topics = HostTopics(PREFIX, self.host_id)
        self.rng = rng
        self.started_at = utc_now() - timedelta(hours=rng.randint(1, 400))
        self.models = list(models)
        self.states = [role[0] for role in self.ROLES]
        if number % 3 == 0:
            self.states[2] = ModelLifecycle.UNLOADING
        if number % 4 == 0:
            self.states[4] = ModelLifecycle.ERROR
        self.util = [rng.randint(0, 100) for _ in range(GPUS)]
        self.temp = [rng.randint(38, 75) for _ in range(GPUS)]
        self.jitter = [0] * GPUS
        self.loading_mb = 2000
        self.pids = {(g, m): rng.randint(2000, 400000) for g in range(GPUS) for m in range(5)}

    def info(self) -> HostInfo:
        gpus = [
            GpuInfo(
                index=i,
                uuid=self._uuid(i),
                name="NVIDIA H100 80GB HBM3",
                memory_total_mb=GPU_TOTAL_MB,
            )
            for i in range(GPUS)
        ]
        return HostInfo(
            host_id=self.host_id,
            hostname=f"{self.host_id}.cluster.internal",
            agent_version="0.1.0",
            protocol_version=PROTOCOL_VERSION,
            mqtt_protocol="5",
            gpu_backend="nvml",
            driver_version="550.54.15",
            cuda_version="12.4",
            gpus=gpus,
            commands=[c.value for c in CommandName],
            started_at=self.started_at,
            ts=utc_now(),
        )

    def model_states(self) -> list[ModelState]:
        now = utc_now()
        out = []
        for (name, mb), state, (_, gpus) in zip(self.models, self.states, self.ROLES, strict=True):
            running = state in (
                ModelLifecycle.READY,
                ModelLifecycle.LOADING,
                ModelLifecycle.UNLOADING,
            )
            out.append(
                ModelState(
                    name=name,
                    runtime="docker" if "awq" in name or "fp8" in name else "process",
                    state=state,
                    gpus=gpus if running else [],
                    vram_estimate_mb=mb * max(len(gpus), 1),
                    vram_used_mb=mb * len(gpus) if state is ModelLifecycle.READY else None,
                    health="ok" if state is ModelLifecycle.READY else None,
                    loaded_at=now - timedelta(minutes=self.rng.randint(5, 900))
                    if running
                    else None,
                    last_used_at=now - timedelta(seconds=self.rng.randint(1, 3000)),
                    last_load_s=round(self.rng.uniform(8, 240), 1),
                    priority=self.rng.choice((0, 0, 10, 50)),
                    pinned=name.startswith("bge"),
                    description=f"{name} served by vLLM",
                    error="CUDA out of memory while loading weights"
                    if state is ModelLifecycle.ERROR
                    else None,
                    ts=now,
                )
            )
        return out

    def weights(self) -> WeightsState:
        now = utc_now()
        installed = [
            InstalledWeights(
                name=f"org--{name}",
                repo=f"org/{name}",
                size_mb=mb,
                path=f"/var/lib/modelbus/weights/org--{name}",
                used_by=[name],
                installed_at=now - timedelta(days=self.rng.randint(1, 60)),
            )
            for name, mb in self.models
        ]
        return WeightsState(
            weights=installed,
            weights_dir="/var/lib/modelbus/weights",
            used_mb=sum(w.size_mb for w in installed),
            disk_total_mb=3_815_447,
            disk_free_mb=1_200_000,
            ts=now,
        )

    def finished_jobs(self) -> list[JobState]:
        """What an agent keeps retained for a while after its jobs end."""
        now = utc_now()
        jobs = []
        for number, (name, _) in enumerate(self.models[:3]):
            ended = now - timedelta(minutes=5 * (number + 1))
            jobs.append(
                JobState(
                    job_id=f"{self.host_id}-j{number}",
                    command=JobCommand.SWITCH,
                    model=name,
                    state=JobStatus.SUCCEEDED,
                    phase=JobPhase.DONE,
                    progress=1.0,
                    message=f"{name} is ready",
                    created_at=ended - timedelta(seconds=90),
                    started_at=ended - timedelta(seconds=88),
                    finished_at=ended,
                    ts=ended,
                )
            )
        return jobs

    def tick(self) -> tuple[list[GpuState], HostState]:
        """Every GPU moves a little, as real ones do between two samples."""
        now = utc_now()
        self.loading_mb = self.loading_mb + 900 if self.loading_mb < 20000 else 2000
        gpus = []
        for i in range(GPUS):
            self.util[i] = min(100, max(0, self.util[i] + self.rng.randint(-12, 12)))
            self.temp[i] = min(88, max(32, self.temp[i] + self.rng.randint(-1, 1)))
            self.jitter[i] = self.rng.randint(-64, 64)
            processes = []
            for m, ((name, mb), (_, on)) in enumerate(zip(self.models, self.ROLES, strict=True)):
                if i not in on or self.states[m] not in (
                    ModelLifecycle.READY,
                    ModelLifecycle.LOADING,
                ):
                    continue
                used = self.loading_mb if self.states[m] is ModelLifecycle.LOADING else mb
                processes.append(
                    GpuProcess(
                        pid=self.pids[i, m],
                        used_mb=used + self.jitter[i],
                        name="python3",
                        model=name,
                    )
                )
            processes.append(
                GpuProcess(pid=self.pids[i, 4], used_mb=400 + 8 * (i + 1), name="Xorg")
            )
            used_mb = min(GPU_TOTAL_MB, sum(p.used_mb or 0 for p in processes) + 310)
            gpus.append(
                GpuState(
                    index=i,
                    uuid=self._uuid(i),
                    name="NVIDIA H100 80GB HBM3",
                    memory_total_mb=GPU_TOTAL_MB,
                    memory_used_mb=used_mb,
                    memory_free_mb=GPU_TOTAL_MB - used_mb,
                    utilization_percent=self.util[i],
                    memory_utilization_percent=self.util[i] // 2,
                    temperature_c=self.temp[i],
                    power_w=round(70 + 6.3 * self.util[i] + self.rng.uniform(-5, 5), 1),
                    power_limit_w=700.0,
                    processes=processes,
                    alerts=["temperature_high"] if self.temp[i] >= 85 else [],
                    ts=now,
                )
            )
        loaded = {
            name: LoadedModel(model=name, service=f"{name}-svc", status=state.value)
            for (name, _), state in zip(self.models, self.states, strict=True)
            if state is ModelLifecycle.READY
        }
        busy = self.states[2] is ModelLifecycle.LOADING
        state = host_state(
            gpus,
            now,
            loaded_models=loaded,
            queue_length=1 if busy else 0,
            active_job=f"job-{self.host_id}-load" if busy else None,
        )
        return gpus, state

    def _uuid(self, index: int) -> str:
        return f"GPU-{abs(hash((self.host_id, index))) % 16**8:08x}-bench"


async def publish_fleet(url: str) -> None:
    """The fleet process: retained snapshot, ``ready`` on stdout, then 1 Hz telemetry
    and ``sent <count> <monotonic>`` once a second. SIGUSR1 pauses, SIGUSR2 resumes."""
    port = int(url.rsplit(":", 1)[1])
    rng = random.Random(7)
    catalog = model_catalog()
    hosts = [
        SimHost(n + 1, catalog[n * MODELS_PER_HOST : (n + 1) * MODELS_PER_HOST], rng)
        for n in range(HOSTS)
    ]
    loop = asyncio.get_running_loop()
    stop, running = asyncio.Event(), asyncio.Event()
    running.set()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, running.clear)
    loop.add_signal_handler(signal.SIGUSR2, running.set)
    sent = 0
    settings = ConnectionSettings("127.0.0.1", port, "bench-tui-fleet", persistent_session=False)
    async with connect(settings) as connection:

        async def put(topic: str, payload: bytes | str, qos: int) -> None:
            nonlocal sent
            await connection.publish(topic, payload, qos=qos, retain=True)
            sent += 1

        async def telemetry(host: SimHost) -> None:
            gpus, state = host.tick()
            for gpu in gpus:
                await put(host.topics.gpu(gpu.index), encode(gpu), 0)
            await put(host.topics.state, encode(state), 0)

        for host in hosts:  # what an agent publishes when it connects
            await put(host.topics.info, encode(host.info()), 1)
            for model in host.model_states():
                await put(host.topics.model(model.name), encode(model), 1)
            for job in host.finished_jobs():
                await put(host.topics.job(job.job_id), encode(job), 1)
            await put(host.topics.weights, encode(host.weights()), 1)
            await telemetry(host)
            await put(host.topics.status, Availability.ONLINE.value, 1)
        print("ready", flush=True)

        async def agent(host: SimHost) -> None:
            due = loop.time() + rng.random()
            while True:
                await asyncio.sleep(max(0.0, due - loop.time()))
                if running.is_set():
                    await telemetry(host)
                due = max(due + 1.0, loop.time())  # a late tick is not caught up in a burst

        async def report() -> None:
            while True:
                await asyncio.sleep(1.0)
                print(f"sent {sent} {time.monotonic():.3f}", flush=True)

        tasks = [asyncio.create_task(agent(h)) for h in hosts] + [asyncio.create_task(report())]
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# -- processes --------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo.extend(int(c) for c in task.read_text().split())
    return found


def cpu_seconds(pid: int) -> float:
    """User+system time of ``pid``, its threads and its live children."""
    total = 0
    for each in descendants(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def socket_backlog(pid: int) -> int:
    """Bytes received by ``pid``'s TCP sockets that it has not read yet."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    waiting = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    waiting += int(fields[4].split(":")[1], 16)
    return waiting


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 5.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Lines:
    """Reads a child's stdout in a thread: lines counted with the time they came."""

    def __init__(self, process: subprocess.Popen[bytes], keep: bool = False) -> None:
        self.count = 0
        self.bytes = 0
        self.kept: list[str] = []
        self._keep = keep
        self._seen = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            with self._seen:
                self.count += 1
                self.bytes += len(line)
                if self._keep:
                    self.kept.append(line.decode(errors="replace").strip())
                self._seen.notify_all()

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout_s: float) -> bool:
        with self._seen:
            return self._seen.wait_for(lambda: predicate(self.kept), timeout_s)


class Terminal:
    """A program in a pseudo-terminal of its own, its output drained and counted."""

    def __init__(self, argv: Sequence[str], mark: str) -> None:
        self.mark = mark
        self.bytes = 0
        self.tail = ""  # the latest output, escape sequences removed
        self.shown = threading.Event()
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "COLORTERM": "truecolor"}
        env.pop("NO_COLOR", None)
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            list(argv),
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=REPO,
            env=env,
            start_new_session=True,
        )
        os.close(slave)
        self.master = master
        self.shown_at: float | None = None
        self._raw = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def press(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def _drain(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: every holder of the slave side closed it
                break
            if not chunk:
                break
            self.bytes += len(chunk)
            # Keep a raw window so an escape sequence cut between reads is still removed.
            self._raw = (self._raw + self._decoder.decode(chunk))[-16384:]
            self.tail = ANSI.sub("", self._raw)
            if not self.shown.is_set() and self.mark in self.tail:
                self.shown_at = time.monotonic()
                self.shown.set()

    def first_frame_s(self) -> float:
        if not self.shown.wait(START_TIMEOUT_S):
            self.close()
            raise RuntimeError(
                f"no {self.mark!r} on screen within {START_TIMEOUT_S:.0f} s; "
                f"last output: {self.tail[-600:]!r}"
            )
        assert self.shown_at is not None
        return self.shown_at - self.started

    def close(self) -> int:
        """Ctrl+C as a user would press it; SIGTERM, then SIGKILL, if that is ignored."""
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                os.write(self.master, b"\x03")
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                stop_process(self.process)
        self._thread.join(2)
        if self.master >= 0:  # closed once only: the number may be reused by then
            os.close(self.master)
            self.master = -1
        return self.process.returncode


# -- measuring --------------------------------------------------------------------


def median_and_max(values: list[float]) -> tuple[float, float]:
    return statistics.median(values), max(values)


def row(name: str, ours: float, base: float | None, target: float | None, digits: int = 1) -> None:
    base_text = f"{base:10.{digits}f}" if base is not None else f"{'-':>10}"
    target_text = f"{target:10.{digits}f}" if target is not None else f"{'-':>10}"
    verdict = "" if target is None else ("meets" if ours <= target else "MISSES")
    print(f"{name:38} {ours:10.{digits}f} {base_text} {target_text}  {verdict}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="CPU window under load")
    parser.add_argument("--idle-seconds", type=float, default=8.0, help="CPU window, fleet paused")
    parser.add_argument("--starts", type=int, default=3, help="first frames to time")
    parser.add_argument("--quick", action="store_true", help="5 s windows, 2 starts each")
    parser.add_argument("--publish", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.publish:
        asyncio.run(publish_fleet(args.publish))
        return 0
    if args.quick:
        args.seconds, args.idle_seconds, args.starts = 5.0, 4.0, 2
    begun = time.monotonic()
    tui_argv = [sys.executable, "-m", "modelbus", "tui", "--prefix", PREFIX, "--broker"]
    started: list[subprocess.Popen[bytes]] = []
    problems: list[str] = []
    with MosquittoBroker(DEMO_CONFIG) as broker:
        fleet = subprocess.Popen(
            [sys.executable, __file__, "--publish", broker.url], cwd=REPO, stdout=subprocess.PIPE
        )
        started.append(fleet)
        terminals: list[Terminal] = []
        try:
            fleet_lines = Lines(fleet, keep=True)
            if not fleet_lines.wait_for(lambda lines: "ready" in lines, START_TIMEOUT_S):
                raise RuntimeError("the fleet publisher did not get ready")

            bare_starts = []
            for _ in range(args.starts):
                bare = Terminal([sys.executable, "-c", BARE_APP], BARE_MARK)
                terminals.append(bare)
                bare_starts.append(bare.first_frame_s())
                bare.close()

            # First frames with the fleet live; the last TUI stays for the CPU windows.
            tui_starts = []
            tui = None
            for i in range(args.starts):
                tui = Terminal([*tui_argv, broker.url], FIRST_FRAME_MARK)
                terminals.append(tui)
                started.append(tui.process)
                tui_starts.append(tui.first_frame_s())
                if i < args.starts - 1:
                    code = tui.close()
                    if code != 0:
                        problems.append(f"a TUI exited with {code}: {tui.tail[-400:]!r}")
            assert tui is not None

            port = str(broker.port)
            sub_argv = ["mosquitto_sub", "-h", "127.0.0.1", "-p", port, "-v", "-t"]
            sub = subprocess.Popen([*sub_argv, all_hosts_filter(PREFIX)], stdout=subprocess.PIPE)
            started.append(sub)
            sub_lines = Lines(sub)
            tui.press("g")  # each GPU's processes under its bar
            time.sleep(WARM_UP_S)

            def window(seconds: float) -> dict[str, float]:
                """CPU, output and backlog over ``seconds``, sampled every 0.25 s."""
                at = time.monotonic()
                tui_cpu, sub_cpu = cpu_seconds(tui.process.pid), cpu_seconds(sub.pid)
                out, received, sub_bytes = tui.bytes, sub_lines.count, sub_lines.bytes
                fleet_first = fleet_lines.kept[-1]
                backlog = sub_backlog = 0
                while time.monotonic() - at < seconds:
                    time.sleep(0.25)
                    backlog = max(backlog, socket_backlog(tui.process.pid))
                    sub_backlog = max(sub_backlog, socket_backlog(sub.pid))
                took = time.monotonic() - at
                fleet_last = fleet_lines.kept[-1]
                _, sent0, t0 = fleet_first.split()
                _, sent1, t1 = fleet_last.split()
                return {
                    "tui_cpu": (cpu_seconds(tui.process.pid) - tui_cpu) / took * 100,
                    "sub_cpu": (cpu_seconds(sub.pid) - sub_cpu) / took * 100,
                    "out_kib_s": (tui.bytes - out) / took / 1024,
                    "received_s": (sub_lines.count - received) / took,
                    "stream_kib_s": (sub_lines.bytes - sub_bytes) / took / 1024,
                    "sent_s": (int(sent1) - int(sent0)) / max(float(t1) - float(t0), 1e-9),
                    "backlog_kib": backlog / 1024,
                    "sub_backlog_kib": sub_backlog / 1024,
                }

            live = window(args.seconds)
            fleet.send_signal(signal.SIGUSR1)
            time.sleep(1.5)  # what was in flight is drawn before the idle window opens
            idle = window(args.idle_seconds)
            code = tui.close()
            if code != 0:
                problems.append(f"the measured TUI exited with {code}: {tui.tail[-400:]!r}")
            if "Traceback" in tui.tail:
                problems.append(f"the TUI printed a traceback: {tui.tail[-800:]!r}")
        finally:
            for terminal in terminals:
                terminal.close()
            for process in reversed(started):
                stop_process(process)
    leftovers = [p.pid for p in started if p.poll() is None]

    first_p50, first_max = median_and_max(tui_starts)
    bare_p50, bare_max = median_and_max(bare_starts)
    print(
        f"tui bench: {HOSTS} hosts x {GPUS} GPUs at 1 Hz, {HOSTS * MODELS_PER_HOST} models, "
        f"{COLUMNS}x{ROWS} pty, {args.seconds:.0f} s CPU window, local Mosquitto; "
        f"{os.cpu_count()} cores"
    )
    print(f"{'figure':38} {'modelbus':>10} {'baseline':>10} {'target':>10}  verdict")
    row("TUI CPU under load, % of one core", live["tui_cpu"], live["sub_cpu"], TARGET_CPU_PERCENT)
    row("TUI CPU, fleet paused, % of one core", idle["tui_cpu"], None, None)
    row("first frame p50, s", first_p50, bare_p50, TARGET_FIRST_FRAME_S, 2)
    row("first frame max, s", first_max, bare_max, TARGET_FIRST_FRAME_S, 2)
    row("terminal output under load, KiB/s", live["out_kib_s"], idle["out_kib_s"], None)
    row("unread in TUI socket, max KiB", live["backlog_kib"], live["sub_backlog_kib"], None)
    print(
        f"load: fleet sent {live['sent_s']:.0f} msg/s (expected {HOSTS * (GPUS + 1)}), "
        f"mosquitto_sub received {live['received_s']:.0f} msg/s, {live['stream_kib_s']:.0f} KiB/s"
    )
    print(
        f"ratios: TUI CPU is {live['tui_cpu'] / max(live['sub_cpu'], 0.01):.0f}x mosquitto_sub's "
        f"and {live['tui_cpu'] / max(idle['tui_cpu'], 0.01):.1f}x its own with the fleet paused; "
        f"first frame is {first_p50 / bare_p50:.1f}x a bare Textual app's (p50)"
    )
    print(
        "baselines: CPU, mosquitto_sub -v receiving the same stream in the same window; "
        "first frame, a bare Textual app painting one line in the same pty; output and "
        f"backlog, the TUI with the fleet paused and mosquitto_sub; run took "
        f"{time.monotonic() - begun:.0f} s"
    )
    for problem in problems:
        print(f"problem: {problem}")
    if leftovers:
        print(f"problem: processes still running: {leftovers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
