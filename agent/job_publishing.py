"""What the swap worker (``lifecycle``) and the install worker (``installer``) share:
how a job's changes leave a worker (published, saved so a restart can tell it was
interrupted, and when it ends handed to whoever waits for it), and how a worker
waits for the task running a job."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

from agent.database import Database
from agent.jobs import Job, SwapQueue
from shared.messages import Event, JobState, JobStatus

# How long changes of queued jobs' places are gathered before they are published.
POSITION_COALESCE_S = 0.25


class JobPublisher(Protocol):
    """What a worker tells the world; the service puts it on the bus."""

    async def job_changed(self, job: JobState) -> None: ...

    async def job_finished(self, job: JobState) -> None: ...

    async def event(self, event: Event) -> None: ...


async def publish_job(
    job: Job, store: Database, publisher: JobPublisher, *, final: bool = False
) -> JobState:
    snapshot = job.snapshot()
    if not final and job.unchanged_since_published(snapshot):
        # A progress tick of a load whose time was never measured changes nothing.
        return snapshot
    job.published = snapshot
    await publisher.job_changed(snapshot)
    await asyncio.to_thread(store.save_job, snapshot)
    if final:
        await publisher.job_finished(snapshot)
    return snapshot


class QueuePositions:
    """Republishes a queued job only when its place in the queue differs from the one
    last published for it, gathered over POSITION_COALESCE_S. Republishing every queued
    job on each start, cancel or insert once cost 859 messages for 37 jobs in a burst,
    enough for a broker to drop messages to a watcher, final states among them."""

    def __init__(
        self,
        queue: SwapQueue,
        publisher: JobPublisher,
        *,
        coalesce_s: float = POSITION_COALESCE_S,
    ) -> None:
        self._queue = queue
        self._publisher = publisher
        self.coalesce_s = coalesce_s
        self._published: dict[str, int | None] = {}
        self._pending: asyncio.Task[None] | None = None

    def published(self, job: JobState) -> None:
        """Remember the place a job was published with (forgotten once it left the queue)."""
        if job.state == JobStatus.QUEUED:
            self._published[job.job_id] = job.queue_position
        else:
            self._published.pop(job.job_id, None)

    def moved(self) -> None:
        """Places may have changed: publish the jobs whose place did, shortly."""
        if self._pending is None or self._pending.done():
            self._pending = asyncio.get_running_loop().create_task(self._publish_later())

    def stop(self) -> None:
        if self._pending is not None:
            self._pending.cancel()

    async def _publish_later(self) -> None:
        await asyncio.sleep(self.coalesce_s)
        for job in self._queue.queued():
            # A job not yet announced is published with its place by its announcement.
            if job.job_id in self._published and self._published[job.job_id] != (
                job.queue_position
            ):
                snapshot = job.snapshot()
                job.published = snapshot
                await self._publisher.job_changed(snapshot)
                self.published(snapshot)


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
