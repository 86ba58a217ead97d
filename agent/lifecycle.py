"""Model lifecycle: what the agent's commands ask of the models, and its own work on them.

Everything that changes what runs on the GPUs goes through one worker, one job at a
time (the swap lock): ``job_worker.JobWorker`` runs ``swap.Swap``'s jobs. Beside it,
``model_monitor`` watches ready models; ``model_registry`` knows them all and
``stopping`` stops their servers. This module wires them and answers commands.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Collection

from agent import sleep_api
from agent.background import Background
from agent.catalog import Catalog, ModelSpec
from agent.config import LifecycleConfig
from agent.database import Database
from agent.health import probe
from agent.job_worker import JobWorker
from agent.jobs import Job, SwapRequest
from agent.model_monitor import ModelMonitor
from agent.model_registry import (
    ModelPublisher,
    ModelRecord,
    ModelRegistry,
    Sampler,
    Surroundings,
)
from agent.planner import Plan, Refusal, plan_switch
from agent.runtimes.base import Runtime, RuntimeFailure
from agent.sleep_planner import RestPlan
from agent.sleeping import Sleeps
from agent.stopping import ServerStops
from agent.swap import Swap, check_gpu_override, gpu_memory
from agent.telemetry import ProcessOwner
from shared.messages import (
    Event,
    EventType,
    JobCommand,
    JobOrigin,
    LoadedModel,
    ModelLifecycle,
    Severity,
    utc_now,
)

log = logging.getLogger("modelbus.lifecycle")

# The indices of the GPUs this host has, as last sampled.
GpuIndices = Callable[[], Collection[int]]


class Lifecycle:
    def __init__(
        self,
        catalog: Catalog,
        config: LifecycleConfig,
        runtimes: dict[str, Runtime],
        store: Database,
        publisher: ModelPublisher,
        background: Background,
        sample: Sampler,
        gpu_indices: GpuIndices,
        *,
        sim_state_file: str | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.publisher = publisher
        self.sample = sample
        self.gpu_indices = gpu_indices
        self.registry = ModelRegistry(catalog, runtimes, store, publisher)
        around = Surroundings(self.registry, config, publisher, sample)
        self.stops = ServerStops(around, self._update_job)
        self.sleeps = Sleeps(around, self.stops)
        self.swap = Swap(
            around,
            self.stops,
            self.sleeps,
            self._update_job,
            lambda job: self.worker.submit(job, over_limit=True),
            sim_state_file=sim_state_file,
        )
        self.worker: JobWorker[SwapRequest] = JobWorker(
            self.swap, store, publisher, background, name="swap", limit=config.queue_limit
        )
        self.monitor = ModelMonitor(
            around,
            lambda request, request_id: self.submit(request, request_id=request_id),
            lambda: self.worker.running is not None,
        )

    # ---- what others ask -------------------------------------------------

    @property
    def catalog(self) -> Catalog:
        return self.registry.catalog

    @property
    def models(self) -> dict[str, ModelRecord]:
        return self.registry.records

    def owner_of(self, pid: int) -> ProcessOwner | None:
        return self.registry.owner_of(pid)

    def loaded_models(self) -> dict[str, LoadedModel]:
        return self.registry.loaded_models()

    @property
    def active_job(self) -> Job[SwapRequest] | None:
        return self.worker.running

    @property
    def queue_length(self) -> int:
        return len(self.worker.queue)

    def submit(
        self,
        request: SwapRequest,
        *,
        request_id: str | None,
        priority: int = 0,
        origin: JobOrigin = JobOrigin.AGENT,
    ) -> tuple[Job[SwapRequest], bool]:
        """Queue a GPU-changing job; an equal request joins the existing job."""
        record = self.registry.records.get(request.model)
        # A model that left the catalog but still runs can still be unloaded.
        spec = record.spec if record is not None else None
        if spec is None or (
            request.model not in self.catalog and request.command != JobCommand.UNLOAD
        ):
            raise self.registry.unknown_model(request.model)
        check_gpu_override(spec, request.gpu, self.gpu_indices())
        job = Job(request, request_id=request_id, priority=priority, origin=origin)
        return self.worker.submit(job)

    def loading_job(self, name: str) -> Job[SwapRequest] | None:
        """The queued or running job that loads ``name`` (a load or a switch), if any."""
        return next(
            (
                job
                for job in self.worker.active()
                if job.request.model == name and job.request.command != JobCommand.UNLOAD
            ),
            None,
        )

    def switch_for_request(self, spec: ModelSpec) -> Job[SwapRequest]:
        """The job that loads ``spec`` for a gateway request: one already loading it, or
        a new switch (``exclusive`` as its catalog entry says); raises CommandError."""
        job = self.loading_job(spec.name)
        if job is None:
            request = SwapRequest(JobCommand.SWITCH, spec.name, exclusive=spec.exclusive)
            job, _ = self.submit(request, request_id="gateway", origin=JobOrigin.GATEWAY)
        return job

    async def finished(
        self, job: Job[SwapRequest], hand_off: Callable[[Job[SwapRequest]], None] | None = None
    ) -> None:
        """Until ``job`` ended; ``hand_off`` sees it end before the next job starts."""
        await self.worker.finished(job, hand_off)

    async def cancel(self, job_id: str) -> Job[SwapRequest] | None:
        """Cancel a queued or running swap job; None when ``job_id`` is not one."""
        return await self.worker.cancel(job_id)

    async def plan(
        self, model: str, gpu: int | None, exclusive: bool, *, force: bool = False
    ) -> tuple[Plan | Refusal, RestPlan | None]:
        """What a switch would do now, and which evicted models it would put to sleep
        (None: it wakes nothing and needs nothing evicted); changes nothing."""
        spec = self.catalog.get(model)
        if spec is None:
            raise self.registry.unknown_model(model)
        check_gpu_override(spec, gpu, self.gpu_indices())
        record = self.registry.records[model]
        waking = record.asleep and gpu in (None, *record.placed_on)
        result = plan_switch(
            gpu_memory(await self.sample()),
            self.registry.residents(),
            await self.registry.target(spec, gpu, on=record.placed_on if waking else None),
            exclusive=exclusive,
            force=force,
            headroom_mb=self.config.headroom_mb,
        )
        if isinstance(result, Refusal):
            return result, None
        return result, self.sleeps.plan(result.evict, waking=model if waking else None)

    async def evictions(self, spec: ModelSpec) -> frozenset[str] | None:
        """What a gateway switch to ``spec`` would evict were no model busy (a switch
        drains busy ones); None when it cannot fit even so."""
        residents = [
            dataclasses.replace(resident, busy=False)
            for resident in self.registry.residents(exclude=spec.name)
        ]
        plan = plan_switch(
            gpu_memory(await self.sample()),
            residents,
            await self.registry.target(spec, None),
            exclusive=spec.exclusive,
            headroom_mb=self.config.headroom_mb,
        )
        return None if isinstance(plan, Refusal) else frozenset(plan.evict)

    async def reload(self, catalog: Catalog) -> list[str]:
        """Take a new catalog; returns what changed (see ModelRegistry.reload)."""
        busy = {job.request.model for job in self.worker.active()}
        return await self.registry.reload(catalog, busy)

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
                    event_type=EventType.JOB_FAILED,
                    severity=Severity.WARNING,
                    message=f"job {job.job_id} ({job.command} {job.model}) was interrupted "
                    "by a restart",
                    model=job.model,
                    job_id=job.job_id,
                )
            )
        await self._adopt()
        for name, record in self.registry.records.items():
            # What earlier sleeps and loads taught, for the sleep planner's choices.
            facts = await asyncio.to_thread(self.store.model_facts, name)
            if facts is not None:
                record.sleep_ram_mb, record.last_wake_s = facts.sleep_ram_mb, facts.wake_s
                record.learned_load_s = facts.load_s
            await self.publisher.model_changed(record.snapshot())
        for name in self.config.preload:
            if not self.registry.records[name].resident:
                self.submit(SwapRequest(JobCommand.LOAD, name), request_id="preload")

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self.worker.run(), name="swap-worker")
            group.create_task(self.monitor.run(), name="model-monitor")

    def stop(self) -> None:
        """Ask the worker and the monitor to end (see JobWorker.stop)."""
        self.worker.stop()
        self.monitor.stop()

    async def _adopt(self) -> None:
        registry = self.registry
        specs = dict(self.catalog.models)
        for name, runtime in registry.runtimes.items():
            wanted = {n: s for n, s in specs.items() if s.runtime == name}
            if not wanted:
                continue
            try:
                adopted = await runtime.adopt(wanted)
            except RuntimeFailure as exc:
                log.error("could not look for running %s servers: %s", name, exc)
                continue
            for instance in adopted:
                record = registry.records[instance.model]
                registry.adopted(record, instance)
                # A server still loading when the old agent died keeps loading:
                # the monitor turns it ready once healthy (or crashed if it never is).
                healthy = await probe(record.spec.health) == 200
                record.state = ModelLifecycle.READY if healthy else ModelLifecycle.LOADING
                record.health = "ok" if healthy else "starting"
                if healthy and await sleep_api.is_sleeping(record.spec):
                    # Put to sleep by the agent before this one: it holds no VRAM.
                    record.state, record.health = ModelLifecycle.SLEEPING, "asleep"
                log.info("adopted %s (%s) started before this agent", instance.model, name)
        await registry.refresh_owners()
        samples = await self.sample()
        for name, record in registry.records.items():
            if record.instance is not None and record.state == ModelLifecycle.READY:
                record.vram_used_mb = registry.measured_vram(name, samples)

    async def _update_job(self, job: Job[SwapRequest]) -> None:
        await self.worker.update(job)
