"""Model lifecycle: the swap worker, its jobs, and the watch over ready models.

Everything that changes what runs on the GPUs goes through one worker, one job
at a time (the swap lock). A switch is: plan (pure) -> evict -> wait until the
driver shows the memory back -> start -> wait until healthy -> measure -> ready.
A failure stops the new server and restores what was evicted for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

from agent import ports
from agent.catalog import Catalog, ModelSpec
from agent.config import LifecycleConfig
from agent.database import Database
from agent.gpu.base import GpuSample
from agent.health import probe
from agent.job_publishing import JobPublisher, QueuePositions, publish_job, wait_for_job
from agent.jobs import Job, JobRequest, QueueFullError, SwapQueue
from agent.planner import GpuMemory, Plan, Refusal, Resident, Target, plan_load, plan_switch
from agent.runtimes.base import Instance, Runtime, RuntimeFailure
from agent.telemetry import ProcessOwner
from shared.commands import CommandError
from shared.messages import (
    ErrorCode,
    Event,
    JobPhase,
    JobStatus,
    LoadedModel,
    ModelLifecycle,
    ModelState,
    Severity,
    utc_now,
)

log = logging.getLogger("modelbus.lifecycle")

# Rollback restores run before anything queued by commands (whose priority is at most 1000).
RESTORE_PRIORITY = 10_000
# Health URLs on these hosts are checked to be answered by the server just started.
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0"})
Sampler = Callable[[], Awaitable[tuple[GpuSample, ...]]]
# The indices of the GPUs this host has, as last sampled.
GpuIndices = Callable[[], Collection[int]]
# Publish job progress no more often than this while a model loads.
PROGRESS_INTERVAL_S = 0.25
LOG_LINES_IN_ERRORS = 8


class Publisher(JobPublisher, Protocol):
    """What the lifecycle tells the world; the service puts it on the bus."""

    async def model_changed(self, state: ModelState) -> None: ...

    async def model_removed(self, name: str) -> None: ...

    async def state_changed(self) -> None: ...


class LoadFailure(Exception):
    def __init__(self, code: ErrorCode, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


@dataclass
class ModelRecord:
    spec: ModelSpec
    state: ModelLifecycle = ModelLifecycle.STOPPED
    instance: Instance | None = None
    gpus: tuple[int, ...] = ()
    loaded_at: float | None = None
    last_used_at: float | None = None
    last_load_s: float | None = None
    vram_used_mb: int | None = None
    health: str | None = None
    error: str | None = None
    health_failures: int = 0

    @property
    def resident(self) -> bool:
        return self.instance is not None

    def snapshot(self) -> ModelState:
        return ModelState(
            name=self.spec.name,
            runtime=self.spec.runtime,
            state=self.state,
            gpus=list(self.gpus or self.spec.gpus),
            vram_estimate_mb=self.spec.vram_mb,
            vram_used_mb=self.vram_used_mb,
            health=self.health,
            loaded_at=_dt(self.loaded_at),
            last_used_at=_dt(self.last_used_at),
            last_load_s=None if self.last_load_s is None else round(self.last_load_s, 3),
            priority=self.spec.priority,
            pinned=self.spec.pinned,
            description=self.spec.description,
            error=self.error,
            ts=utc_now(),
        )


def _dt(at: float | None) -> datetime | None:
    return None if at is None else datetime.fromtimestamp(at, UTC)


class Lifecycle:
    def __init__(
        self,
        catalog: Catalog,
        config: LifecycleConfig,
        runtimes: dict[str, Runtime],
        store: Database,
        publisher: Publisher,
        sample: Sampler,
        gpu_indices: GpuIndices,
        *,
        sim_state_file: str | None = None,
    ) -> None:
        self.catalog = catalog
        self.config = config
        self.runtimes = runtimes
        self.store = store
        self.publisher = publisher
        self.sample = sample
        self.gpu_indices = gpu_indices
        self.sim_state_file = sim_state_file
        self.models = {name: ModelRecord(spec) for name, spec in catalog.models.items()}
        self.queue = SwapQueue(limit=config.queue_limit)
        self._positions = QueuePositions(self.queue, publisher)
        self._wakeup = asyncio.Event()
        self._running: tuple[Job, asyncio.Task[None]] | None = None
        self._cancel_requested: set[str] = set()
        self._owners: dict[int, ProcessOwner] = {}
        # Catalog changes that wait for a running model to stop.
        self._pending_specs: dict[str, ModelSpec] = {}
        self._leaving: set[str] = set()
        self._announcements: set[asyncio.Task[None]] = set()
        self._stopping = False

    # ---- what others ask -------------------------------------------------

    def owner_of(self, pid: int) -> ProcessOwner | None:
        return self._owners.get(pid)

    def loaded_models(self) -> dict[str, LoadedModel]:
        return {
            name: LoadedModel(
                model=record.spec.hf_repo or name,
                service=f"http://127.0.0.1:{record.spec.port}",
                loaded_at=_dt(record.loaded_at),
                status=record.state.value,
            )
            for name, record in self.models.items()
            if record.resident
        }

    @property
    def active_job(self) -> str | None:
        return self.queue.running.job_id if self.queue.running else None

    def submit(
        self, request: JobRequest, *, request_id: str | None, priority: int = 0
    ) -> tuple[Job, bool]:
        """Queue a GPU-changing job; an equal request joins the existing job."""
        record = self.models.get(request.model)
        # A model that left the catalog but still runs can still be unloaded.
        spec = record.spec if record is not None else None
        if spec is None or (request.model not in self.catalog and request.command != "unload"):
            raise self._unknown_model(request.model)
        _check_gpu_override(spec, request.gpu, self.gpu_indices())
        try:
            job, joined = self.queue.submit(Job(request, request_id=request_id, priority=priority))
        except QueueFullError as exc:
            raise CommandError(ErrorCode.QUEUE_FULL, str(exc)) from None
        if not joined:
            self._wakeup.set()
            # A job of higher priority moves the ones behind it.
            self._positions.moved()
            # Published and saved while still queued, so a restart cannot lose it.
            announcement = asyncio.get_running_loop().create_task(self._job_update(job))
            self._announcements.add(announcement)
            announcement.add_done_callback(self._announcements.discard)
        return job, joined

    async def cancel(self, job_id: str) -> Job:
        queued = self.queue.remove(job_id)
        if queued is not None:
            queued.cancel("cancelled while queued")
            await self._job_update(queued, final=True)
            self._positions.moved()
            return queued
        if self._running is not None and self._running[0].job_id == job_id:
            # Stopping the new server and restoring what it evicted takes time; the
            # reply says the cancel was accepted and jobs/<id> shows it finish.
            job, task = self._running
            if job_id not in self._cancel_requested:  # a second cancel must not cut the rollback
                self._cancel_requested.add(job_id)
                task.cancel()
                job.message = "cancelling"
            return job
        raise CommandError(ErrorCode.NOT_FOUND, f"no queued or running job {job_id!r}")

    async def plan(
        self, model: str, gpu: int | None, exclusive: bool, *, force: bool = False
    ) -> Plan | Refusal:
        """What a switch would do now; changes nothing."""
        spec = self.catalog.get(model)
        if spec is None:
            raise self._unknown_model(model)
        _check_gpu_override(spec, gpu, self.gpu_indices())
        return plan_switch(
            _gpu_memory(await self.sample()),
            self._residents(),
            self._target(spec, gpu),
            exclusive=exclusive,
            force=force,
            headroom_mb=self.config.headroom_mb,
        )

    async def reload(self, catalog: Catalog) -> list[str]:
        """Take a new catalog. Running models are left alone: one whose entry changed
        keeps running as it was started and takes the new entry once stopped; one
        that left the catalog stays until it is unloaded. Returns what changed."""
        changes = []
        for name, spec in catalog.models.items():
            self._leaving.discard(name)
            self._pending_specs.pop(name, None)
            record = self.models.get(name)
            if record is None:
                self.models[name] = ModelRecord(spec)
                changes.append(f"added {name}")
            elif record.spec != spec:
                if record.resident or self._has_job(name):
                    self._pending_specs[name] = spec
                    changes.append(f"changed {name} (applies once it is stopped)")
                else:
                    record.spec = spec
                    changes.append(f"changed {name}")
        for name in [n for n in self.models if n not in catalog.models]:
            if self.models[name].resident or self._has_job(name):
                changes.append(f"removed {name} (still running; gone once unloaded)")
                self._leaving.add(name)
            else:
                del self.models[name]
                await self.publisher.model_removed(name)
                changes.append(f"removed {name}")
        self.catalog = catalog
        for name in catalog.models:
            await self.publisher.model_changed(self.models[name].snapshot())
        await self.publisher.state_changed()
        return changes

    def _unknown_model(self, name: str) -> CommandError:
        return CommandError(
            ErrorCode.UNKNOWN_MODEL,
            f"unknown model {name!r}: the catalog has "
            f"{', '.join(self.catalog.names()) or 'no models'}",
        )

    def _has_job(self, name: str) -> bool:
        running = self.queue.running
        return (running is not None and running.request.model == name) or any(
            job.request.model == name for job in self.queue.queued()
        )

    async def _after_stop(self, record: ModelRecord) -> None:
        """Apply a catalog change that waited for the model to stop."""
        name = record.spec.name
        if name in self._leaving:
            self._leaving.discard(name)
            self.models.pop(name, None)
            await self.publisher.model_removed(name)
        elif name in self._pending_specs:
            record.spec = self._pending_specs.pop(name)

    # ---- running ---------------------------------------------------------

    async def start(self) -> None:
        """Adopt servers started before a restart, fail jobs a restart interrupted,
        publish every model, queue the preload list."""
        interrupted = await asyncio.to_thread(
            self.store.fail_interrupted_jobs,
            "the agent restarted while this job was queued or running",
            utc_now(),
        )
        for job in interrupted:
            await self.publisher.job_changed(job)
            await self.publisher.job_finished(job)
            await self.publisher.event(
                Event(
                    event_type="job_failed",
                    severity=Severity.WARNING,
                    message=f"job {job.job_id} ({job.command} {job.model}) was interrupted "
                    "by a restart",
                    model=job.model,
                    job_id=job.job_id,
                )
            )
        specs = dict(self.catalog.models)
        for name, runtime in self.runtimes.items():
            wanted = {n: s for n, s in specs.items() if s.runtime == name}
            if not wanted:
                continue
            try:
                adopted = await runtime.adopt(wanted)
            except RuntimeFailure as exc:
                log.error("could not look for running %s servers: %s", name, exc)
                continue
            for instance in adopted:
                record = self.models[instance.model]
                record.instance = instance
                record.gpus = tuple(record.spec.gpus)
                record.loaded_at = instance.started_at or time.time()
                # A server still loading when the old agent died keeps loading:
                # the monitor turns it ready once healthy (or crashed if it never is).
                healthy = await probe(record.spec.health) == 200
                record.state = ModelLifecycle.READY if healthy else ModelLifecycle.LOADING
                record.health = "ok" if healthy else "starting"
                log.info("adopted %s (%s) started before this agent", instance.model, name)
        await self._refresh_owners()
        for record in self.models.values():
            if record.instance is not None and record.state == ModelLifecycle.READY:
                runtime = self.runtimes[record.spec.runtime]
                record.vram_used_mb = await self._measured_vram(record.instance, runtime)
        for record in self.models.values():
            await self.publisher.model_changed(record.snapshot())
        for name in self.config.preload:
            if not self.models[name].resident:
                self.submit(JobRequest("load", name), request_id="preload")

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._worker(), name="swap-worker")
            group.create_task(self._monitor(), name="model-monitor")

    def stop(self) -> None:
        """Ask the worker and the monitor to end. A flag besides the cancellation,
        because aiomqtt's publish waits with wait_for, which on 3.11 can swallow one."""
        self._stopping = True
        self._wakeup.set()
        self._positions.stop()

    async def _worker(self) -> None:
        while not self._stopping:
            job = self.queue.take()
            if job is None:
                await self._wakeup.wait()
                self._wakeup.clear()
                continue
            task = asyncio.create_task(self._execute(job), name=f"job-{job.job_id}")
            self._running = (job, task)
            await self._job_update(job)
            self._positions.moved()
            try:
                # At shutdown the servers are left to the next agent: no waiting.
                await wait_for_job(
                    job, task, cancel_message="cancelled while running", settle_on_shutdown=False
                )
            finally:
                self._running = None
                self._cancel_requested.discard(job.job_id)
                self.queue.done(job)
            await self._job_update(job, final=True)
            await self.publisher.state_changed()

    async def _execute(self, job: Job) -> None:
        record = self.models[job.request.model]
        try:
            if job.request.command == "unload":
                await self._unload(job, record)
            else:
                await self._load(job, record, evict=job.request.command == "switch")
        except asyncio.CancelledError:
            if job.job_id not in self._cancel_requested:
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            if not job.finished:
                job.cancel("cancelled while running")
        except LoadFailure as failure:
            job.fail(failure.code, failure.message, failure.details)
        except Exception as exc:  # one broken job must not stop the worker
            log.exception("job %s failed unexpectedly", job.job_id)
            job.fail(ErrorCode.INTERNAL, f"the agent failed while running the job: {exc}")
        restores = (job.result or {}).get("restores") if job.state != JobStatus.SUCCEEDED else None
        if restores:
            job.message = f"{job.message}; restoring " + ", ".join(
                f"{r['model']} (job {r['job_id']})" for r in restores
            )
        if job.state.value == "failed" and job.error is not None:
            await self.publisher.event(
                Event(
                    event_type="job_failed",
                    severity=Severity.ERROR,
                    message=f"{job.request.command} {job.request.model} failed: "
                    + job.error.message,
                    model=job.request.model,
                    job_id=job.job_id,
                )
            )

    # ---- load / switch ---------------------------------------------------

    def _target(self, spec: ModelSpec, gpu: int | None) -> Target:
        facts = self.store.model_facts(spec.name)
        vram = facts.vram_mb if facts and facts.vram_mb else spec.vram_mb
        placement = (gpu,) if gpu is not None else tuple(spec.gpus)
        return Target(spec.name, vram, (placement,), priority=spec.priority)

    def _residents(self, exclude: str | None = None) -> list[Resident]:
        residents = []
        for name, record in self.models.items():
            if not record.resident or name == exclude:
                continue
            residents.append(
                Resident(
                    name=name,
                    gpus=record.gpus or tuple(record.spec.gpus),
                    vram_mb=record.vram_used_mb or record.spec.vram_mb,
                    priority=record.spec.priority,
                    pinned=record.spec.pinned,
                    last_used=record.last_used_at or record.loaded_at or 0.0,
                )
            )
        return residents

    async def _load(self, job: Job, record: ModelRecord, *, evict: bool) -> None:
        spec = record.spec
        record.last_used_at = time.time()
        if record.resident and record.state == ModelLifecycle.READY:
            job.succeed(self._result(record, [], job), f"{spec.name} is already loaded")
            return
        if record.resident:
            # Crashed or unhealthy: stop what is left before starting it again.
            await self._stop(record, job, reason="restart")
        samples = await self.sample()
        target = self._target(spec, job.request.gpu)
        planner = plan_switch if evict else plan_load
        kwargs: dict[str, Any] = {"headroom_mb": self.config.headroom_mb}
        if evict:
            kwargs["exclusive"] = job.request.exclusive
            kwargs["force"] = job.request.force
        plan = planner(_gpu_memory(samples), self._residents(exclude=spec.name), target, **kwargs)
        if isinstance(plan, Refusal):
            raise LoadFailure(
                ErrorCode.INSUFFICIENT_VRAM,
                plan.message,
                {
                    "required_mb": plan.required_mb,
                    "available_mb": plan.available_mb,
                    "evictable_mb": plan.evictable_mb,
                    "gpus": list(plan.gpus),
                },
            )
        evicted: list[str] = []
        try:
            if plan.evict:
                for name in plan.evict:
                    job.advance(JobPhase.EVICTING, 0.05, f"evicting {name}")
                    await self._job_update(job)
                    # Recorded first: a cancel in the middle of this stop restores it too.
                    evicted.append(name)
                    await self._stop(self.models[name], job, reason=f"evicted for {spec.name}")
            job.advance(JobPhase.WAITING_VRAM, 0.1, "waiting for the driver to return the memory")
            await self._job_update(job)
            await self._wait_for_free(plan.gpus, plan.required_mb + self.config.headroom_mb)
            await self._start_and_wait(job, record, plan.gpus)
        except BaseException as failure:
            if isinstance(failure, asyncio.CancelledError):
                if job.job_id not in self._cancel_requested:
                    # The agent is stopping: leave the servers as they are; the next
                    # agent adopts them and marks this job interrupted.
                    raise
                # A cancel command: clean up normally, the cancel was ours to act on.
                current = asyncio.current_task()
                if current is not None:
                    current.uncancel()
            await self._roll_back(job, record, evicted, failure)
            raise
        result = self._result(record, evicted, job)
        if evicted:
            await self.publisher.event(
                Event(
                    event_type="swap_completed",
                    severity=Severity.INFO,
                    message=f"{spec.name} ready after evicting {', '.join(evicted)}",
                    model=spec.name,
                    gpu=plan.gpus[0],
                    job_id=job.job_id,
                )
            )
        job.succeed(result, f"{spec.name} is ready")

    def _result(self, record: ModelRecord, evicted: Sequence[str], job: Job) -> dict[str, Any]:
        return {
            "timings": {name: round(value, 4) for name, value in job.timings.items()},
            "model": record.spec.name,
            "gpus": list(record.gpus),
            "vram_used_mb": record.vram_used_mb,
            "load_s": record.last_load_s,
            "evicted": list(evicted),
            "service": f"http://127.0.0.1:{record.spec.port}",
        }

    async def _start_and_wait(self, job: Job, record: ModelRecord, gpus: tuple[int, ...]) -> None:
        spec = record.spec
        if list(gpus) != spec.gpus:
            spec = spec.model_copy(update={"gpus": list(gpus)})
        runtime = self.runtimes[spec.runtime]
        job.advance(JobPhase.STARTING, 0.15, f"starting {spec.name}")
        await self._job_update(job)
        # A stale server on the port would answer the health check for ours.
        holder = await asyncio.to_thread(ports.listener, spec.port)
        if holder is not None:
            raise LoadFailure(
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
            raise LoadFailure(ErrorCode.LOAD_FAILED, str(exc)) from None
        job.add_time("start_s", time.monotonic() - started)
        record.instance, record.gpus = instance, gpus
        record.state, record.health, record.error = ModelLifecycle.LOADING, "starting", None
        record.health_failures = 0
        # Own its memory from the start: a loading model's VRAM is not "other".
        await self._refresh_owners()
        await self.publisher.model_changed(record.snapshot())
        await self._wait_healthy(job, record, runtime, instance, started)
        load_s = time.monotonic() - started
        job.add_time("healthy_s", load_s)
        await self._refresh_owners()
        record.vram_used_mb = await self._measured_vram(instance, runtime)
        record.state, record.health = ModelLifecycle.READY, "ok"
        record.loaded_at = record.last_used_at = time.time()
        record.last_load_s = load_s
        await asyncio.to_thread(
            self.store.record_load, spec.name, record.vram_used_mb, load_s, time.time()
        )
        await self.publisher.model_changed(record.snapshot())
        await self.publisher.event(
            Event(
                event_type="model_loaded",
                severity=Severity.INFO,
                message=f"{spec.name} ready on GPU {','.join(map(str, gpus))} in {load_s:.1f} s"
                + (f", using {record.vram_used_mb} MiB" if record.vram_used_mb else ""),
                model=spec.name,
                gpu=gpus[0],
                job_id=job.job_id,
            )
        )

    async def _wait_healthy(
        self, job: Job, record: ModelRecord, runtime: Runtime, instance: Instance, started: float
    ) -> None:
        spec = record.spec
        facts = self.store.model_facts(spec.name)
        expected = facts.load_s if facts and facts.load_s else None
        deadline = started + spec.load_timeout_s
        last_progress = 0.0
        answered_by: str | None = None
        while True:
            status = await runtime.exit_status(instance)
            if status is not None:
                raise LoadFailure(
                    ErrorCode.LOAD_FAILED,
                    f"{spec.name} {status.reason} while loading"
                    + self._log_tail(runtime, instance),
                    {"exit_code": status.code, "log": runtime.logs(instance, LOG_LINES_IN_ERRORS)},
                )
            if await probe(spec.health, timeout_s=max(0.5, self.config.health_poll_s * 10)) == 200:
                impostor = await self._answered_by_another(runtime, instance, spec.health)
                if impostor is None:
                    return
                answered_by = impostor
            now = time.monotonic()
            if now >= deadline:
                raise LoadFailure(
                    ErrorCode.TIMEOUT,
                    f"{spec.name} was not healthy after {spec.load_timeout_s:g} s (load_timeout_s)"
                    + (
                        f"; its health check was answered by {answered_by}, not by the server "
                        "just started"
                        if answered_by
                        else ""
                    )
                    + self._log_tail(runtime, instance),
                    {"log": runtime.logs(instance, LOG_LINES_IN_ERRORS)},
                )
            if now - last_progress >= PROGRESS_INTERVAL_S:
                last_progress = now
                elapsed = now - started
                if expected:
                    job.eta_s = max(0.0, expected - elapsed)
                    job.advance(JobPhase.LOADING, 0.2 + 0.75 * min(1.0, elapsed / expected))
                else:
                    job.advance(JobPhase.LOADING, 0.2)
                await self._job_update(job)
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
        holder = await asyncio.to_thread(ports.listener, url.port or 80)
        if holder is None or not holder.pids:
            return None
        if holder.pids & await runtime.pids(instance):
            return None
        return self._describe_listener(holder)

    def _describe_listener(self, holder: ports.Listener) -> str:
        owners = (self._owners.get(pid) for pid in holder.pids)
        models = {owner.model for owner in owners if owner is not None and owner.model}
        return holder.describe() + (f", serving {', '.join(sorted(models))}" if models else "")

    def _log_tail(self, runtime: Runtime, instance: Instance) -> str:
        lines = [line for line in runtime.logs(instance, LOG_LINES_IN_ERRORS) if line.strip()]
        return ("; last output: " + " | ".join(lines[-3:])) if lines else ""

    async def _measured_vram(self, instance: Instance, runtime: Runtime) -> int | None:
        """What the driver shows its processes using (owners must be fresh)."""
        pids = {pid for pid, owner in self._owners.items() if owner.model == instance.model}
        samples = await self.sample()
        used = [
            process.used_mb
            for gpu in samples
            for process in gpu.processes
            if process.pid in pids and process.used_mb is not None
        ]
        return sum(used) if used else None

    async def _roll_back(
        self, job: Job, record: ModelRecord, evicted: list[str], failure: BaseException
    ) -> None:
        """Stop the half-started server, then bring back what was evicted for it, each
        model with a load job of its own: queued first, visible and cancellable like any
        other job, and named in this job's ``result.restores``."""
        with contextlib.suppress(Exception):
            if record.resident:
                await self._stop(record, None, reason="load failed", quiet=True)
        cancelled = isinstance(failure, asyncio.CancelledError)
        record.state = ModelLifecycle.STOPPED if cancelled else ModelLifecycle.ERROR
        record.error = None if cancelled else (getattr(failure, "message", None) or str(failure))
        await self.publisher.model_changed(record.snapshot())
        if not cancelled:
            await self.publisher.event(
                Event(
                    event_type="model_load_failed",
                    severity=Severity.ERROR,
                    message=f"{record.spec.name} failed to load: {record.error}",
                    model=record.spec.name,
                )
            )
        restores = []
        for name in reversed(evicted):
            restored = self.models.get(name)
            if restored is None or restored.resident:
                continue  # the cancel came before it was stopped
            gpus = restored.gpus or tuple(restored.spec.gpus)
            moved = len(gpus) == 1 and list(gpus) != restored.spec.gpus
            restore = Job(
                JobRequest("load", name, gpu=gpus[0] if moved else None),
                request_id=f"restore-{job.job_id}",
                priority=RESTORE_PRIORITY,
            )
            queued, _ = self.queue.submit(restore, over_limit=True)
            restores.append({"model": name, "job_id": queued.job_id})
            if queued is restore:
                await self._job_update(restore)
                log.info("restoring %s after a failed swap: job %s", name, restore.job_id)
        if restores:
            self._wakeup.set()
            self._positions.moved()
            job.result = {"restores": restores}

    # ---- unload ----------------------------------------------------------

    async def _unload(self, job: Job, record: ModelRecord) -> None:
        name = record.spec.name
        if not record.resident:
            job.succeed({"model": name, "freed_mb": 0}, f"{name} is not loaded")
            return
        if record.spec.pinned and not job.request.force:
            raise LoadFailure(
                ErrorCode.BUSY, f"{name} is pinned; unload it with force: true if you mean it"
            )
        job.advance(JobPhase.EVICTING, 0.1, f"stopping {name}")
        await self._job_update(job)
        freed = record.vram_used_mb or 0
        await self._stop(record, job, reason="unload")
        job.succeed({"model": name, "freed_mb": freed}, f"{name} unloaded")

    async def _stop(
        self, record: ModelRecord, job: Job | None, *, reason: str, quiet: bool = False
    ) -> None:
        """Stop a server and wait until the driver shows its memory back."""
        instance = record.instance
        if instance is None:
            return
        name = record.spec.name
        runtime = self.runtimes[record.spec.runtime]
        await self._refresh_owners()
        samples = await self.sample()
        before = {s.index: s.memory_used_mb or 0 for s in samples}
        # What it holds now, not its learned full size: a server cancelled half-way
        # through loading holds half of it, and waiting for the rest would stall.
        held = self._held_by(record, samples)
        record.state = ModelLifecycle.UNLOADING
        await self.publisher.model_changed(record.snapshot())
        stopping = time.monotonic()
        try:
            await runtime.stop(instance, record.spec.stop_timeout_s)
        except RuntimeFailure as exc:
            record.state, record.error = ModelLifecycle.ERROR, str(exc)
            await self.publisher.model_changed(record.snapshot())
            raise LoadFailure(ErrorCode.INTERNAL, f"could not stop {name}: {exc}") from None
        if job is not None:
            job.add_time("stop_s", time.monotonic() - stopping)
        record.instance = None
        record.state, record.health = ModelLifecycle.STOPPED, None
        record.loaded_at = None
        await self._refresh_owners()
        if self.config.stop_settle_s:
            await asyncio.sleep(self.config.stop_settle_s)
        if job is not None:
            job.advance(JobPhase.WAITING_VRAM, job.progress, f"waiting for {name}'s memory")
            await self._job_update(job)
        if held:
            # Most of it back is enough: the driver keeps a little per context.
            targets = {g: before.get(g, 0) - int(mb * 0.9) for g, mb in held.items()}
            returned = await self._wait_until(
                lambda samples: all(
                    (s.memory_used_mb or 0) <= targets[s.index]
                    for s in samples
                    if s.index in targets
                )
            )
            if not returned:
                await self._vram_leak(name, sum(held.values()), sorted(held))
        await self.publisher.model_changed(record.snapshot())
        await self._after_stop(record)
        if not quiet:
            await self.publisher.event(
                Event(
                    event_type="model_unloaded",
                    severity=Severity.INFO,
                    message=f"{name} unloaded ({reason})",
                    model=name,
                    job_id=job.job_id if job else None,
                )
            )
        await self.publisher.state_changed()

    def _held_by(self, record: ModelRecord, samples: Sequence[GpuSample]) -> dict[int, int]:
        """MiB per GPU that the driver shows the model's processes holding (owners must be
        fresh). Where the driver lists no processes at all, a ready model is taken to hold
        what it was measured to use when it became ready; anything else, nothing known."""
        name = record.spec.name
        pids = {pid for pid, owner in self._owners.items() if owner.model == name}
        held: dict[int, int] = {}
        listed = False
        for gpu in samples:
            for process in gpu.processes:
                listed = True
                if process.pid in pids and process.used_mb:
                    held[gpu.index] = held.get(gpu.index, 0) + process.used_mb
        if listed or record.state != ModelLifecycle.READY or not record.vram_used_mb:
            return held
        gpus = record.gpus or tuple(record.spec.gpus)
        return {g: record.vram_used_mb // len(gpus) for g in gpus}

    async def _wait_for_free(self, gpus: tuple[int, ...], required_mb: int) -> None:
        fits = await self._wait_until(
            lambda samples: all(
                (s.memory_free_mb or 0) >= required_mb for s in samples if s.index in gpus
            )
        )
        if not fits:
            samples = await self.sample()
            free = {s.index: s.memory_free_mb for s in samples if s.index in gpus}
            await self._vram_leak(None, required_mb, gpus)
            raise LoadFailure(
                ErrorCode.INSUFFICIENT_VRAM,
                f"the memory did not come back within {self.config.vram_wait_timeout_s:g} s: "
                f"need {required_mb} MiB free on GPU {','.join(map(str, gpus))}, have {free}",
                {"required_mb": required_mb, "free_mb": free},
            )

    async def _wait_until(self, condition: Callable[[tuple[GpuSample, ...]], bool]) -> bool:
        deadline = time.monotonic() + self.config.vram_wait_timeout_s
        while True:
            if condition(await self.sample()):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(self.config.vram_poll_s)

    async def _vram_leak(self, model: str | None, expected_mb: int, gpus: Sequence[int]) -> None:
        await self.publisher.event(
            Event(
                event_type="vram_leak",
                severity=Severity.WARNING,
                message=f"{expected_mb} MiB on GPU {','.join(map(str, gpus))} did not come back "
                f"within {self.config.vram_wait_timeout_s:g} s"
                + (f" after stopping {model}" if model else ""),
                model=model,
                gpu=gpus[0] if gpus else None,
            )
        )

    # ---- unattended ------------------------------------------------------

    async def _monitor(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.config.monitor_interval_s)
            for name, record in list(self.models.items()):
                if record.instance is None or self._swapping():
                    continue
                try:
                    if record.state == ModelLifecycle.READY:
                        await self._check(record)
                    elif record.state == ModelLifecycle.LOADING:
                        await self._check_adopted_loading(record)
                except Exception:  # one model's trouble must not stop the watch
                    log.exception("checking %s failed", name)

    def _swapping(self) -> bool:
        """While a swap runs it may stop any model: the watch stands aside."""
        return self.queue.running is not None

    async def _check_adopted_loading(self, record: ModelRecord) -> None:
        """An adopted server that was still loading: ready once healthy."""
        assert record.instance is not None
        runtime = self.runtimes[record.spec.runtime]
        status = await runtime.exit_status(record.instance)
        if status is not None:
            await self._crashed(record, status.reason + self._log_tail(runtime, record.instance))
            return
        if await probe(record.spec.health) == 200:
            record.state, record.health = ModelLifecycle.READY, "ok"
            record.vram_used_mb = await self._measured_vram(record.instance, runtime)
            await self.publisher.model_changed(record.snapshot())
            return
        started = record.instance.started_at or record.loaded_at or time.time()
        if time.time() - started > record.spec.load_timeout_s:
            await self._crashed(
                record, f"not healthy {record.spec.load_timeout_s:g} s after it was started"
            )

    async def _check(self, record: ModelRecord) -> None:
        assert record.instance is not None
        spec = record.spec
        runtime = self.runtimes[spec.runtime]
        instance = record.instance
        status = await runtime.exit_status(instance)
        if record.instance is not instance or self._swapping():
            return  # the swap worker stopped or replaced it meanwhile
        if status is not None:
            await self._crashed(record, f"{status.reason}" + self._log_tail(runtime, instance))
            return
        healthy = await probe(spec.health) == 200
        if record.instance is not instance or self._swapping():
            return
        record.health_failures = 0 if healthy else record.health_failures + 1
        health = "ok" if healthy else "failing"
        if health != record.health:
            record.health = health
            await self.publisher.model_changed(record.snapshot())
        if record.health_failures >= self.config.health_failures:
            await self._crashed(
                record, f"health check failed {record.health_failures} times in a row"
            )
            return
        idle_since = record.last_used_at or record.loaded_at
        idle_s = time.time() - idle_since if idle_since is not None else 0.0
        if spec.ttl_s is not None and idle_s >= spec.ttl_s:
            log.info("%s idle for %.0f s (ttl %.0f s): unloading", spec.name, idle_s, spec.ttl_s)
            # The operator asked for this unload by setting ttl_s: pinned or not.
            try:
                self.submit(JobRequest("unload", spec.name, force=True), request_id="ttl")
            except CommandError as exc:
                log.error("could not unload idle %s: %s", spec.name, exc.message)

    async def _crashed(self, record: ModelRecord, reason: str) -> None:
        name = record.spec.name
        log.error("%s crashed: %s", name, reason)
        instance = record.instance
        if instance is not None:
            # Whatever is left (a hung process) still holds VRAM: stop it. Not READY
            # meanwhile, so no load takes it for "already loaded".
            record.state = ModelLifecycle.UNLOADING
            with contextlib.suppress(RuntimeFailure):
                await self.runtimes[record.spec.runtime].stop(instance, record.spec.stop_timeout_s)
        record.instance = None
        record.state, record.health, record.error = ModelLifecycle.CRASHED, "down", reason
        record.health_failures = 0
        await self._refresh_owners()
        await self.publisher.model_changed(record.snapshot())
        await self._after_stop(record)
        await self.publisher.event(
            Event(
                event_type="model_crashed",
                severity=Severity.ERROR,
                message=f"{name} crashed: {reason}",
                model=name,
                gpu=(record.gpus or tuple(record.spec.gpus))[0],
            )
        )
        await self.publisher.state_changed()
        if record.spec.restart == "on-crash" and name in self.catalog:
            try:
                self.submit(JobRequest("load", name), request_id="restart-on-crash")
            except CommandError as exc:
                log.error("could not restart %s: %s", name, exc.message)

    # ---- bookkeeping -----------------------------------------------------

    async def _refresh_owners(self) -> None:
        owners: dict[int, ProcessOwner] = {}
        for name, record in self.models.items():
            if record.instance is None:
                continue
            runtime = self.runtimes[record.spec.runtime]
            try:
                pids = await runtime.pids(record.instance)
            except RuntimeFailure:
                pids = frozenset()
            for pid in pids | ({record.instance.pid} if record.instance.pid else set()):
                owners[pid] = ProcessOwner(model=name, container=record.instance.container_name)
        self._owners = owners

    async def _job_update(self, job: Job, *, final: bool = False) -> None:
        self._positions.published(await publish_job(job, self.store, self.publisher, final=final))


def _check_gpu_override(spec: ModelSpec, gpu: int | None, present: Collection[int]) -> None:
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


def _gpu_memory(samples: Sequence[GpuSample]) -> list[GpuMemory]:
    return [
        GpuMemory(s.index, s.memory_total_mb or 0, s.memory_free_mb or 0)
        for s in samples
        if not s.lost and s.memory_total_mb is not None
    ]
