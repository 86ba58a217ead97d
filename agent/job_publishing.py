"""How a job's changes leave a worker: published, saved (so a restart can tell it was
interrupted) and, when it ends, handed to whoever waits for it. Shared by the swap
worker (``lifecycle``) and the install worker (``installer``)."""

from __future__ import annotations

import asyncio
from typing import Protocol

from agent.jobs import Job
from agent.store import Store
from shared.messages import Event, JobState


class JobPublisher(Protocol):
    """What a worker tells the world; the service puts it on the bus."""

    async def job_changed(self, job: JobState) -> None: ...

    async def job_finished(self, job: JobState) -> None: ...

    async def event(self, event: Event) -> None: ...


async def publish_job(
    job: Job, store: Store, publisher: JobPublisher, *, final: bool = False
) -> None:
    snapshot = job.snapshot()
    await publisher.job_changed(snapshot)
    await asyncio.to_thread(store.save_job, snapshot)
    if final:
        await publisher.job_finished(snapshot)
