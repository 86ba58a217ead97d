"""What the swap worker (``lifecycle``) and the install worker (``installer``) share:
how a job's changes leave a worker (published, saved so a restart can tell it was
interrupted, and when it ends handed to whoever waits for it), and how a worker
waits for the task running a job."""

from __future__ import annotations

import asyncio
import contextlib
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


async def wait_for_job(
    job: Job, task: asyncio.Task[None], *, cancel_message: str, settle_on_shutdown: bool
) -> None:
    """Wait for the task running ``job``. A cancel aimed at the job ends only its task
    (the job is finished afterwards); a cancel of the worker itself cancels the task
    too, waits for it when ``settle_on_shutdown`` (a child process must be gone first)
    and re-raises. A job whose task ended before its own bookkeeping is cancelled."""
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            task.cancel()
            if settle_on_shutdown:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            raise
    finally:
        if not job.finished:
            job.cancel(cancel_message)
