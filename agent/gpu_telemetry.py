"""The GPUs as the bus sees them: sampled off the event loop, judged by the alert
rules, and published when they change (at once when the backend signals a change,
else on a cheap signature or the periodic tick), with the host's ``state`` beside them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from agent.alerts import AlertsConfig, AlertTracker
from agent.alerts import to_event as alert_event
from agent.config import TelemetryConfig
from agent.gpu.base import ChangeSignal, DriverInfo, GpuBackend, GpuSample, GpuUnavailableError
from agent.telemetry import ChangeFilter, ProcessOwner, gpu_state
from bus.reconnecting import ReconnectingClient
from shared.messages import Event, EventType, GpuState, HostState, Severity, encode, utc_now
from shared.topics import HostTopics

log = logging.getLogger("modelbus.agent")

T = TypeVar("T")
# How long changes of the host state (queue length, active job, models) are gathered
# before ``state`` is published: a burst of commands changes the queue with each one.
STATE_COALESCE_S = 0.05


class GpuTelemetry:
    def __init__(
        self,
        config: TelemetryConfig,
        alerts: AlertsConfig,
        backend: GpuBackend,
        topics: HostTopics,
        client: ReconnectingClient,
        *,
        owner_of: Callable[[int], ProcessOwner | None],
        host_state: Callable[[list[GpuState]], HostState],
        event: Callable[[Event], Awaitable[None]],
        gpus_sampled: Callable[[tuple[int, ...]], None],
    ) -> None:
        self.config = config
        self.backend = backend
        self._topics = topics
        self._client = client
        self._owner_of = owner_of
        self._host_state = host_state
        self._event = event
        self._gpus_sampled = gpus_sampled
        self.driver: DriverInfo | None = None
        self.gpus: list[GpuState] = []
        self.state: HostState | None = None
        self._samples: tuple[GpuSample, ...] = ()
        self._changes = ChangeFilter()
        # Sampling and publishing of telemetry never interleave: a reconnect's
        # republish and a change-triggered publish would otherwise race.
        self._lock = asyncio.Lock()
        self._alerts = AlertTracker(alerts)

    @property
    def samples(self) -> tuple[GpuSample, ...]:
        return self._samples

    async def start(self) -> None:
        """Query the GPUs once; raises GpuUnavailableError with a user-facing sentence."""
        self.driver = await self.call(self.backend.driver_info)
        await self.sample()

    async def republish(self) -> None:
        """Every GPU and the state, as on a fresh connection."""
        async with self._lock:
            self._changes.forget()
            self._publish(publish_all=True)

    async def call(self, fn: Callable[[], T]) -> T:
        """Blocking backend calls run off the event loop, under a timeout (asyncio.timeout,
        not wait_for, which on Python 3.11 can swallow a cancellation)."""
        async with asyncio.timeout(self.config.sample_timeout_s):
            return await asyncio.to_thread(fn)

    async def fresh_samples(self) -> tuple[GpuSample, ...]:
        return await self.call(self.backend.sample)

    async def sample(self) -> None:
        previous = {s.index: s.lost for s in self._samples}
        self._samples = await self.call(self.backend.sample)
        ts = utc_now()
        gpus = [gpu_state(sample, ts, self._owner_of) for sample in self._samples]
        # Threshold alerts (with hysteresis) judge the fresh figures; each start and
        # clear is one event, and what is active goes into the GPU's alerts list.
        changes = self._alerts.update(gpus, time.monotonic())
        self.gpus = [_with_alerts(gpu, self._alerts.active(gpu.index)) for gpu in gpus]
        for change in changes:
            await self._event(alert_event(change))
        self._gpus_sampled(tuple(sample.index for sample in self._samples))
        self.state = self._host_state(self.gpus)
        for sample in self._samples:
            if sample.lost and not previous.get(sample.index, False):
                await self._event(
                    Event(
                        event_type=EventType.GPU_LOST,
                        severity=Severity.CRITICAL,
                        message=f"GPU {sample.index} ({sample.name}) stopped answering",
                        gpu=sample.index,
                    )
                )

    async def run(self) -> None:
        telemetry = self.config
        signal = self.backend.change_signal() if telemetry.publish_on_change else None
        if signal is not None:
            await self._follow_change_signal(signal)
        elif telemetry.publish_on_change:
            await self._poll_for_changes()
        else:
            while True:
                await asyncio.sleep(telemetry.interval_s)
                await self._refresh(publish_all=True)

    async def _follow_change_signal(self, signal: ChangeSignal) -> None:
        """Sleep until a writer announces a change, a silent change falls due (memory
        coming back after a release) or the periodic tick: no polling while idle."""
        telemetry = self.config
        changed = asyncio.Event()

        def on_readable() -> None:
            # Drain here: the reader is level-triggered and would otherwise spin.
            signal.drain()
            changed.set()

        loop = asyncio.get_running_loop()
        loop.add_reader(signal.fileno(), on_readable)
        try:
            next_tick = time.monotonic() + telemetry.interval_s
            while True:
                timeout = next_tick - time.monotonic()
                due = signal.next_due_s()
                if due is not None:
                    timeout = min(timeout, due)
                if timeout > 0 and not changed.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(timeout):
                            await changed.wait()
                changed.clear()
                tick = time.monotonic() >= next_tick
                if tick:
                    next_tick = time.monotonic() + telemetry.interval_s
                await self._refresh(publish_all=tick)
                if not tick:
                    # A loading server changes memory many times a second: coalesce.
                    await asyncio.sleep(telemetry.change_coalesce_s)
        finally:
            loop.remove_reader(signal.fileno())

    async def _poll_for_changes(self) -> None:
        """For backends without notifications: compare a cheap signature between ticks."""
        telemetry = self.config
        next_tick = time.monotonic() + telemetry.interval_s
        signature = await self._signature()
        while True:
            await asyncio.sleep(
                max(0.0, min(telemetry.watch_interval_s, next_tick - time.monotonic()))
            )
            current = await self._signature()
            tick = time.monotonic() >= next_tick
            if tick:
                next_tick = time.monotonic() + telemetry.interval_s
            if tick or current != signature:
                signature = current
                await self._refresh(publish_all=tick)

    async def _signature(self) -> tuple[int, ...]:
        try:
            return await self.call(self.backend.memory_signature)
        except (GpuUnavailableError, TimeoutError) as exc:
            log.warning("GPU change watch failed: %s", exc or "timed out")
            return ()

    async def _refresh(self, *, publish_all: bool) -> None:
        async with self._lock:
            try:
                await self.sample()
            except (GpuUnavailableError, TimeoutError) as exc:
                log.error("GPU sampling failed: %s", exc or "timed out")
                return
            # Without a connection there is nothing to tell: the next connect
            # republishes every GPU and the state.
            if self._client.connection is not None:
                self._publish(publish_all=publish_all)

    def _publish(self, *, publish_all: bool) -> None:
        for gpu in self.gpus:
            topic = self._topics.gpu(gpu.index)
            if self._changes.changed(topic, gpu) or publish_all:
                self._client.publish(topic, encode(gpu), qos=0, retain=True)
        assert self.state is not None
        if self._changes.changed(self._topics.state, self.state) or publish_all:
            self._client.publish(self._topics.state, encode(self.state), qos=0, retain=True)

    async def publish_state(self) -> None:
        """Publish ``state`` if it changed (the host's queue or models did)."""
        if not self.gpus:
            return
        self.state = self._host_state(self.gpus)
        if self._changes.changed(self._topics.state, self.state):
            self._client.publish(self._topics.state, encode(self.state), qos=0, retain=True)


def _with_alerts(gpu: GpuState, active: list[str]) -> GpuState:
    """The GPU's state with the threshold alerts active on it (no copy when none)."""
    return gpu.model_copy(update={"alerts": [*gpu.alerts, *active]}) if active else gpu
