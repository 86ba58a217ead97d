"""The models this agent knows: one record per catalog entry (and per model still
running after it left the catalog), what each runs as, which processes it owns, and
catalog changes that wait for a running model to stop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from agent.catalog import Catalog, ModelSpec
from agent.config import LifecycleConfig
from agent.database import Database
from agent.gpu.base import GpuSample
from agent.job_worker import JobPublisher
from agent.planner import Resident, Target
from agent.runtimes.base import Instance, Runtime, RuntimeFailure
from agent.sleep_planner import Sleeper
from agent.telemetry import ProcessOwner
from shared.commands import CommandError
from shared.messages import (
    ErrorCode,
    Event,
    EventType,
    LoadedModel,
    ModelLifecycle,
    ModelState,
    Severity,
    utc_now,
)

Sampler = Callable[[], Awaitable[tuple[GpuSample, ...]]]


class ModelPublisher(JobPublisher, Protocol):
    """What the lifecycle tells the world; the service puts it on the bus."""

    async def model_changed(self, state: ModelState) -> None: ...

    async def model_removed(self, name: str) -> None: ...

    async def state_changed(self) -> None: ...


@dataclass(frozen=True)
class Surroundings:
    """What every part of the lifecycle works with."""

    registry: ModelRegistry
    config: LifecycleConfig
    publisher: ModelPublisher
    sample: Sampler


class LifecyclePart:
    """A part of the lifecycle (the swap, the stops, the monitor): what it works with."""

    def __init__(self, around: Surroundings) -> None:
        self.registry = around.registry
        self.config = around.config
        self.publisher = around.publisher
        self.sample = around.sample

    async def now_ready(
        self, record: ModelRecord, gpus: tuple[int, ...], job_id: str, took: str
    ) -> None:
        """Its server answers its health check: measure what it uses, turn it ready, and say
        so (``took``: "ready ... in 2.1 s", "woken ... in 0.31 s")."""
        name = record.spec.name
        await self.registry.refresh_owners()
        record.vram_used_mb = self.registry.measured_vram(name, await self.sample())
        record.state, record.health, record.gpus = ModelLifecycle.READY, "ok", gpus
        await self.publisher.model_changed(record.snapshot())
        await self.publisher.event(
            Event(
                event_type=EventType.MODEL_LOADED,
                severity=Severity.INFO,
                message=took.format(name=name, gpus=",".join(map(str, gpus)))
                + (f", using {record.vram_used_mb} MiB" if record.vram_used_mb else ""),
                model=name,
                gpu=gpus[0],
                job_id=job_id,
            )
        )


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
    # Gateway traffic: requests being answered, all forwarded, and when the last came.
    in_flight: int = 0
    waiting: int = 0  # queued in the gateway (its admission keeps the count)
    requests_total: int = 0
    last_request_at: float | None = None
    # Chosen for eviction by a swap that waits for its requests to end: it admits no more.
    draining: bool = False
    # Sleep (its server runs, its VRAM freed): host RAM it held when last asleep, measured,
    # and how long its last wake took.
    sleep_ram_mb: int | None = None
    last_wake_s: float | None = None
    # Its load time as learned: the database's average at start, then its last load's.
    learned_load_s: float | None = None

    @property
    def asleep(self) -> bool:
        return self.instance is not None and self.state == ModelLifecycle.SLEEPING

    @property
    def on_gpu(self) -> bool:
        """Its server runs and holds (or is taking) its VRAM: not asleep."""
        return self.instance is not None and self.state != ModelLifecycle.SLEEPING

    def sleep_ram_estimate_mb(self) -> int:
        """Host RAM it would hold asleep: measured, else the catalog's, else its weights
        (its VRAM estimate) at level 1 and nothing at level 2."""
        if self.sleep_ram_mb is not None:
            return self.sleep_ram_mb
        if self.spec.sleep_ram_mb is not None:
            return self.spec.sleep_ram_mb
        return self.spec.vram_mb if self.spec.sleep_level == 1 else 0

    @property
    def resident(self) -> bool:
        return self.instance is not None

    @property
    def placed_on(self) -> tuple[int, ...]:
        """The GPUs it runs on, or else the ones its catalog entry names."""
        return self.gpus or tuple(self.spec.gpus)

    def snapshot(self) -> ModelState:
        return ModelState(
            name=self.spec.name,
            runtime=self.spec.runtime,
            state=self.state,
            gpus=list(self.placed_on),
            vram_estimate_mb=self.spec.vram_mb,
            vram_used_mb=self.vram_used_mb,
            health=self.health,
            loaded_at=timestamp(self.loaded_at),
            last_used_at=timestamp(self.last_used_at),
            last_load_s=None if self.last_load_s is None else round(self.last_load_s, 3),
            priority=self.spec.priority,
            pinned=self.spec.pinned,
            description=self.spec.description,
            error=self.error,
            in_flight=self.in_flight,
            waiting=self.waiting,
            requests_total=self.requests_total,
            last_request_at=timestamp(self.last_request_at),
            aliases=list(self.spec.aliases),
            sleep=self.spec.sleep,
            sleep_ram_mb=self.sleep_ram_estimate_mb() if self.spec.sleep else None,
            last_wake_s=None if self.last_wake_s is None else round(self.last_wake_s, 3),
            ts=utc_now(),
        )


def timestamp(at: float | None) -> datetime | None:
    return None if at is None else datetime.fromtimestamp(at, UTC)


class ModelRegistry:
    def __init__(
        self,
        catalog: Catalog,
        runtimes: dict[str, Runtime],
        store: Database,
        publisher: ModelPublisher,
    ) -> None:
        self.catalog = catalog
        self.runtimes = runtimes
        self.store = store
        self.publisher = publisher
        self.records = {name: ModelRecord(spec) for name, spec in catalog.models.items()}
        self._owners: dict[int, ProcessOwner] = {}
        # Catalog changes that wait for a running model to stop.
        self._pending_specs: dict[str, ModelSpec] = {}
        self._leaving: set[str] = set()
        # Replaced each time a request ends or a drain ends: what drains wait on.
        self._traffic_changed = asyncio.Event()

    def runtime(self, record: ModelRecord) -> Runtime:
        return self.runtimes[record.spec.runtime]

    def unknown_model(self, name: str) -> CommandError:
        return CommandError(
            ErrorCode.UNKNOWN_MODEL,
            f"unknown model {name!r}: the catalog has "
            f"{', '.join(self.catalog.names()) or 'no models'}",
        )

    def loaded_models(self) -> dict[str, LoadedModel]:
        return {
            name: LoadedModel(
                model=record.spec.hf_repo or name,
                service=f"http://127.0.0.1:{record.spec.port}",
                loaded_at=timestamp(record.loaded_at),
                status=record.state.value,
            )
            for name, record in self.records.items()
            if record.resident
        }

    # ---- gateway traffic -------------------------------------------------

    def request_started(self, name: str) -> None:
        """A request is being forwarded to ``name``: it is in use (LRU, ttl) and busy."""
        record = self.records[name]
        record.in_flight += 1
        record.requests_total += 1
        record.last_request_at = record.last_used_at = time.time()

    def request_ended(self, name: str) -> None:
        record = self.records.get(name)
        if record is not None:
            record.in_flight = max(0, record.in_flight - 1)
            record.last_used_at = time.time()
        self.traffic_changed()

    def traffic_changed(self) -> None:
        """Wake whoever waits for requests to end or a drain to be over."""
        changed, self._traffic_changed = self._traffic_changed, asyncio.Event()
        changed.set()

    async def next_traffic_change(self) -> None:
        await self._traffic_changed.wait()

    async def drained(self, names: Sequence[str], timeout_s: float) -> None:
        """Until none of ``names`` has a request in flight; TimeoutError after ``timeout_s``."""
        async with asyncio.timeout(timeout_s):
            while any(self.records[name].in_flight for name in names if name in self.records):
                await self.next_traffic_change()

    # ---- placement -------------------------------------------------------

    async def target(
        self, spec: ModelSpec, gpu: int | None, *, on: tuple[int, ...] | None = None
    ) -> Target:
        """What the planner places: the model's learned size where one was measured;
        ``on``: the GPUs it must go to (a sleeping model wakes where it sleeps)."""
        facts = await asyncio.to_thread(self.store.model_facts, spec.name)
        vram = facts.vram_mb if facts and facts.vram_mb else spec.vram_mb
        placement = on or ((gpu,) if gpu is not None else tuple(spec.gpus))
        return Target(spec.name, vram, (placement,), priority=spec.priority)

    def residents(self, exclude: str | None = None) -> list[Resident]:
        return [
            Resident(
                name=name,
                gpus=record.placed_on,
                vram_mb=record.vram_used_mb or record.spec.vram_mb,
                priority=record.spec.priority,
                pinned=record.spec.pinned,
                last_used=record.last_used_at or record.loaded_at or 0.0,
                busy=record.in_flight > 0,
                exclusive=record.spec.exclusive,
            )
            for name, record in self.records.items()
            if record.on_gpu and name != exclude
        ]

    def sleepers(self) -> list[Sleeper]:
        return [
            Sleeper(name, record.sleep_ram_estimate_mb(), record.last_used_at or 0.0)
            for name, record in self.records.items()
            if record.asleep
        ]

    # ---- processes and their memory --------------------------------------

    def owner_of(self, pid: int) -> ProcessOwner | None:
        return self._owners.get(pid)

    async def refresh_owners(self) -> None:
        owners: dict[int, ProcessOwner] = {}
        for name, record in self.records.items():
            if record.instance is None:
                continue
            try:
                pids = await self.runtime(record).pids(record.instance)
            except RuntimeFailure:
                pids = frozenset()
            for pid in pids | ({record.instance.pid} if record.instance.pid else set()):
                owners[pid] = ProcessOwner(model=name, container=record.instance.container_name)
        self._owners = owners

    def measured_vram(self, name: str, samples: Sequence[GpuSample]) -> int | None:
        """What the driver shows the model's processes using (owners must be fresh)."""
        pids = {pid for pid, owner in self._owners.items() if owner.model == name}
        used = [
            process.used_mb
            for gpu in samples
            for process in gpu.processes
            if process.pid in pids and process.used_mb is not None
        ]
        return sum(used) if used else None

    def held_by(self, record: ModelRecord, samples: Sequence[GpuSample]) -> dict[int, int]:
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
        gpus = record.placed_on
        return {g: record.vram_used_mb // len(gpus) for g in gpus}

    def describe_owners(self, pids: frozenset[int]) -> str:
        owners = (self._owners.get(pid) for pid in pids)
        models = {owner.model for owner in owners if owner is not None and owner.model}
        return f", serving {', '.join(sorted(models))}" if models else ""

    # ---- catalog changes -------------------------------------------------

    async def reload(self, catalog: Catalog, busy: set[str]) -> list[str]:
        """Take a new catalog. Running models (and those with a job: ``busy``) are left
        alone: one whose entry changed keeps running as it was started and takes the new
        entry once stopped; one that left the catalog stays until it is unloaded."""
        changes = []
        # First: whoever the publishes below wake (Home Assistant's discovery) reads it.
        self.catalog = catalog
        for name, spec in catalog.models.items():
            self._leaving.discard(name)
            self._pending_specs.pop(name, None)
            record = self.records.get(name)
            if record is None:
                self.records[name] = ModelRecord(spec)
                changes.append(f"added {name}")
            elif record.spec != spec:
                if record.resident or name in busy:
                    self._pending_specs[name] = spec
                    changes.append(f"changed {name} (applies once it is stopped)")
                else:
                    record.spec = spec
                    changes.append(f"changed {name}")
        for name in [n for n in self.records if n not in catalog.models]:
            if self.records[name].resident or name in busy:
                changes.append(f"removed {name} (still running; gone once unloaded)")
                self._leaving.add(name)
            else:
                del self.records[name]
                await self.publisher.model_removed(name)
                changes.append(f"removed {name}")
        for name in catalog.models:
            await self.publisher.model_changed(self.records[name].snapshot())
        await self.publisher.state_changed()
        return changes

    async def stopped(self, record: ModelRecord) -> None:
        """The model stopped: apply a catalog change that waited for that."""
        name = record.spec.name
        if name in self._leaving:
            self._leaving.discard(name)
            self.records.pop(name, None)
            await self.publisher.model_removed(name)
        elif name in self._pending_specs:
            record.spec = self._pending_specs.pop(name)

    def adopted(self, record: ModelRecord, instance: Instance) -> None:
        record.instance = instance
        record.gpus = tuple(record.spec.gpus)
        record.loaded_at = instance.started_at or time.time()
