"""Jobs are republished only when something in them changed; queued jobs only when
their place changed, once per burst."""

from __future__ import annotations

from pathlib import Path

from agent.background import Background
from agent.database import Database
from agent.job_worker import QueuePositions, publish_job
from agent.jobs import Job, JobQueue, SwapRequest
from shared.messages import Event, JobPhase, JobState


async def settle(positions: QueuePositions) -> None:
    """Until the gathered changes are published (the pending publish has run)."""
    pending = positions._publish._task
    if pending is not None:
        await pending


class Recorder:
    def __init__(self) -> None:
        self.published: list[tuple[str, int | None]] = []
        self.states: list[JobState] = []

    async def job_changed(self, job: JobState) -> None:
        self.published.append((job.model or "", job.queue_position))
        self.states.append(job)

    async def job_finished(self, job: JobState) -> None:
        pass

    async def event(self, event: Event) -> None:
        pass


async def test_a_burst_of_starts_republishes_each_moved_job_once(background: Background) -> None:
    queue = JobQueue(limit=50)
    recorder = Recorder()
    positions = QueuePositions(queue, recorder, background, coalesce_s=0.01)
    for n in range(10):
        job, _ = queue.submit(Job(SwapRequest("load", f"m{n}")))
        positions.published(job.snapshot())  # each announced with its place
    # Five jobs start back to back: every queued job moves five places, once.
    for _ in range(5):
        started = queue.take()
        assert started is not None
        positions.published(started.snapshot())
        queue.done(started)
        positions.moved()
    await settle(positions)
    assert recorder.published == [(f"m{n}", n - 4) for n in range(5, 10)]
    # Nothing moved: nothing is published.
    positions.moved()
    await settle(positions)
    assert len(recorder.published) == 5


async def test_only_the_jobs_behind_a_change_are_republished(background: Background) -> None:
    queue = JobQueue(limit=50)
    recorder = Recorder()
    positions = QueuePositions(queue, recorder, background, coalesce_s=0.01)
    jobs = [queue.submit(Job(SwapRequest("load", f"m{n}")))[0] for n in range(4)]
    for job in jobs:
        positions.published(job.snapshot())
    # A job of higher priority goes to the front; an unannounced job is left to its
    # own announcement.
    urgent, _ = queue.submit(Job(SwapRequest("load", "urgent"), priority=10))
    positions.moved()
    await settle(positions)
    assert recorder.published == [("m0", 2), ("m1", 3), ("m2", 4), ("m3", 5)]
    recorder.published.clear()
    positions.published(urgent.snapshot())
    # The last job leaves: nobody else moved.
    queue.remove(jobs[3].job_id)
    positions.moved()
    await settle(positions)
    assert recorder.published == []


async def test_a_progress_tick_that_changed_nothing_is_not_published(tmp_path: Path) -> None:
    recorder = Recorder()
    store = Database.open(tmp_path / "state.db")
    job = Job(SwapRequest("load", "m"))
    job.start()
    await publish_job(job, store, recorder)
    # A load of a model whose load time was never measured: its progress stays put.
    for _ in range(3):
        job.advance(JobPhase.LOADING, 0.2)
        await publish_job(job, store, recorder)
    job.advance(JobPhase.LOADING, 0.5)
    await publish_job(job, store, recorder)
    # The end is always published, even when it repeats the state before it.
    job.succeed()
    await publish_job(job, store, recorder, final=True)
    await publish_job(job, store, recorder, final=True)
    phases = [(state.phase, state.progress) for state in recorder.states]
    assert phases == [
        (JobPhase.QUEUED, 0.0),
        (JobPhase.LOADING, 0.2),
        (JobPhase.LOADING, 0.5),
        (JobPhase.DONE, 1.0),
        (JobPhase.DONE, 1.0),
    ]
    store.close()
