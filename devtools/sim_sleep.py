"""The simulated server's sleep mode: vLLM's and SGLang's routes, with their effects.

``--sleep-api vllm`` answers the routes vLLM 0.11 serves with ``--enable-sleep-mode`` and
``VLLM_SERVER_DEV_MODE=1``: ``POST /sleep?level=1|2`` (200, empty body), ``POST /wake_up``
(200, empty body; it returns once the memory is back), ``GET /is_sleeping``
(``{"is_sleeping": bool}``), and after a level 2 sleep ``POST /collective_rpc`` with
``{"method": "reload_weights"}`` and ``POST /reset_prefix_cache``, without which it answers no
inference. ``--sleep-api sglang`` answers SGLang 0.5's ``POST /release_memory_occupation``
and ``POST /resume_memory_occupation`` (JSON bodies, ``{}`` or with ``tags``; 200).

Asleep, the server holds ``--sleep-vram-mb`` of its VRAM (a CUDA context) and, at level 1 and
for SGLang, ``--sleep-ram-mb`` of real host RAM: anonymous memory whose pages are written, so
its resident set grows by that much, as a real server's does when it keeps the weights in host
memory. A wake takes ``--wake-s`` (the memory rising in steps), a level 2 reload
``--reload-s``, falling asleep ``--sleep-s``. Inference while asleep (or with the weights not
reloaded) answers 503 in OpenAI's error shape; ``/health`` answers 200 all along, as vLLM's does.
Sleeping while asleep and waking while awake change nothing and answer 200.
"""

from __future__ import annotations

import mmap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

PAGE = mmap.PAGESIZE
# A wake raises the memory in this many equal steps spread over --wake-s.
WAKE_STEPS = 10


class SleepApi(StrEnum):
    NONE = "none"
    VLLM = "vllm"
    SGLANG = "sglang"


@dataclass(frozen=True, slots=True)
class SleepOptions:
    api: SleepApi = SleepApi.NONE
    sleep_ram_mb: int = 0
    sleep_vram_mb: int = 0
    wake_s: float = 0.5
    sleep_s: float = 0.1
    reload_s: float = 0.0


class SleepRefused(Exception):
    """Asked to sleep or wake when it cannot (still loading, closing): 503."""


class SleepControl:
    """One server's sleep state, changed from HTTP threads one request at a time.

    ``hold(fraction)`` sets the server's VRAM to that share of its full use; the main thread
    holds ``lock`` whenever it changes the memory itself (loading, exiting)."""

    def __init__(
        self,
        options: SleepOptions,
        total_mb: int,
        hold: Callable[[float], None],
        say: Callable[[str], None],
        record: Callable[[str], None] = lambda event: None,
    ) -> None:
        self.options = options
        self.total_mb = total_mb
        self.hold = hold
        self.say = say
        # Benchmarks read when it fell asleep and woke (simserver's timings file).
        self.record = record
        self.lock = threading.Lock()
        self.ready = False  # loaded: set by the main thread
        self.closed = False
        self.asleep = False
        self.level = 0
        self.weights_discarded = False
        self._ram: mmap.mmap | None = None

    @property
    def serving(self) -> bool:
        return not self.asleep and not self.weights_discarded

    def sleep(self, level: int) -> None:
        with self.lock:
            self._check()
            if self.asleep:
                return
            self.record("sleep")
            time.sleep(self.options.sleep_s)
            kept = self.options.sleep_vram_mb
            self.hold(min(1.0, kept / self.total_mb) if self.total_mb else 0.0)
            if level == 1 and self.options.sleep_ram_mb:
                self._ram = _touched(self.options.sleep_ram_mb)
            self.asleep, self.level = True, level
            self.record("asleep")
            self.say(f"sleeping (level {level})")

    def wake(self) -> None:
        with self.lock:
            self._check()
            if not self.asleep:
                return
            self.record("wake")
            started = time.monotonic()
            for step in range(1, WAKE_STEPS + 1):
                _pause_until(started + self.options.wake_s * step / WAKE_STEPS)
                self.hold(step / WAKE_STEPS)
            self._free_ram()
            self.asleep = False
            self.weights_discarded = self.level == 2
            self.record("awake")
            self.say("awake" + (" (weights to reload)" if self.weights_discarded else ""))

    def reload_weights(self) -> None:
        with self.lock:
            self._check()
            if self.asleep:
                raise SleepRefused("wake it up before reloading its weights")
            time.sleep(self.options.reload_s)
            self.weights_discarded = False

    def close(self) -> None:
        """The server exits: no memory change after this; the RAM is freed."""
        with self.lock:
            self.closed = True
            self._free_ram()

    def _check(self) -> None:
        if self.closed or not self.ready:
            raise SleepRefused("the model is not loaded")

    def _free_ram(self) -> None:
        if self._ram is not None:
            self._ram.close()
            self._ram = None


def _touched(mb: int) -> mmap.mmap:
    """``mb`` MiB of anonymous memory, every page written so the kernel backs it."""
    size = mb * 1024 * 1024
    memory = mmap.mmap(-1, size)
    for offset in range(0, size, PAGE):
        memory[offset] = 1
    return memory


def _pause_until(deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining > 0:
        time.sleep(remaining)
