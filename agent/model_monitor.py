"""The watch over running models between swaps: a server that exits or stops answering
its health check is a crash (restarted when its entry says ``restart: on-crash``), an
adopted server still loading turns ready once healthy, and a model idle longer than
its ``ttl_s`` is unloaded."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from agent import sleep_api
from agent.health import probe
from agent.jobs import SwapRequest
from agent.model_registry import LifecyclePart, ModelRecord, Surroundings
from agent.runtimes.base import RuntimeFailure
from agent.swap import LOG_LINES_IN_ERRORS, log_tail
from shared.commands import CommandError
from shared.messages import Event, EventType, JobCommand, ModelLifecycle, Severity

log = logging.getLogger("modelbus.lifecycle")

# Queues a job of the agent's own (an unload for the ttl, a restart after a crash).
Submit = Callable[[SwapRequest, str], object]


class ModelMonitor(LifecyclePart):
    def __init__(self, around: Surroundings, submit: Submit, swapping: Callable[[], bool]) -> None:
        super().__init__(around)
        self.submit = submit
        # While a swap runs it may stop any model: the watch stands aside.
        self.swapping = swapping
        self._stopping = False

    async def run(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.config.monitor_interval_s)
            for name, record in list(self.registry.records.items()):
                if record.instance is None or self.swapping():
                    continue
                try:
                    if record.state in (ModelLifecycle.READY, ModelLifecycle.SLEEPING):
                        await self._check(record)
                    elif record.state == ModelLifecycle.LOADING:
                        await self._check_adopted_loading(record)
                except Exception:  # one model's trouble must not stop the watch
                    log.exception("checking %s failed", name)

    def stop(self) -> None:
        self._stopping = True

    async def _check_adopted_loading(self, record: ModelRecord) -> None:
        """An adopted server that was still loading: ready once healthy."""
        instance = record.instance
        assert instance is not None
        runtime = self.registry.runtime(record)
        status = await runtime.exit_status(instance)
        if status is not None:
            output = await runtime.logs(instance, LOG_LINES_IN_ERRORS)
            await self.crashed(record, status.reason + log_tail(output))
            return
        if await probe(record.spec.health) == 200:
            if await sleep_api.is_sleeping(record.spec):
                # Put to sleep by the agent before this one: it holds no VRAM.
                record.state, record.health = ModelLifecycle.SLEEPING, "asleep"
            else:
                record.state, record.health = ModelLifecycle.READY, "ok"
                samples = await self.sample()
                record.vram_used_mb = self.registry.measured_vram(record.spec.name, samples)
            await self.publisher.model_changed(record.snapshot())
            return
        started = instance.started_at or record.loaded_at or time.time()
        if time.time() - started > record.spec.load_timeout_s:
            await self.crashed(
                record, f"not healthy {record.spec.load_timeout_s:g} s after it was started"
            )

    async def _check(self, record: ModelRecord) -> None:
        assert record.instance is not None
        spec = record.spec
        runtime = self.registry.runtime(record)
        instance = record.instance
        status = await runtime.exit_status(instance)
        if record.instance is not instance or self.swapping():
            return  # the swap worker stopped or replaced it meanwhile
        if status is not None:
            output = await runtime.logs(instance, LOG_LINES_IN_ERRORS)
            await self.crashed(record, status.reason + log_tail(output))
            return
        # Asleep, a server is watched for its life only: its answers are not its own then.
        healthy = record.asleep or await probe(spec.health) == 200
        if record.instance is not instance or self.swapping():
            return
        record.health_failures = 0 if healthy else record.health_failures + 1
        health = "ok" if healthy else "failing"
        if health != record.health:
            record.health = health
            await self.publisher.model_changed(record.snapshot())
        if record.health_failures >= self.config.health_failures:
            await self.crashed(
                record, f"health check failed {record.health_failures} times in a row"
            )
            return
        idle_since = record.last_used_at or record.loaded_at
        idle_s = time.time() - idle_since if idle_since is not None else 0.0
        if spec.ttl_s is not None and idle_s >= spec.ttl_s and not record.in_flight:
            log.info("%s idle for %.0f s (ttl %.0f s): unloading", spec.name, idle_s, spec.ttl_s)
            # The operator asked for this unload by setting ttl_s: pinned or not.
            try:
                self.submit(SwapRequest(JobCommand.UNLOAD, spec.name, force=True), "ttl")
            except CommandError as exc:
                log.error("could not unload idle %s: %s", spec.name, exc.message)

    async def crashed(self, record: ModelRecord, reason: str) -> None:
        name = record.spec.name
        log.error("%s crashed: %s", name, reason)
        instance = record.instance
        if instance is not None:
            # Whatever is left (a hung process) still holds VRAM: stop it. Not READY
            # meanwhile, so no load takes it for "already loaded".
            record.state = ModelLifecycle.UNLOADING
            with contextlib.suppress(RuntimeFailure):
                await self.registry.runtime(record).stop(instance, record.spec.stop_timeout_s)
        record.instance = None
        record.state, record.health, record.error = ModelLifecycle.CRASHED, "down", reason
        record.health_failures = 0
        await self.registry.refresh_owners()
        await self.publisher.model_changed(record.snapshot())
        await self.registry.stopped(record)
        await self.publisher.event(
            Event(
                event_type=EventType.MODEL_CRASHED,
                severity=Severity.ERROR,
                message=f"{name} crashed: {reason}",
                model=name,
                gpu=record.placed_on[0],
            )
        )
        await self.publisher.state_changed()
        if record.spec.restart == "on-crash" and name in self.registry.catalog:
            try:
                self.submit(SwapRequest(JobCommand.LOAD, name), "restart-on-crash")
            except CommandError as exc:
                log.error("could not restart %s: %s", name, exc.message)
