"""A simulated model server: an OpenAI-style HTTP server that holds simulated GPU memory.

``python -m devtools.simserver --port 8080 --state /tmp/gpus.bin --vram-mb 4096 --load-s 2``
stands in for llama.cpp or vLLM in the demo and the tests. It binds its port first (so a
port conflict fails at once), then "loads": its memory on the simulated GPUs rises in
RAMP_STEPS steps over ``--load-s`` seconds while ``/health`` answers 503 with the progress,
and once everything is held it answers 200 and prints ``ready``. The memory is held by this
process (its pid, named after the model) through :class:`devtools.gpu_sim.SimGpuClient`, so the
agent sees it exactly as it would see a real server on a real card.

Every option falls back to an environment variable, because the agent's process runtime
passes ``MODELBUS_MODEL``, ``MODELBUS_PORT``, ``MODELBUS_GPUS`` and ``MODELBUS_SIM_STATE``.
A flag on the command line wins over the variable.

Failure knobs, for exercising the agent: ``--exit-at-once`` (fails before binding or
allocating), ``--hang`` (stops at HANG_FRACTION of the memory and never becomes ready),
``--crash-after S`` (exits with CRASH_EXIT_CODE S seconds after the process started, so it
crashes while loading when S is shorter than the load; the memory is not released, the
simulator reclaims it when it notices the death, as a driver would), ``--overuse-mb N``
(holds N MiB more than ``--vram-mb``) and ``--fail-health-after S`` (``/health`` answers 500
once the server has been ready for S seconds, while the process keeps running).
``--say-every S`` prints a numbered line every S seconds once ready: a log that grows.

``--sleep-api vllm|sglang`` answers vLLM v0.11.0's sleep routes or SGLang v0.5.9's memory
release (devtools/sim_sleep.py says what each answers): asleep, the VRAM is released down to
``--sleep-vram-mb`` and, at level 1 and for SGLang, ``--sleep-ram-mb`` of real host RAM held;
falling asleep takes ``--sleep-s``, a wake ``--wake-s``, a level 2 reload ``--reload-s``.
``sleeping (level N)``, ``awake`` and ``weights reloaded`` are printed as ``ready`` is, and
``/health``'s body names the state (``sleeping``, ``waking``...).

SIGTERM or SIGINT stops serving, releases the memory (it comes back after the simulator's
release delay) and exits 0, whatever phase the server is in.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from agent import processes
from devtools.cuda_memory import CudaError, CudaMemory
from devtools.gpu_sim import SimGpuClient, SimGpuError, SimStoreError
from devtools.sim_api import (
    DEFAULT_ANSWER_TOKENS,
    DEFAULT_TOKENS_PER_S,
    Phase,
    SimHttpServer,
    Status,
)
from devtools.sim_sleep import SleepApi, SleepControl, SleepOptions

ENV_MODEL = "MODELBUS_MODEL"
ENV_PORT = "MODELBUS_PORT"
ENV_GPUS = "MODELBUS_GPUS"
ENV_STATE = "MODELBUS_SIM_STATE"
ENV_HOST = "MODELBUS_SIM_HOST"
ENV_VRAM_MB = "MODELBUS_SIM_VRAM_MB"
ENV_LOAD_S = "MODELBUS_SIM_LOAD_S"
ENV_UTILIZATION = "MODELBUS_SIM_UTILIZATION"
ENV_CRASH_AFTER = "MODELBUS_SIM_CRASH_AFTER"
ENV_HANG = "MODELBUS_SIM_HANG"
ENV_EXIT_AT_ONCE = "MODELBUS_SIM_EXIT_AT_ONCE"
ENV_OVERUSE_MB = "MODELBUS_SIM_OVERUSE_MB"
ENV_FAIL_HEALTH_AFTER = "MODELBUS_SIM_FAIL_HEALTH_AFTER"
ENV_TOKENS_PER_S = "MODELBUS_SIM_TOKENS_PER_S"
ENV_ANSWER_TOKENS = "MODELBUS_SIM_ANSWER_TOKENS"
ENV_SAY_EVERY = "MODELBUS_SIM_SAY_EVERY"
ENV_MEMORY = "MODELBUS_SIM_MEMORY"
ENV_SLEEP_API = "MODELBUS_SIM_SLEEP_API"
ENV_SLEEP_RAM_MB = "MODELBUS_SIM_SLEEP_RAM_MB"
ENV_SLEEP_VRAM_MB = "MODELBUS_SIM_SLEEP_VRAM_MB"
ENV_WAKE_S = "MODELBUS_SIM_WAKE_S"
ENV_SLEEP_S = "MODELBUS_SIM_SLEEP_S"
ENV_RELOAD_S = "MODELBUS_SIM_RELOAD_S"

DEFAULT_HOST = "127.0.0.1"
DEFAULT_MODEL = "sim-model"
DEFAULT_GPUS = "0"
DEFAULT_VRAM_MB = 1024

# Loading raises the memory in this many equal steps spread over --load-s.
RAMP_STEPS = 20
# Utilization reported while loading (weights being copied); --utilization applies once ready.
LOADING_UTILIZATION = 30
# A --hang server stops loading with this share of its memory held.
HANG_FRACTION = 0.5
CRASH_EXIT_CODE = 3
# How quickly serve_forever() notices shutdown(): bounds the time SIGTERM takes.
SERVE_POLL_S = 0.05

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


# ---- options -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SimServerOptions:
    port: int
    state_file: Path | None  # the simulator's; None with memory "cuda"
    host: str = DEFAULT_HOST
    model: str = DEFAULT_MODEL
    gpus: tuple[int, ...] = (0,)
    vram_mb: int = DEFAULT_VRAM_MB
    load_s: float = 0.0
    utilization_percent: int = 0
    crash_after_s: float | None = None
    hang: bool = False
    exit_at_once: bool = False
    overuse_mb: int = 0
    fail_health_after_s: float | None = None
    tokens_per_s: float = DEFAULT_TOKENS_PER_S
    answer_tokens: int | None = DEFAULT_ANSWER_TOKENS
    say_every_s: float | None = None
    sleep: SleepOptions = field(default_factory=SleepOptions)
    memory: str = "sim"  # "cuda": real device memory (devtools/cuda_memory.py)

    def allocation_mb(self) -> dict[int, int]:
        """MiB to hold on each GPU once loaded: the total split evenly, the remainder going
        to the first GPUs so the parts add up to exactly --vram-mb plus --overuse-mb."""
        total = self.vram_mb + self.overuse_mb
        share, remainder = divmod(total, len(self.gpus))
        return {gpu: share + (1 if i < remainder else 0) for i, gpu in enumerate(self.gpus)}


def _parse_port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError(f"{port} is not a TCP port (0-65535)")
    return port


def _parse_gpus(text: str) -> tuple[int, ...]:
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise ValueError("no GPU index given")
    gpus = tuple(int(part) for part in parts)
    if any(gpu < 0 for gpu in gpus) or len(set(gpus)) != len(gpus):
        raise ValueError(f"{text!r} must list distinct GPU indices 0 or more")
    return gpus


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"{value} is negative")
    return value


def _non_negative_seconds(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{text} is not a number of seconds 0 or more")
    return value


def _positive_seconds(text: str) -> float:
    value = _non_negative_seconds(text)
    if value == 0:
        raise ValueError(f"{text!r} must be more than 0 seconds")
    return value


def _percent(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 100:
        raise ValueError(f"{value} is not a percentage (0-100)")
    return value


def _flag(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{text!r} is not a yes/no value (1/0, true/false, yes/no, on/off)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.simserver",
        description="A simulated model server that holds simulated GPU memory. "
        "Every option falls back to the environment variable named in its help.",
    )
    add = parser.add_argument
    add("--port", help=f"TCP port to serve on (env {ENV_PORT}; required)")
    add("--host", help=f"address to bind (env {ENV_HOST}; default {DEFAULT_HOST})")
    add("--model", help=f"model name to report (env {ENV_MODEL}; default {DEFAULT_MODEL})")
    add("--gpus", help=f"comma list of GPU indices (env {ENV_GPUS}; default {DEFAULT_GPUS})")
    add("--state", help=f"simulated GPU state file (env {ENV_STATE}; required)")
    add(
        "--vram-mb",
        help=f"MiB to hold, split evenly across --gpus (env {ENV_VRAM_MB}; "
        f"default {DEFAULT_VRAM_MB})",
    )
    add(
        "--load-s",
        help=f"seconds to load, memory rising in {RAMP_STEPS} steps; 0 holds it at once "
        f"(env {ENV_LOAD_S}; default 0)",
    )
    add(
        "--utilization",
        help=f"GPU utilization percent while ready (env {ENV_UTILIZATION}; default 0; "
        f"{LOADING_UTILIZATION} while loading)",
    )
    add(
        "--crash-after",
        metavar="S",
        help=f"exit with code {CRASH_EXIT_CODE} S seconds after the process started, "
        f"while loading if S is shorter than the load (env {ENV_CRASH_AFTER})",
    )
    add(
        "--hang",
        action="store_true",
        default=None,
        help=f"stop loading at {HANG_FRACTION:.0%} of the memory and never become ready "
        f"(env {ENV_HANG}=1)",
    )
    add(
        "--exit-at-once",
        action="store_true",
        default=None,
        help=f"fail at startup with exit code 1, before binding or allocating "
        f"(env {ENV_EXIT_AT_ONCE}=1)",
    )
    add(
        "--overuse-mb",
        metavar="N",
        help=f"hold N MiB more than --vram-mb (env {ENV_OVERUSE_MB}; default 0)",
    )
    add(
        "--fail-health-after",
        metavar="S",
        help=f"answer /health with 500 once ready for S seconds (env {ENV_FAIL_HEALTH_AFTER})",
    )
    add(
        "--tokens-per-s",
        metavar="N",
        help=f"how fast a streamed answer comes, 0 as fast as it can (env {ENV_TOKENS_PER_S}; "
        f"default {DEFAULT_TOKENS_PER_S:g})",
    )
    add(
        "--answer-tokens",
        metavar="N",
        help=f"tokens in every answer (env {ENV_ANSWER_TOKENS}; default: one sentence)",
    )
    add(
        "--say-every",
        metavar="S",
        help=f"once ready, print a numbered line every S seconds, so that its log grows "
        f"(env {ENV_SAY_EVERY})",
    )
    add(
        "--memory",
        choices=["sim", "cuda"],
        help=f"hold simulated memory (the --state file) or real device memory through the "
        f"CUDA driver (devtools/cuda_memory.py; env {ENV_MEMORY}; default sim)",
    )
    add(
        "--sleep-api",
        choices=[api.value for api in SleepApi],
        help=f"answer vLLM's or SGLang's sleep routes (devtools/sim_sleep.py; env "
        f"{ENV_SLEEP_API}; default none)",
    )
    add(
        "--sleep-ram-mb",
        metavar="N",
        help=f"MiB of real host RAM held asleep at level 1 and by SGLang "
        f"(env {ENV_SLEEP_RAM_MB}; default 0)",
    )
    add(
        "--sleep-vram-mb",
        metavar="N",
        help=f"MiB of VRAM kept asleep, its CUDA context (env {ENV_SLEEP_VRAM_MB}; default 0)",
    )
    add("--wake-s", metavar="S", help=f"seconds a wake takes (env {ENV_WAKE_S}; default 0.5)")
    add(
        "--sleep-s",
        metavar="S",
        help=f"seconds falling asleep takes (env {ENV_SLEEP_S}; default 0.1)",
    )
    add(
        "--reload-s",
        metavar="S",
        help=f"seconds reload_weights takes after a level 2 sleep (env {ENV_RELOAD_S}; "
        "default --load-s)",
    )
    return parser


def parse_options(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> SimServerOptions:
    """Flags first, then environment variables, then defaults. Exits with status 2 and a
    message naming the flag or variable when a value is missing or malformed."""
    parser = _parser()
    args = parser.parse_args(argv)
    env = os.environ if environ is None else environ

    def pick(
        flag: str,
        value: str | bool | None,
        variable: str,
        convert: Callable[[str], Any],
        fallback: Any = None,
    ) -> Any:
        if isinstance(value, bool):
            return value
        source, text = (flag, value) if value is not None else (variable, env.get(variable))
        if text is None or (not text and value is None):
            return fallback  # an empty variable counts as unset
        try:
            return convert(text)
        except ValueError as exc:
            parser.error(f"{source}: {exc}")

    port = pick("--port", args.port, ENV_PORT, _parse_port)
    state = pick("--state", args.state, ENV_STATE, Path)
    if port is None:
        parser.error(f"give the port to serve on with --port or {ENV_PORT}")
    memory = pick("--memory", args.memory, ENV_MEMORY, str, "sim")
    if memory not in ("sim", "cuda"):
        parser.error(f"{ENV_MEMORY}: {memory!r} is neither sim nor cuda")
    if state is None and memory == "sim":
        parser.error(
            f"give the simulated GPU state file with --state or {ENV_STATE} "
            "(the agent passes it when gpu.backend is sim)"
        )
    return SimServerOptions(
        port=port,
        state_file=state,
        memory=memory,
        host=pick("--host", args.host, ENV_HOST, str, DEFAULT_HOST),
        model=pick("--model", args.model, ENV_MODEL, str, DEFAULT_MODEL),
        gpus=pick("--gpus", args.gpus, ENV_GPUS, _parse_gpus, _parse_gpus(DEFAULT_GPUS)),
        vram_mb=pick("--vram-mb", args.vram_mb, ENV_VRAM_MB, _non_negative_int, DEFAULT_VRAM_MB),
        load_s=pick("--load-s", args.load_s, ENV_LOAD_S, _non_negative_seconds, 0.0),
        utilization_percent=pick("--utilization", args.utilization, ENV_UTILIZATION, _percent, 0),
        crash_after_s=pick(
            "--crash-after", args.crash_after, ENV_CRASH_AFTER, _non_negative_seconds
        ),
        hang=pick("--hang", args.hang, ENV_HANG, _flag, False),
        exit_at_once=pick("--exit-at-once", args.exit_at_once, ENV_EXIT_AT_ONCE, _flag, False),
        overuse_mb=pick("--overuse-mb", args.overuse_mb, ENV_OVERUSE_MB, _non_negative_int, 0),
        fail_health_after_s=pick(
            "--fail-health-after",
            args.fail_health_after,
            ENV_FAIL_HEALTH_AFTER,
            _non_negative_seconds,
        ),
        tokens_per_s=pick(
            "--tokens-per-s",
            args.tokens_per_s,
            ENV_TOKENS_PER_S,
            _non_negative_seconds,
            DEFAULT_TOKENS_PER_S,
        ),
        answer_tokens=pick(
            "--answer-tokens",
            args.answer_tokens,
            ENV_ANSWER_TOKENS,
            _non_negative_int,
            DEFAULT_ANSWER_TOKENS,
        ),
        say_every_s=pick("--say-every", args.say_every, ENV_SAY_EVERY, _positive_seconds),
        sleep=SleepOptions(
            api=pick("--sleep-api", args.sleep_api, ENV_SLEEP_API, SleepApi, SleepApi.NONE),
            sleep_ram_mb=pick(
                "--sleep-ram-mb", args.sleep_ram_mb, ENV_SLEEP_RAM_MB, _non_negative_int, 0
            ),
            sleep_vram_mb=pick(
                "--sleep-vram-mb", args.sleep_vram_mb, ENV_SLEEP_VRAM_MB, _non_negative_int, 0
            ),
            wake_s=pick("--wake-s", args.wake_s, ENV_WAKE_S, _non_negative_seconds, 0.5),
            sleep_s=pick("--sleep-s", args.sleep_s, ENV_SLEEP_S, _non_negative_seconds, 0.1),
            reload_s=pick(
                "--reload-s",
                args.reload_s,
                ENV_RELOAD_S,
                _non_negative_seconds,
                pick("--load-s", args.load_s, ENV_LOAD_S, _non_negative_seconds, 0.0),
            ),
        ),
    )


# ---- output ----------------------------------------------------------------------------------


# Benchmarks set this to a file: the server appends when it was spawned, became ready,
# was asked to stop and exited, so the agent's own overhead can be told apart.
ENV_TIMINGS = "MODELBUS_SIM_TIMINGS"


def _process_started_at() -> float:
    """When this process was created (epoch seconds, clock-tick resolution), so the
    interpreter's start-up counts as the server's time, not the agent's."""
    age = processes.age_s(os.getpid())
    return time.time() - age if age is not None else time.time()


def _record_timing(model: str, event: str, at: float | None = None) -> None:
    path = os.environ.get(ENV_TIMINGS)
    if not path:
        return
    line = json.dumps({"model": model, "pid": os.getpid(), "event": event, "t": at or time.time()})
    with open(path, "a", encoding="utf-8") as timings:
        timings.write(line + "\n")


def _say(message: str) -> None:
    print(message, flush=True)


def _complain(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- lifecycle -------------------------------------------------------------------------------


class _Stop(Exception):
    """SIGTERM or SIGINT arrived."""


class _Crash(Exception):
    """--crash-after elapsed."""


class _StopSignals:
    """SIGTERM/SIGINT as something the main thread can wait for with a timeout.

    The Python handler only records the signal; ``set_wakeup_fd`` makes the C-level handler
    write to a pipe that ``wait`` selects on, so a signal wakes the wait even when the kernel
    delivered it to a server thread, and one arriving just before the select is not lost."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._previous: dict[int, Any] = {}
        self._previous_wakeup_fd = -1

    def install(self) -> None:
        self._previous_wakeup_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum

    def wait(self, timeout_s: float | None) -> bool:
        """True once a stop signal has arrived; False when ``timeout_s`` ran out first."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.received is None:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            readable, _, _ = select.select([self._read_fd], [], [], remaining)
            if readable:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._read_fd, 64):
                        pass
        return True

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        os.close(self._read_fd)
        os.close(self._write_fd)


class _SimServer:
    def __init__(
        self,
        options: SimServerOptions,
        http: SimHttpServer,
        client: SimGpuClient | CudaMemory,
        signals: _StopSignals,
        started: float,
    ) -> None:
        self.options = options
        self.http = http
        self.client = client
        self.signals = signals
        crash_after = options.crash_after_s
        self.crash_at = math.inf if crash_after is None else started + crash_after
        self.sleep: SleepControl | None = None
        if options.sleep.api is not SleepApi.NONE:
            target = options.allocation_mb()
            self.sleep = SleepControl(
                options.sleep,
                sum(target.values()),
                lambda fraction: self._hold(target, fraction, options.utilization_percent),
                _say,
                lambda event: _record_timing(options.model, event),
                workers=len(options.gpus),  # vLLM runs one worker per GPU it spans
            )
            http.sleep = self.sleep

    def run(self) -> int:
        crashed = False
        try:
            self._load()
            ready_at = time.monotonic()
            self.http.status = Status(Phase.READY, 1.0)
            if self.sleep is not None:
                with self.sleep.lock:
                    self.sleep.ready = True
            gpus = ",".join(map(str, self.options.gpus))
            total = sum(self.options.allocation_mb().values())
            _say(
                f"ready: {self.options.model} on http://{self.options.host}:"
                f"{self.http.server_address[1]} (GPU {gpus}, {total} MiB)"
            )
            _record_timing(self.options.model, "ready")
            if self.options.fail_health_after_s is not None:
                self._pause_until(ready_at + self.options.fail_health_after_s)
                self.http.status = Status(Phase.UNHEALTHY, 1.0)
                _complain("simulated health failure: /health answers 500 from now on")
            self._idle()
            raise AssertionError("unreachable: only a signal or a crash ends the wait")
        except _Stop:
            _record_timing(self.options.model, "term")
            _say("stopping")
            return 0
        except _Crash:
            # A crashed process releases nothing: the simulator reclaims the memory once it
            # notices the death, as a driver would.
            crashed = True
            _complain("simulated crash")
            return CRASH_EXIT_CODE
        except (SimGpuError, CudaError) as exc:
            _complain(f"error: {exc}")
            return 1
        finally:
            self.http.shutdown()
            self.http.server_close()
            if self.sleep is not None:
                self.sleep.close()  # after a wake under way: nothing holds memory after this
            if not crashed:
                self.client.release()
            self.client.close()
            _record_timing(self.options.model, "exit")

    def _idle(self) -> None:
        """Serve until a signal or a crash; with --say-every, printing a line that often."""
        every = self.options.say_every_s
        if every is None:
            self._pause_until(math.inf)
            return
        said, next_at = 0, time.monotonic()
        while True:
            said, next_at = said + 1, next_at + every
            self._pause_until(next_at)
            _say(f"{self.options.model}: line {said}")

    def _load(self) -> None:
        """Raise the memory step by step, publishing the progress; return once it is all
        held (a --hang server never returns)."""
        options = self.options
        target = options.allocation_mb()
        load_started = time.monotonic()
        steps = RAMP_STEPS if options.load_s > 0 else 1
        # The last step is taken after the loop, with the utilization of a ready server.
        last = math.ceil(steps * HANG_FRACTION) if options.hang else steps - 1
        for step in range(1, last + 1):
            self._pause_until(load_started + options.load_s * step / steps)
            fraction = min(step / steps, HANG_FRACTION) if options.hang else step / steps
            self._hold(target, fraction, LOADING_UTILIZATION)
            self.http.status = Status(Phase.LOADING, fraction)
        if options.hang:
            _complain(f"simulated hang: loading stopped at {HANG_FRACTION:.0%}")
            self._pause_until(math.inf)
        self._pause_until(load_started + options.load_s)
        self._hold(target, 1.0, options.utilization_percent)

    def _hold(self, target: Mapping[int, int], fraction: float, utilization: int) -> None:
        for gpu, mb in target.items():
            self.client.set_usage(
                gpu,
                round(mb * fraction),
                utilization_percent=utilization,
                name=self.options.model,
            )

    def _pause_until(self, deadline: float) -> None:
        """Sleep until ``deadline`` (time.monotonic()); raise _Stop on a signal and _Crash
        when --crash-after comes first."""
        while True:
            now = time.monotonic()
            wake = min(deadline, self.crash_at)
            if self.signals.wait(None if math.isinf(wake) else max(0.0, wake - now)):
                raise _Stop
            now = time.monotonic()
            if now >= self.crash_at:
                raise _Crash
            if now >= deadline:
                return


def _memory(options: SimServerOptions) -> SimGpuClient | CudaMemory:
    if options.memory == "cuda":
        return CudaMemory(options.gpus)
    assert options.state_file is not None
    return SimGpuClient(options.state_file)


def _check_gpus(options: SimServerOptions, client: SimGpuClient | CudaMemory) -> str | None:
    missing = [gpu for gpu in options.gpus if gpu >= client.gpu_count]
    if not missing:
        return None
    if isinstance(client, CudaMemory):
        return f"error: the CUDA driver shows no GPU {missing[0]} to this process"
    return (
        f"error: there is no simulated GPU {missing[0]}: {options.state_file} has GPUs "
        f"0-{client.gpu_count - 1}; pass --gpus within that range"
    )


def main(argv: Sequence[str] | None = None) -> int:
    started = time.monotonic()
    options = parse_options(argv)
    if os.environ.get(ENV_TIMINGS):
        _record_timing(options.model, "spawn", _process_started_at())
    if options.exit_at_once:
        _complain("error: simulated startup failure")
        return 1
    signals = _StopSignals()
    signals.install()
    try:
        try:
            http = SimHttpServer(
                (options.host, options.port),
                options.model,
                tokens_per_s=options.tokens_per_s,
                answer_tokens=options.answer_tokens,
            )
        except OSError as exc:
            reason = exc.strerror or str(exc)
            _complain(
                f"error: cannot listen on {options.host}:{options.port} ({reason.lower()}); "
                "stop whatever uses that port or choose another --port"
            )
            return 1
        threading.Thread(
            target=http.serve_forever,
            kwargs={"poll_interval": SERVE_POLL_S},
            name="simserver-http",
            daemon=True,
        ).start()
        try:
            client = _memory(options)
        except (SimStoreError, CudaError) as exc:
            http.shutdown()
            http.server_close()
            _complain(f"error: {exc}")
            return 1
        problem = _check_gpus(options, client)
        if problem is not None:
            client.close()
            http.shutdown()
            http.server_close()
            _complain(problem)
            return 1
        gpus = ",".join(map(str, options.gpus))
        total = sum(options.allocation_mb().values())
        _say(
            f"loading {options.model} on GPU {gpus}: {total} MiB over {options.load_s:g} s, "
            f"serving on port {http.server_address[1]} (pid {os.getpid()})"
        )
        return _SimServer(options, http, client, signals, started).run()
    finally:
        signals.close()


if __name__ == "__main__":
    raise SystemExit(main())
