"""Putting an evicted model to sleep instead of stopping it, and choosing which may sleep.

A sleeping model's server keeps running with its VRAM released (sleep_api.py); the swap
that evicts it waits, as for a stop, until the driver shows the memory back. What it then
holds in host RAM is measured (the resident memory of its processes) and budgeted
(``lifecycle.host_ram_mb``) by sleep_planner.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from agent import processes, sleep_api
from agent.catalog import ModelSpec
from agent.jobs import Job
from agent.model_registry import LifecyclePart, ModelRecord, Surroundings
from agent.runtimes.base import Instance, Runtime, RuntimeFailure
from agent.sleep_planner import Evicted, RestPlan, plan_rest
from agent.stopping import ServerStops
from shared.messages import Event, EventType, JobPhase, ModelLifecycle, Severity

log = logging.getLogger("modelbus.lifecycle")
# The swap's wait until a server answers its health check as the server just started.
WaitHealthy = Callable[[Job[Any], ModelSpec, Runtime, Instance, float], Awaitable[None]]


class Sleeps(LifecyclePart):
    def __init__(self, around: Surroundings, stops: ServerStops) -> None:
        super().__init__(around)
        self.stops = stops
        # Unset: half of this machine's memory.
        self.host_ram_mb = self.config.host_ram_mb or processes.host_memory_mb() // 2

    def plan(self, evict: Sequence[str], *, waking: str | None) -> RestPlan:
        """Which of ``evict`` sleep (sleep_planner.py); ``waking``: a sleeper the swap wakes."""
        records = self.registry.records
        evicted = [
            Evicted(
                name=name,
                can_sleep=self.config.sleep
                and records[name].spec.sleep is not None
                and records[name].state == ModelLifecycle.READY,
                ram_mb=records[name].sleep_ram_estimate_mb(),
                last_used=records[name].last_used_at or records[name].loaded_at or 0.0,
                load_s=records[name].learned_load_s or records[name].last_load_s,
                wake_s=records[name].last_wake_s,
            )
            for name in evict
        ]
        leaving = [waking] if waking else []
        return plan_rest(evicted, self.registry.sleepers(), self.host_ram_mb, leaving=leaving)

    async def put_to_sleep(self, record: ModelRecord, job: Job[Any], *, reason: str) -> bool:
        """Put a ready model to sleep and wait until its memory is back; False (and the
        model as it was) when its server would not sleep: the caller stops it instead."""
        instance = record.instance
        if instance is None:
            return False
        name = record.spec.name
        before, held = await self.stops.letting_go(record)
        began = time.monotonic()
        try:
            await sleep_api.put_to_sleep(record.spec, record.spec.stop_timeout_s)
        except sleep_api.SleepFailure as failure:
            log.warning("%s did not sleep, so it is stopped: %s", name, failure)
            record.state = ModelLifecycle.READY
            return False
        job.add_time("sleep_s", time.monotonic() - began)
        job.advance(JobPhase.WAITING_VRAM, job.progress, f"waiting for {name}'s memory")
        await self.stops.wait_returned(name, held, before)
        try:
            pids = await self.registry.runtime(record).pids(instance)
        except RuntimeFailure:
            pids = frozenset()
        record.sleep_ram_mb = await asyncio.to_thread(processes.resident_mb, pids) or None
        if record.sleep_ram_mb is not None:
            await asyncio.to_thread(self.registry.store.record_sleep, name, record.sleep_ram_mb)
        record.state, record.health = ModelLifecycle.SLEEPING, "asleep"
        await self.publisher.model_changed(record.snapshot())
        await self.publisher.event(
            Event(
                event_type=EventType.MODEL_ASLEEP,
                severity=Severity.INFO,
                message=f"{name} asleep ({reason}): its VRAM is free, "
                f"{record.sleep_ram_estimate_mb()} MiB of host RAM held",
                model=name,
                job_id=job.job_id,
            )
        )
        await self.publisher.state_changed()
        return True

    async def wake(
        self,
        job: Job[Any],
        record: ModelRecord,
        gpus: tuple[int, ...],
        wait_healthy: WaitHealthy,
    ) -> bool:
        """Wake a sleeping model and wait until it is healthy; False when its server would
        not wake (it is stopped then, and the caller starts it anew)."""
        spec, instance = record.spec, record.instance
        assert instance is not None
        runtime = self.registry.runtime(record)
        job.advance(JobPhase.STARTING, 0.15, f"waking {spec.name}")
        await self.stops.update_job(job)
        record.state, record.health, record.error = ModelLifecycle.WAKING, "waking", None
        await self.publisher.model_changed(record.snapshot())
        began = time.monotonic()
        try:
            await sleep_api.wake(spec, spec.load_timeout_s)
        except sleep_api.SleepFailure as failure:
            log.warning("%s did not wake, so it is started anew: %s", spec.name, failure)
            await self.stops.stop(record, job, reason="it did not wake")
            return False
        await wait_healthy(job, spec, runtime, instance, began)
        wake_s = time.monotonic() - began
        job.add_time("wake_s", wake_s)
        record.last_used_at = time.time()
        record.last_wake_s = wake_s
        await asyncio.to_thread(self.registry.store.record_wake, spec.name, wake_s)
        await self.now_ready(
            record, gpus, job.job_id, f"{{name}} woken on GPU {{gpus}} in {wake_s:.2f} s"
        )
        return True
