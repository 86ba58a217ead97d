"""One queue of jobs and the worker that runs them one at a time. The swap queue (the
swap lock) and the install queue are both instances; what a job does is its runner's.

The worker owns everything around the work: submitting (an equal request joins the
job already there), announcing a queued job, cancelling it, publishing its changes
(saved too, so a restart can tell a job was interrupted), its final state, and the
places of the jobs behind it.

Each running job has a cancel scope of its own: the runner's ``run`` is a task that a
cancel command cancels, and nothing else. What a cancelled or failed run left half
done is undone by the runner's ``recover``, outside that scope, so the undoing can
neither be cut short by the cancel nor by a second one. A shutdown cancels the worker
itself; then the job's task ends with it and nothing is undone: the next agent finds
the job interrupted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, Protocol

from agent.background import Background, Debounced
from agent.database import Database
from agent.jobs import Job, JobFailure, JobQueue, QueueFullError, Request
from shared.commands import CommandError
from shared.messages import ErrorCode, Event, EventType, JobState, JobStatus, Severity

log = logging.getLogger("modelbus.jobs")

# Publishes a job's progress, through the worker that runs it.
JobUpdate = Callable[[Job[Any]], Awaitable[None]]
# How long changes of queued jobs' places are gathered before they are published.
POSITION_COALESCE_S = 0.25


class JobPublisher(Protocol):
    """What a worker tells the world; the service puts it on the bus."""

    async def job_changed(self, job: JobState) -> None: ...

    async def job_finished(self, job: JobState) -> None: ...

    async def event(self, event: Event) -> None: ...


class JobRunner(Protocol[Request]):
    """What a queue's jobs do."""

    # The message of a job whose run a cancel command ended.
    cancelled_message: str

    async def run(self, job: Job[Request]) -> None:
        """The job's work, in its own cancel scope; raises JobFailure when it fails."""

    async def recover(self, job: Job[Request], failure: BaseException) -> None:
        """Undo what a run that failed, or that a cancel ended, left half done; the job
        already shows how it ended. Runs outside the cancel scope."""

    async def settled(self, job: Job[Request]) -> None:
        """The job is over and its final state is about to be published."""

    def describe(self, job: Job[Request]) -> str:
        """The job in a few words, for the event that says it failed."""


class QueuePositions:
    """Republishes a queued job only when its place in the queue differs from the one
    last published for it, gathered over POSITION_COALESCE_S. Republishing every queued
    job on each start, cancel or insert once cost 859 messages for 37 jobs in a burst,
    enough for a broker to drop messages to a watcher, final states among them."""

    def __init__(
        self,
        queue: JobQueue[Any],
        publisher: JobPublisher,
        background: Background,
        *,
        coalesce_s: float = POSITION_COALESCE_S,
    ) -> None:
        self._queue = queue
        self._publisher = publisher
        self._published: dict[str, int | None] = {}
        self._publish = Debounced(
            background, self._publish_moved, delay_s=coalesce_s, name=f"{queue.name}-positions"
        )

    def published(self, job: JobState) -> None:
        """Remember the place a job was published with (forgotten once it left the queue)."""
        if job.state == JobStatus.QUEUED:
            self._published[job.job_id] = job.queue_position
        else:
            self._published.pop(job.job_id, None)

    def moved(self) -> None:
        """Places may have changed: publish the jobs whose place did, shortly."""
        self._publish.trigger()

    async def _publish_moved(self) -> None:
        for job in self._queue.queued():
            # A job not yet announced is published with its place by its announcement.
            if job.job_id in self._published and self._published[job.job_id] != (
                job.queue_position
            ):
                snapshot = job.snapshot()
                job.published = snapshot
                await self._publisher.job_changed(snapshot)
                self.published(snapshot)


async def publish_job(
    job: Job[Any], store: Database, publisher: JobPublisher, *, final: bool = False
) -> JobState:
    """Publish and save the job's state, unless nothing but its time changed since it was
    last published (a progress tick of a load whose time was never measured)."""
    snapshot = job.snapshot()
    if not final and job.unchanged_since_published(snapshot):
        return snapshot
    job.published = snapshot
    await publisher.job_changed(snapshot)
    await asyncio.to_thread(store.save_job, snapshot)
    if final:
        await publisher.job_finished(snapshot)
    return snapshot


class JobWorker(Generic[Request]):
    def __init__(
        self,
        runner: JobRunner[Request],
        store: Database,
        publisher: JobPublisher,
        background: Background,
        *,
        name: str,
        limit: int,
    ) -> None:
        self.runner: JobRunner[Request] = runner
        self.store = store
        self.publisher = publisher
        self.queue: JobQueue[Request] = JobQueue(limit=limit, name=name)
        self._background = background
        self._positions = QueuePositions(self.queue, publisher, background)
        self._wakeup = asyncio.Event()
        # The running job and its cancel scope.
        self._running: tuple[Job[Request], asyncio.Task[None]] | None = None
        self._cancel_requested: set[str] = set()
        # Set when a job's final state is published: what ``finished`` waits on, and
        # what is handed the job at that moment, before the next job can start.
        self._finished: dict[str, asyncio.Event] = {}
        self._hand_offs: dict[str, list[Callable[[Job[Request]], None]]] = {}
        self._stopping = False

    @property
    def running(self) -> Job[Request] | None:
        return self.queue.running

    def active(self) -> list[Job[Request]]:
        """The running job, then the queued ones in order."""
        return ([self.queue.running] if self.queue.running else []) + self.queue.queued()

    def submit(self, job: Job[Request], *, over_limit: bool = False) -> tuple[Job[Request], bool]:
        """Queue ``job``, or join the equal one queued or running (``joined``)."""
        try:
            queued, joined = self.queue.submit(job, over_limit=over_limit)
        except QueueFullError as exc:
            raise CommandError(ErrorCode.QUEUE_FULL, str(exc)) from None
        if not joined:
            self._finished[queued.job_id] = asyncio.Event()
            self._wakeup.set()
            # A job of higher priority moves the ones behind it.
            self._positions.moved()
            # Published and saved while still queued, so a restart cannot lose it.
            # Beside the submitter: a command's reply does not wait for the publish.
            self._background.spawn(self.update(queued), name=f"announce-{queued.job_id}")
        return queued, joined

    async def cancel(self, job_id: str) -> Job[Request] | None:
        """Cancel a queued or running job; None when it is not this queue's."""
        queued = self.queue.remove(job_id)
        if queued is not None:
            queued.cancel("cancelled while queued")
            await self.update(queued, final=True)
            self._positions.moved()
            return queued
        if self._running is not None and self._running[0].job_id == job_id:
            # Undoing what the job did takes time; the reply says the cancel was
            # accepted and jobs/<id> shows it end.
            job, scope = self._running
            if job_id not in self._cancel_requested:
                self._cancel_requested.add(job_id)
                scope.cancel()
                job.message = "cancelling"
            return job
        return None

    async def update(self, job: Job[Request], *, final: bool = False) -> None:
        self._positions.published(await publish_job(job, self.store, self.publisher, final=final))
        if final:
            for hand_off in self._hand_offs.pop(job.job_id, []):
                try:
                    hand_off(job)
                except Exception:  # one waiter's mistake must not stop the worker
                    log.exception("handing off %s job %s failed", self.queue.name, job.job_id)
            finished = self._finished.pop(job.job_id, None)
            if finished is not None:
                finished.set()

    async def finished(
        self, job: Job[Request], hand_off: Callable[[Job[Request]], None] | None = None
    ) -> None:
        """Until ``job``'s final state has been published (at once if it has been).
        ``hand_off`` is called with the ended job as it is published, before the worker
        takes the next one: what a waiter claims there, no later job can take first."""
        event = self._finished.get(job.job_id)
        if event is None:
            if hand_off is not None:
                hand_off(job)
            return
        if hand_off is not None:
            self._hand_offs.setdefault(job.job_id, []).append(hand_off)
        await event.wait()

    async def run(self) -> None:
        while not self._stopping:
            job = self.queue.take()
            if job is None:
                await self._wakeup.wait()
                self._wakeup.clear()
                continue
            await self._run(job)

    def stop(self) -> None:
        """Ask the worker to end. A flag besides the cancellation, because aiomqtt's
        publish waits with wait_for, which on 3.11 can swallow one."""
        self._stopping = True
        self._wakeup.set()

    async def _run(self, job: Job[Request]) -> None:
        scope = asyncio.create_task(self.runner.run(job), name=f"{self.queue.name}-{job.job_id}")
        self._running = (job, scope)
        await self.update(job)
        self._positions.moved()
        failure: BaseException | None = None
        try:
            # A shutdown cancels this wait, and with it the scope it waits for.
            await scope
        except asyncio.CancelledError as cancelled:
            if self._shutting_down() or not scope.cancelled():
                raise
            failure = cancelled
            if job.job_id in self._cancel_requested:
                job.cancel(self.runner.cancelled_message)
            else:  # cancelled by something it awaited, not by a command
                log.error("%s job %s was cancelled from within", self.queue.name, job.job_id)
                job.fail(ErrorCode.INTERNAL, "the job was cancelled from within; see the log")
        except JobFailure as failed:
            failure = failed
            job.fail(failed.code, failed.message, failed.details)
        except Exception as unexpected:  # one broken job must not stop the worker
            log.exception("%s job %s failed unexpectedly", self.queue.name, job.job_id)
            failure = unexpected
            job.fail(ErrorCode.INTERNAL, f"the agent failed while running the job: {unexpected}")
        if not job.finished:  # a runner must say how its job ended; this one did not
            log.error("%s job %s ended without a result", self.queue.name, job.job_id)
            job.fail(ErrorCode.INTERNAL, "the job ended without a result; see the log")
        try:
            if failure is not None:
                await self._guarded(self.runner.recover(job, failure), job, "undoing")
            if job.state == JobStatus.FAILED and job.error is not None:
                await self._failed(job)
            await self._guarded(self.runner.settled(job), job, "settling")
        finally:
            self._running = None
            self._cancel_requested.discard(job.job_id)
            self.queue.done(job)
        await self.update(job, final=True)

    async def _guarded(
        self, step: Coroutine[Any, Any, None], job: Job[Request], doing: str
    ) -> None:
        """A step after the work: its failure is logged, and the worker goes on."""
        try:
            await step
        except Exception:
            log.exception("%s %s job %s failed", doing, self.queue.name, job.job_id)

    async def _failed(self, job: Job[Request]) -> None:
        assert job.error is not None
        await self.publisher.event(
            Event(
                event_type=EventType.JOB_FAILED,
                severity=Severity.ERROR,
                message=f"{self.runner.describe(job)} failed: {job.error.message}",
                model=job.request.subject,
                job_id=job.job_id,
            )
        )

    @staticmethod
    def _shutting_down() -> bool:
        current = asyncio.current_task()
        return current is not None and current.cancelling() > 0
