"""Stopping a model server, and waiting until the driver shows the memory back: after a
stop (what the server held, measured at the stop) and before a start (what the new
one needs). Memory that does not come back in time is a ``vram_leak`` event."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from agent.gpu.base import GpuSample
from agent.job_worker import JobUpdate
from agent.jobs import Job, JobFailure
from agent.model_registry import LifecyclePart, ModelRecord, Surroundings
from agent.runtimes.base import RuntimeFailure
from shared.messages import ErrorCode, Event, EventType, JobPhase, ModelLifecycle, Severity

# Most of what a server held back is enough: the driver keeps a little per context.
RETURNED_SHARE = 0.9


class ServerStops(LifecyclePart):
    def __init__(self, around: Surroundings, update_job: JobUpdate) -> None:
        super().__init__(around)
        self.update_job = update_job

    async def stop(
        self, record: ModelRecord, job: Job[Any] | None, *, reason: str, quiet: bool = False
    ) -> None:
        """Stop a server and wait until the driver shows its memory back."""
        instance = record.instance
        if instance is None:
            return
        name = record.spec.name
        before, held = await self.letting_go(record)
        stopping = time.monotonic()
        try:
            await self.registry.runtime(record).stop(instance, record.spec.stop_timeout_s)
        except RuntimeFailure as exc:
            record.state, record.error = ModelLifecycle.ERROR, str(exc)
            await self.publisher.model_changed(record.snapshot())
            raise JobFailure(ErrorCode.INTERNAL, f"could not stop {name}: {exc}") from None
        if job is not None:
            job.add_time("stop_s", time.monotonic() - stopping)
        record.instance = None
        # Still "unloading" until its memory is back: watchers (the TUI's bar) keep its name
        # on the memory its gone processes leave behind, not "other".
        record.health = None
        record.loaded_at = None
        await self.registry.refresh_owners()
        if self.config.stop_settle_s:
            await asyncio.sleep(self.config.stop_settle_s)
        if job is not None:
            job.advance(JobPhase.WAITING_VRAM, job.progress, f"waiting for {name}'s memory")
            await self.update_job(job)
        await self.wait_returned(name, held, before)
        record.state = ModelLifecycle.STOPPED
        await self.publisher.model_changed(record.snapshot())
        await self.registry.stopped(record)
        if not quiet:
            await self.publisher.event(
                Event(
                    event_type=EventType.MODEL_UNLOADED,
                    severity=Severity.INFO,
                    message=f"{name} unloaded ({reason})",
                    model=name,
                    job_id=job.job_id if job else None,
                )
            )
        await self.publisher.state_changed()

    async def letting_go(self, record: ModelRecord) -> tuple[dict[int, int], dict[int, int]]:
        """Before a server lets its memory go (a stop, a sleep): the memory used on each GPU
        and what it holds there (MiB), and the model ``unloading`` meanwhile."""
        await self.registry.refresh_owners()
        samples = await self.sample()
        before = {s.index: s.memory_used_mb or 0 for s in samples}
        # What it holds now, not its learned full size: a server cancelled half-way
        # through loading holds half of it, and waiting for the rest would stall.
        held = self.registry.held_by(record, samples)
        record.state = ModelLifecycle.UNLOADING
        await self.publisher.model_changed(record.snapshot())
        return before, held

    async def wait_returned(self, name: str, held: dict[int, int], before: dict[int, int]) -> None:
        """Until most of what ``name`` ``held`` (MiB per GPU) is back on top of the memory
        used ``before`` it let go; a ``vram_leak`` event when it does not come back."""
        if not held:
            return
        targets = {g: before.get(g, 0) - int(mb * RETURNED_SHARE) for g, mb in held.items()}
        returned = await self.wait_until(
            lambda samples: all(
                (s.memory_used_mb or 0) <= targets[s.index] for s in samples if s.index in targets
            )
        )
        if not returned:
            await self.vram_leak(name, sum(held.values()), sorted(held))

    async def wait_for_free(self, gpus: tuple[int, ...], required_mb: int) -> None:
        fits = await self.wait_until(
            lambda samples: all(
                (s.memory_free_mb or 0) >= required_mb for s in samples if s.index in gpus
            )
        )
        if not fits:
            samples = await self.sample()
            free = {s.index: s.memory_free_mb for s in samples if s.index in gpus}
            await self.vram_leak(None, required_mb, gpus)
            raise JobFailure(
                ErrorCode.INSUFFICIENT_VRAM,
                f"the memory did not come back within {self.config.vram_wait_timeout_s:g} s: "
                f"need {required_mb} MiB free on GPU {','.join(map(str, gpus))}, have {free}",
                {"required_mb": required_mb, "free_mb": free},
            )

    async def wait_until(self, condition: Callable[[tuple[GpuSample, ...]], bool]) -> bool:
        deadline = time.monotonic() + self.config.vram_wait_timeout_s
        while True:
            if condition(await self.sample()):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(self.config.vram_poll_s)

    async def vram_leak(self, model: str | None, expected_mb: int, gpus: Sequence[int]) -> None:
        await self.publisher.event(
            Event(
                event_type=EventType.VRAM_LEAK,
                severity=Severity.WARNING,
                message=f"{expected_mb} MiB on GPU {','.join(map(str, gpus))} did not come back "
                f"within {self.config.vram_wait_timeout_s:g} s"
                + (f" after stopping {model}" if model else ""),
                model=model,
                gpu=gpus[0] if gpus else None,
            )
        )
