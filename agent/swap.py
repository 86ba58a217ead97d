"""What the swap queue's jobs do: load, switch, unload, and undoing a failed swap.

A switch is: plan (pure) -> evict -> wait until the driver shows the memory back ->
start -> wait until healthy -> measure -> ready. A swap that fails, or that a cancel
ends, stops the new server and restores what was evicted for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from agent import ports
from agent.catalog import ModelSpec
from agent.gpu.base import GpuSample
from agent.health import probe
from agent.job_worker import JobUpdate
from agent.jobs import Job, JobFailure, SwapRequest
from agent.model_registry import LifecyclePart, ModelRecord, Surroundings
from agent.planner import GpuMemory, Plan, Refusal, plan_load, plan_switch
from agent.runtimes.base import Instance, Runtime, RuntimeFailure
from agent.sleeping import Sleeps
from agent.stopping import ServerStops
from shared.commands import CommandError
from shared.messages import (
    ErrorCode,
    Event,
    EventType,
    JobCommand,
    JobPhase,
    JobRef,
    Loaded,
    ModelLifecycle,
    RolledBack,
    Severity,
    SwapTimings,
    Unloaded,
)

log = logging.getLogger("modelbus.lifecycle")

# Rollback restores run before anything queued by commands (whose priority is at most 1000).
RESTORE_PRIORITY = 10_000
# Health URLs on these hosts are checked to be answered by the server just started.
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0"})
# Publish job progress no more often than this while a model loads.
PROGRESS_INTERVAL_S = 0.25
LOG_LINES_IN_ERRORS = 8
# Queues a job of the agent's own (a restore), never refused for a full queue.
Requeue = Callable[[Job[SwapRequest]], tuple[Job[SwapRequest], bool]]


@dataclass
class Attempt:
    """A load under way: what a rollback must undo."""

    record: ModelRecord
    evicted: list[str] = field(default_factory=list)
    slept: list[str] = field(default_factory=list)  # of the evicted, those put to sleep
    woken: bool = False


class Swap(LifecyclePart):
    cancelled_message = "cancelled while running"

    def __init__(
        self,
        around: Surroundings,
        stops: ServerStops,
        sleeps: Sleeps,
        update_job: JobUpdate,
        requeue: Requeue,
        *,
        sim_state_file: str | None = None,
    ) -> None:
        super().__init__(around)
        self.stops = stops
        self.sleeps = sleeps
        self.update_job = update_job
        self.requeue = requeue
        self.sim_state_file = sim_state_file
        self._attempt: Attempt | None = None
        # Models this job is draining (they admit no new request until it ends).
        self._draining: set[str] = set()

    # ---- the runner's side of the worker ---------------------------------

    async def run(self, job: Job[SwapRequest]) -> None:
        self._attempt = None
        record = self.registry.records[job.request.model]
        if job.request.command == JobCommand.UNLOAD:
            await self._unload(job, record)
        else:
            await self._load(job, record, evict=job.request.command == JobCommand.SWITCH)

    async def recover(self, job: Job[SwapRequest], failure: BaseException) -> None:
        attempt, self._attempt = self._attempt, None
        if attempt is not None:
            await self._roll_back(job, attempt, failure)

    async def settled(self, job: Job[SwapRequest]) -> None:
        self._end_drains()
        await self.publisher.state_changed()

    def describe(self, job: Job[SwapRequest]) -> str:
        return f"{job.request.command} {job.request.model}"

    # ---- load / switch ---------------------------------------------------

    async def _load(self, job: Job[SwapRequest], record: ModelRecord, *, evict: bool) -> None:
        spec = record.spec
        record.last_used_at = time.time()
        if record.resident and record.state == ModelLifecycle.READY:
            job.succeed(self._result(record, [], job), f"{spec.name} is already loaded")
            return
        # A sleeping model wakes where it sleeps; asked onto another GPU, it starts anew.
        moved = job.request.gpu is not None and (job.request.gpu,) != record.placed_on
        waking = record.asleep and not moved
        if record.resident and not waking:
            # Crashed, unhealthy or asleep elsewhere: stop what is left before starting it.
            await self.stops.stop(record, job, reason="restart")
        plan = await self._plan(job, spec, evict=evict, on=record.placed_on if waking else None)
        if isinstance(plan, Refusal):
            raise JobFailure(
                ErrorCode.INSUFFICIENT_VRAM,
                plan.message,
                {
                    "required_mb": plan.required_mb,
                    "available_mb": plan.available_mb,
                    "evictable_mb": plan.evictable_mb,
                    "gpus": list(plan.gpus),
                },
            )
        # From here on a failure or a cancel is undone (recover).
        attempt = self._attempt = Attempt(record)
        rest = self.sleeps.plan(plan.evict, waking=spec.name if waking else None)
        for name in rest.stop_sleepers:
            job.advance(JobPhase.EVICTING, 0.05, f"stopping sleeping {name} for host RAM")
            await self.update_job(job)
            await self.stops.stop(
                self.registry.records[name], job, reason="host RAM for models put to sleep"
            )
        for name in plan.evict:
            evicted = self.registry.records[name]
            # Recorded first: a cancel in the middle of this stop restores it too.
            attempt.evicted.append(name)
            reason = f"evicted for {spec.name}"
            if name in rest.sleep:
                job.advance(JobPhase.EVICTING, 0.05, f"putting {name} to sleep")
                await self.update_job(job)
                if await self.sleeps.put_to_sleep(evicted, job, reason=reason):
                    attempt.slept.append(name)
                    continue
            job.advance(JobPhase.EVICTING, 0.05, f"evicting {name}")
            await self.update_job(job)
            await self.stops.stop(evicted, job, reason=reason)
        job.advance(JobPhase.WAITING_VRAM, 0.1, "waiting for the driver to return the memory")
        await self.update_job(job)
        await self.stops.wait_for_free(plan.gpus, plan.required_mb + self.config.headroom_mb)
        if waking:
            attempt.woken = await self.sleeps.wake(job, record, plan.gpus, self._wait_healthy)
        if not attempt.woken:
            await self._start_and_wait(job, record, plan.gpus)
        self._attempt = None
        if attempt.evicted:
            await self.publisher.event(
                Event(
                    event_type=EventType.SWAP_COMPLETED,
                    severity=Severity.INFO,
                    message=f"{spec.name} ready after evicting {', '.join(attempt.evicted)}",
                    model=spec.name,
                    gpu=plan.gpus[0],
                    job_id=job.job_id,
                )
            )
        job.succeed(
            self._result(record, attempt.evicted, job, attempt=attempt),
            f"{spec.name} is ready" + (" (woken)" if attempt.woken else ""),
        )

    async def _plan(
        self,
        job: Job[SwapRequest],
        spec: ModelSpec,
        *,
        evict: bool,
        on: tuple[int, ...] | None = None,
    ) -> Plan | Refusal:
        """The plan on the memory measured now. A switch that would fit but for models
        answering requests (busy: never evicted) drains them first: they admit no new
        request, and once their last one ended the plan is made again."""
        deadline: float | None = None
        while True:
            samples = await self.sample()
            target = await self.registry.target(spec, job.request.gpu, on=on)
            residents = self.registry.residents(exclude=spec.name)
            plan = self._planner(job, evict)(gpu_memory(samples), residents, target)
            if not isinstance(plan, Refusal) or not evict:
                return plan
            idle = [dataclasses.replace(r, busy=False) for r in residents]
            if_idle = self._planner(job, evict)(gpu_memory(samples), idle, target)
            if isinstance(if_idle, Refusal):
                return plan
            busy = [name for name in if_idle.evict if self.registry.records[name].in_flight]
            if not busy:
                return plan
            if deadline is None:
                limit = max(self.registry.records[name].spec.drain_timeout_s for name in busy)
                deadline = time.monotonic() + limit
            await self._drain(job, busy, deadline)

    def _planner(self, job: Job[SwapRequest], evict: bool) -> Callable[..., Plan | Refusal]:
        options: dict[str, Any] = {"headroom_mb": self.config.headroom_mb}
        if not evict:
            return functools.partial(plan_load, **options)
        options.update(exclusive=job.request.exclusive, force=job.request.force)
        return functools.partial(plan_switch, **options)

    async def _drain(self, job: Job[SwapRequest], names: list[str], deadline: float) -> None:
        for name in names:
            self.registry.records[name].draining = True
            self._draining.add(name)
        waiting = sum(self.registry.records[name].in_flight for name in names)
        job.advance(
            JobPhase.EVICTING,
            0.05,
            f"waiting for {', '.join(names)} to finish {waiting} request(s) before evicting",
        )
        await self.update_job(job)
        try:
            await self.registry.drained(names, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            left = sum(self.registry.records[name].in_flight for name in names)
            raise JobFailure(
                ErrorCode.BUSY,
                f"{', '.join(names)} still had {left} request(s) in flight when the drain "
                f"timeout ran out; {job.request.model} was not loaded",
                {"models": names, "in_flight": left},
            ) from None

    def _end_drains(self) -> None:
        """Models drained for a swap admit requests again (the evicted ones are stopped:
        their requests wait for a load of their own)."""
        for name in self._draining:
            record = self.registry.records.get(name)
            if record is not None:
                record.draining = False
        self._draining.clear()
        self.registry.traffic_changed()

    def _result(
        self,
        record: ModelRecord,
        evicted: Sequence[str],
        job: Job[SwapRequest],
        *,
        attempt: Attempt | None = None,
    ) -> Loaded:
        return Loaded(
            timings=SwapTimings(**{name: round(value, 4) for name, value in job.timings.items()}),
            model=record.spec.name,
            gpus=list(record.gpus),
            vram_used_mb=record.vram_used_mb,
            load_s=record.last_load_s,
            evicted=list(evicted),
            slept=list(attempt.slept) if attempt else [],
            woken=attempt.woken if attempt else False,
            service=f"http://127.0.0.1:{record.spec.port}",
        )

    async def _start_and_wait(
        self, job: Job[SwapRequest], record: ModelRecord, gpus: tuple[int, ...]
    ) -> None:
        spec = record.spec
        if list(gpus) != spec.gpus:
            spec = spec.model_copy(update={"gpus": list(gpus)})
        runtime = self.registry.runtime(record)
        job.advance(JobPhase.STARTING, 0.15, f"starting {spec.name}")
        await self.update_job(job)
        # A stale server on the port would answer the health check for ours.
        holder = await asyncio.to_thread(ports.listener, spec.port)
        if holder is not None:
            raise JobFailure(
                ErrorCode.PORT_IN_USE,
                f"port {spec.port} of {spec.name} is already in use by "
                f"{self._describe_listener(holder)}: stop it, or give {spec.name} another port",
                {"port": spec.port, "pids": sorted(holder.pids)},
            )
        extra_env = {"MODELBUS_SIM_STATE": self.sim_state_file} if self.sim_state_file else {}
        started = time.monotonic()
        try:
            instance = await runtime.start(spec, extra_env)
        except RuntimeFailure as exc:
            raise JobFailure(ErrorCode.LOAD_FAILED, str(exc)) from None
        job.add_time("start_s", time.monotonic() - started)
        record.instance, record.gpus = instance, gpus
        record.state, record.health, record.error = ModelLifecycle.LOADING, "starting", None
        record.health_failures = 0
        # Own its memory from the start: a loading model's VRAM is not "other".
        await self.registry.refresh_owners()
        await self.publisher.model_changed(record.snapshot())
        await self._wait_healthy(job, spec, runtime, instance, started)
        load_s = time.monotonic() - started
        job.add_time("healthy_s", load_s)
        record.loaded_at = record.last_used_at = time.time()
        record.last_load_s = record.learned_load_s = load_s
        await self.now_ready(
            record, gpus, job.job_id, f"{{name}} ready on GPU {{gpus}} in {load_s:.1f} s"
        )
        await asyncio.to_thread(
            self.registry.store.record_load, spec.name, record.vram_used_mb, load_s, time.time()
        )

    async def _wait_healthy(
        self,
        job: Job[SwapRequest],
        spec: ModelSpec,
        runtime: Runtime,
        instance: Instance,
        started: float,
    ) -> None:
        facts = await asyncio.to_thread(self.registry.store.model_facts, spec.name)
        expected = facts.load_s if facts and facts.load_s else None
        deadline = started + spec.load_timeout_s
        last_progress = 0.0
        answered_by: str | None = None
        while True:
            status = await runtime.exit_status(instance)
            if status is not None:
                log_lines = await runtime.logs(instance, LOG_LINES_IN_ERRORS)
                raise JobFailure(
                    ErrorCode.LOAD_FAILED,
                    f"{spec.name} {status.reason} while loading" + log_tail(log_lines),
                    {"exit_code": status.code, "log": log_lines},
                )
            if await probe(spec.health, timeout_s=max(0.5, self.config.health_poll_s * 10)) == 200:
                impostor = await self._answered_by_another(runtime, instance, spec.health)
                if impostor is None:
                    return
                answered_by = impostor
            now = time.monotonic()
            if now >= deadline:
                log_lines = await runtime.logs(instance, LOG_LINES_IN_ERRORS)
                raise JobFailure(
                    ErrorCode.TIMEOUT,
                    f"{spec.name} was not healthy after {spec.load_timeout_s:g} s (load_timeout_s)"
                    + (
                        f"; its health check was answered by {answered_by}, not by the server "
                        "just started"
                        if answered_by
                        else ""
                    )
                    + log_tail(log_lines),
                    {"log": log_lines},
                )
            if now - last_progress >= PROGRESS_INTERVAL_S:
                last_progress = now
                elapsed = now - started
                if expected:
                    job.eta_s = max(0.0, expected - elapsed)
                    job.advance(JobPhase.LOADING, 0.2 + 0.75 * min(1.0, elapsed / expected))
                else:
                    job.advance(JobPhase.LOADING, 0.2)
                await self.update_job(job)
            await asyncio.sleep(self.config.health_poll_s)

    async def _answered_by_another(
        self, runtime: Runtime, instance: Instance, health_url: str
    ) -> str | None:
        """Who answered the health check when it was not the server just started; None
        when it was, or when that cannot be told (a remote URL, Docker's published port,
        listeners this agent cannot see)."""
        url = urlsplit(health_url)
        if not runtime.listens_itself or url.hostname not in LOCAL_HOSTS:
            return None
        port = url.port or 80
        # The usual answer first, from the server's own descriptors: everyone's are
        # read only to name somebody else.
        if await asyncio.to_thread(ports.listens, await runtime.pids(instance), port):
            return None
        holder = await asyncio.to_thread(ports.listener, port)
        if holder is None or not holder.pids:
            return None
        return self._describe_listener(holder)

    def _describe_listener(self, holder: ports.Listener) -> str:
        return holder.describe() + self.registry.describe_owners(holder.pids)

    async def _roll_back(
        self, job: Job[SwapRequest], attempt: Attempt, failure: BaseException
    ) -> None:
        """Stop the half-started server, then bring back what was evicted for it, each
        model with a load job of its own: queued first, visible and cancellable like any
        other job, and named in this job's ``result.restores``."""
        record = attempt.record
        with contextlib.suppress(Exception):
            if record.resident:
                await self.stops.stop(record, None, reason="load failed", quiet=True)
        cancelled = isinstance(failure, asyncio.CancelledError)
        record.state = ModelLifecycle.STOPPED if cancelled else ModelLifecycle.ERROR
        record.error = None if cancelled else (getattr(failure, "message", None) or str(failure))
        await self.publisher.model_changed(record.snapshot())
        if not cancelled:
            await self.publisher.event(
                Event(
                    event_type=EventType.MODEL_LOAD_FAILED,
                    severity=Severity.ERROR,
                    message=f"{record.spec.name} failed to load: {record.error}",
                    model=record.spec.name,
                )
            )
        restores: list[JobRef] = []
        for name in reversed(attempt.evicted):
            restored = self.registry.records.get(name)
            if restored is None or restored.on_gpu:
                continue  # the cancel came before it was stopped (a sleeper is woken)
            gpus = restored.placed_on
            moved = len(gpus) == 1 and list(gpus) != restored.spec.gpus
            restore = Job(
                SwapRequest(JobCommand.LOAD, name, gpu=gpus[0] if moved else None),
                request_id=f"restore-{job.job_id}",
                priority=RESTORE_PRIORITY,
            )
            queued, _ = self.requeue(restore)
            restores.append(JobRef(model=name, job_id=queued.job_id))
            if queued is restore:
                log.info("restoring %s after a failed swap: job %s", name, restore.job_id)
        if restores:
            job.result = RolledBack(restores=restores)
            job.message = f"{job.message}; restoring " + ", ".join(
                f"{r.model} (job {r.job_id})" for r in restores
            )

    # ---- unload ----------------------------------------------------------

    async def _unload(self, job: Job[SwapRequest], record: ModelRecord) -> None:
        name = record.spec.name
        if not record.resident:
            job.succeed(Unloaded(model=name, freed_mb=0), f"{name} is not loaded")
            return
        if record.spec.pinned and not job.request.force:
            raise JobFailure(
                ErrorCode.BUSY, f"{name} is pinned; unload it with force: true if you mean it"
            )
        if record.in_flight and not job.request.force:
            # Its callers get their answers first; force cuts them off.
            deadline = time.monotonic() + record.spec.drain_timeout_s
            await self._drain(job, [name], deadline)
        job.advance(JobPhase.EVICTING, 0.1, f"stopping {name}")
        await self.update_job(job)
        freed = record.vram_used_mb or 0
        await self.stops.stop(record, job, reason="unload")
        job.succeed(Unloaded(model=name, freed_mb=freed), f"{name} unloaded")


def log_tail(lines: Sequence[str]) -> str:
    shown = [line for line in lines if line.strip()]
    return ("; last output: " + " | ".join(shown[-3:])) if shown else ""


def check_gpu_override(spec: ModelSpec, gpu: int | None, present: Collection[int]) -> None:
    if gpu is not None and gpu not in present:
        indices = ", ".join(str(i) for i in sorted(present)) or "none"
        raise CommandError(
            ErrorCode.INVALID_PAYLOAD,
            f"this host has no GPU {gpu}; its GPUs are {indices}",
        )
    if gpu is not None and len(spec.gpus) > 1:
        raise CommandError(
            ErrorCode.INVALID_PAYLOAD,
            f"{spec.name} spans GPUs {spec.gpus}; it cannot be moved to one GPU",
        )


def gpu_memory(samples: Sequence[GpuSample]) -> list[GpuMemory]:
    return [
        GpuMemory(s.index, s.memory_total_mb or 0, s.memory_free_mb or 0)
        for s in samples
        if not s.lost and s.memory_total_mb is not None
    ]
