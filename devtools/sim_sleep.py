"""The simulated server's sleep mode: vLLM's and SGLang's routes, with their effects.

What it copies, pinned to two releases read from their published source distributions:

vLLM v0.11.0 (``vllm-0.11.0.tar.gz``, sha256 f435a64c24e9c4178d657a76f8edd8548ddc444012f7d06a
9f79ac3a6392bfae): ``vllm/entrypoints/openai/api_server.py`` serves, when started with
``--enable-sleep-mode`` and ``VLLM_SERVER_DEV_MODE=1``,

- ``POST /sleep?level=1|2`` (level 1 when absent): 200 with an empty body, once asleep.
  ``AsyncLLM.sleep`` resets the prefix cache first; the executor ignores a sleep while
  asleep (a warning, 200). Level 1 copies the weights to host RAM and discards the KV cache,
  level 2 discards both (``vllm/v1/worker/gpu_worker.py``).
- ``POST /wake_up`` (optional ``?tags=weights|kv_cache``): 200, empty body, once the memory
  is back; a wake while awake is ignored (200).
- ``GET /is_sleeping``: ``{"is_sleeping": bool}``; the engine answers it after a sleep or
  wake under way, as it handles those calls one at a time.
- ``POST /collective_rpc`` with ``{"method": "reload_weights"}``: runs the method on every
  worker (one per GPU here) and answers ``{"results": [null, ...]}``; a body that is not
  JSON or has no ``method`` is a 400 in vLLM's error shape. After a level 2 wake the weights'
  memory is back but holds nothing: vLLM's sleep-mode docs load the weights this way before
  serving. ``reset_prefix_cache`` is not needed then (the sleep already reset it); the route
  is accepted (200, empty body) because vLLM serves it beside the others.
- ``GET /health`` stays 200 asleep (``check_health`` only asks whether the engine died).
- Inference asleep has no guard in v0.11.0: the model would run on unmapped memory (level 1)
  or on garbage weights (level 2 not reloaded). The simulator answers 503 in OpenAI's error
  shape instead, so a client that forgets to wake or reload sees it at once.

SGLang v0.5.9 (``sglang-0.5.9.tar.gz``, sha256 11b1445bfb039c20217783850fda66a71b814391b2cf313
f4e6cadc3b9fea41b), started with ``--enable-memory-saver`` and ``--enable-weights-cpu-backup``
(so the weights wait in host RAM as at vLLM's level 1): ``sglang/srt/entrypoints/http_server.py``
serves ``/release_memory_occupation`` and ``/resume_memory_occupation`` for GET and POST, each
taking a JSON object (``{}`` or ``{"tags": ["weights", "kv_cache", "cuda_graph"]}``; a missing
body is FastAPI's 422) and answering 200 with the body ``null``. Its ``/health`` sends a
one-token generation that the scheduler skips while memory is released, so it answers 503
(after ``SGLANG_HEALTH_CHECK_TIMEOUT``, 20 s; here at once). A resume of memory that was not
released raises ``KeyError`` in SGLang's scheduler, which takes the server down; the simulator
answers 500 instead. A second release is answered 200 here (not verified against SGLang).

Simplifications: tags are accepted and ignored (a sleep, release, wake or resume moves the
whole memory), and a tag SGLang does not know is refused (400); a level other than 1 or 2 is
refused (400) where vLLM would take it for a level 2; the only ``collective_rpc`` method is
``reload_weights`` (another is a 500, as a failing call is).

Asleep, the server holds ``--sleep-vram-mb`` of its VRAM (a CUDA context) and, at level 1 and
for SGLang, ``--sleep-ram-mb`` of real host RAM: anonymous memory whose pages are written, so
its resident set grows by that much. Falling asleep takes ``--sleep-s``, a wake ``--wake-s``
(the memory rising in WAKE_STEPS steps), a reload ``--reload-s``. Inference answers 503 while
any of them is under way. The calls change the memory one at a time (``SleepControl.lock``),
on the HTTP thread that asked; the main thread touches the memory only while loading (before
any call is taken) and on its way out, after ``close`` stopped the call under way.
"""

from __future__ import annotations

import mmap
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

MIB = 1024 * 1024
# Host RAM is written this much at a time (every page of it, so the kernel backs it).
TOUCH_CHUNK = MIB
# A wake raises the memory in this many equal steps spread over --wake-s.
WAKE_STEPS = 10
# What SGLang 0.5.9 can release (sglang/srt/constants.py, GPU_MEMORY_ALL_TYPES).
SGLANG_TAGS = frozenset({"weights", "kv_cache", "cuda_graph"})
VLLM_ROUTES = frozenset({"/sleep", "/wake_up", "/collective_rpc", "/reset_prefix_cache"})
SGLANG_ROUTES = frozenset({"/release_memory_occupation", "/resume_memory_occupation"})


class SleepApi(StrEnum):
    NONE = "none"
    VLLM = "vllm"
    SGLANG = "sglang"

    @property
    def routes(self) -> frozenset[str]:
        """The POST routes it answers (vLLM's ``GET /is_sleeping`` aside)."""
        if self is SleepApi.VLLM:
            return VLLM_ROUTES
        if self is SleepApi.SGLANG:
            return SGLANG_ROUTES
        return frozenset()


@dataclass(frozen=True, slots=True)
class SleepOptions:
    api: SleepApi = SleepApi.NONE
    sleep_ram_mb: int = 0
    sleep_vram_mb: int = 0
    wake_s: float = 0.5
    sleep_s: float = 0.1
    reload_s: float = 0.0


@dataclass(frozen=True, slots=True)
class SleepState:
    """Replaced whole under the lock, so handler threads read it without one."""

    asleep: bool = False
    level: int = 0  # of the last sleep
    weights_discarded: bool = False  # woken from level 2, not reloaded yet
    doing: str | None = None  # "falling_asleep", "waking", "reloading_weights"

    @property
    def serving(self) -> bool:
        return not (self.asleep or self.weights_discarded or self.doing)

    @property
    def name(self) -> str:
        """What /health's body says."""
        if self.doing is not None:
            return self.doing
        if self.asleep:
            return "sleeping"
        return "weights_discarded" if self.weights_discarded else "ok"

    def refusal(self, api: SleepApi) -> str:
        """Why an inference request is refused now (only asked when not serving)."""
        if self.doing == "reloading_weights":
            return "its weights are being reloaded; try again once POST /collective_rpc answers"
        if self.weights_discarded:
            return (
                "its weights were discarded by a level 2 sleep: POST /collective_rpc "
                '{"method": "reload_weights"} first'
            )
        if api is SleepApi.SGLANG:
            return "its memory is released: POST /resume_memory_occupation first"
        return f"the model is sleeping (level {self.level}): POST /wake_up first"


class SleepRefused(Exception):
    """Asked while it cannot sleep or wake (still loading, stopping): 503."""


class SleepConflict(Exception):
    """A call the real server fails on (see the module's notes): 500."""


class SleepControl:
    """One server's sleep state, changed from HTTP threads one call at a time.

    ``hold(fraction)`` sets the server's VRAM to that share of its full use."""

    def __init__(
        self,
        options: SleepOptions,
        total_mb: int,
        hold: Callable[[float], None],
        say: Callable[[str], None],
        record: Callable[[str], None] = lambda event: None,
        *,
        workers: int = 1,
    ) -> None:
        self.options = options
        self.total_mb = total_mb
        self.hold = hold
        self.say = say
        # Benchmarks read when it fell asleep and woke (simserver's timings file).
        self.record = record
        self.workers = workers
        self.lock = threading.Lock()
        self.ready = False  # loaded: set by the main thread, under the lock
        self.closed = False
        self.state = SleepState()
        self._stopping = threading.Event()
        self._ram: mmap.mmap | None = None

    @property
    def kept_fraction(self) -> float:
        """The share of its VRAM a sleeping server keeps (--sleep-vram-mb)."""
        if not self.total_mb:
            return 0.0
        return min(1.0, self.options.sleep_vram_mb / self.total_mb)

    def is_sleeping(self) -> bool:
        """vLLM's answer: after the call under way, as its engine answers in turn."""
        with self.lock:
            return self.state.asleep

    def sleep(self, level: int) -> None:
        with self.lock:
            self._check()
            if self.state.asleep:
                return
            discarded = self.state.weights_discarded or level == 2
            self._set(doing="falling_asleep", level=level)
            self.record("sleep")
            _complain(f"falling asleep (level {level}) over {self.options.sleep_s:g} s")
            if level == 1 and self.options.sleep_ram_mb:
                # Level 1 copies the weights to host RAM before it frees the device memory.
                self._ram = _touched(self.options.sleep_ram_mb)
            self._pause(self.options.sleep_s)
            self.hold(self.kept_fraction)
            self._set(asleep=True, level=level, weights_discarded=discarded)
            self.record("asleep")
            self.say(f"sleeping (level {level})")

    def wake(self) -> None:
        """vLLM's ``/wake_up``: nothing to do when awake."""
        with self.lock:
            self._check()
            if self.state.asleep:
                self._wake()

    def resume(self) -> None:
        """SGLang's ``/resume_memory_occupation``: awake, SGLang's scheduler fails on it."""
        with self.lock:
            self._check()
            if not self.state.asleep:
                raise SleepConflict(
                    "its memory is not released, so there is nothing to resume (SGLang's "
                    "scheduler raises KeyError here and the server goes down)"
                )
            self._wake()

    def reload_weights(self) -> list[None]:
        """``collective_rpc`` ``reload_weights``: what each worker returned."""
        with self.lock:
            self._check()
            if self.state.asleep:
                raise SleepConflict(
                    "Call to collective_rpc method failed: the model is asleep, so its weights "
                    "have no device memory to load into; POST /wake_up first"
                )
            self._set(doing="reloading_weights")
            _complain(f"reloading weights over {self.options.reload_s:g} s")
            self._pause(self.options.reload_s)
            self._set(weights_discarded=False)
            self.say("weights reloaded")
            return [None] * self.workers

    def close(self) -> None:
        """The server exits: a call under way stops (answering 503), no memory changes
        after this, and the host RAM is freed."""
        self._stopping.set()
        with self.lock:
            self.closed = True
            self._free_ram()

    def _wake(self) -> None:
        state = self.state
        self._set(doing="waking")
        self.record("wake")
        _complain(f"waking (level {state.level}) over {self.options.wake_s:g} s")
        started, kept = time.monotonic(), self.kept_fraction
        for step in range(1, WAKE_STEPS + 1):
            self._pause(started + self.options.wake_s * step / WAKE_STEPS - time.monotonic())
            self.hold(kept + (1.0 - kept) * step / WAKE_STEPS)
        # The weights are back on the device: the host copy goes.
        self._free_ram()
        self._set(asleep=False, weights_discarded=state.weights_discarded)
        self.record("awake")
        self.say("awake")
        if state.weights_discarded:
            _complain(
                'weights discarded at level 2: POST /collective_rpc {"method": '
                '"reload_weights"} before it serves'
            )

    def _set(
        self,
        *,
        asleep: bool | None = None,
        level: int | None = None,
        weights_discarded: bool | None = None,
        doing: str | None = None,
    ) -> None:
        state = self.state
        self.state = SleepState(
            asleep=state.asleep if asleep is None else asleep,
            level=state.level if level is None else level,
            weights_discarded=(
                state.weights_discarded if weights_discarded is None else weights_discarded
            ),
            doing=doing,
        )

    def _pause(self, seconds: float) -> None:
        """Wait ``seconds``; a server on its way out stops the call (with the state as it
        was, the memory as it is: the exit releases it all)."""
        if self._stopping.wait(max(0.0, seconds)):
            self._set(doing=None)
            raise SleepRefused("the server is stopping")

    def _check(self) -> None:
        if self.closed or self._stopping.is_set():
            raise SleepRefused("the server is stopping")
        if not self.ready:
            raise SleepRefused("the model is not loaded")

    def _free_ram(self) -> None:
        if self._ram is not None:
            self._ram.close()
            self._ram = None


def sglang_tags(request: object) -> list[str] | None:
    """The ``tags`` of SGLang's release/resume body; ValueError says what is wrong with its
    shape (FastAPI's 422; the caller checks the names)."""
    if not isinstance(request, dict):
        raise ValueError('the body must be a JSON object, such as {} or {"tags": [...]}')
    tags = request.get("tags")
    if tags is None:
        return None
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        raise ValueError("'tags' must be a list of strings or null")
    return tags


def _touched(mb: int) -> mmap.mmap:
    """``mb`` MiB of anonymous memory, every page written so the kernel backs it."""
    size = mb * MIB
    memory = mmap.mmap(-1, size)
    chunk = b"\x01" * TOUCH_CHUNK
    for offset in range(0, size, TOUCH_CHUNK):
        memory[offset : offset + TOUCH_CHUNK] = chunk[: size - offset]
    return memory


def _complain(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
