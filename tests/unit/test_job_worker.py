"""The job worker both queues share: a cancel ends only the job's own scope, what it
left is undone outside that scope, a shutdown undoes nothing, and no failure stops the
worker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.background import Background
from agent.database import Database
from agent.job_worker import JobWorker
from agent.jobs import Job, JobFailure, SwapRequest
from shared.messages import ErrorCode, Event, JobState, JobStatus


class Recorder:
    def __init__(self) -> None:
        self.finished: list[JobState] = []
        self.events: list[Event] = []
        self.ended = asyncio.Event()

    async def job_changed(self, job: JobState) -> None:
        pass

    async def job_finished(self, job: JobState) -> None:
        self.finished.append(job)
        self.ended.set()

    async def event(self, event: Event) -> None:
        self.events.append(event)


class Runner:
    """Runs until released; ``fail`` raises instead. Records what recover saw."""

    cancelled_message = "cancelled while running"

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.in_recover = asyncio.Event()
        self.finish_recover = asyncio.Event()
        self.recovered: list[tuple[str, str, int]] = []
        self.settled_jobs: list[str] = []
        self.fail: BaseException | None = None
        self.started_jobs: list[str] = []

    async def run(self, job: Job[SwapRequest]) -> None:
        self.started_jobs.append(job.job_id)
        self.started.set()
        if self.fail is not None:
            raise self.fail
        await self.release.wait()
        job.succeed(None, "done")

    async def recover(self, job: Job[SwapRequest], failure: BaseException) -> None:
        self.in_recover.set()
        # Undoing takes time, and a timeout inside it must work as a timeout: the
        # task running it was never cancelled.
        task = asyncio.current_task()
        assert task is not None
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.001):
                await asyncio.sleep(1)
        await self.finish_recover.wait()
        self.recovered.append((job.job_id, type(failure).__name__, task.cancelling()))

    async def settled(self, job: Job[SwapRequest]) -> None:
        self.settled_jobs.append(job.job_id)

    def describe(self, job: Job[SwapRequest]) -> str:
        return f"{job.request.command} {job.request.model}"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database.open(tmp_path / "state.db")
    yield database
    database.close()


def load(model: str) -> Job[SwapRequest]:
    return Job(SwapRequest("load", model))


async def test_a_cancel_ends_the_scope_and_recovery_runs_uncancelled(
    store: Database, background: Background
) -> None:
    runner, recorder = Runner(), Recorder()
    worker = JobWorker(runner, store, recorder, background, name="swap", limit=4)
    running = asyncio.create_task(worker.run())
    job, _ = worker.submit(load("a"))
    await runner.started.wait()
    cancelled = await worker.cancel(job.job_id)
    assert cancelled is job and job.message == "cancelling"
    await runner.in_recover.wait()
    # A second cancel while undoing neither cuts the undoing short nor starts it again.
    assert await worker.cancel(job.job_id) is job
    runner.finish_recover.set()
    await recorder.ended.wait()
    assert runner.recovered == [(job.job_id, "CancelledError", 0)]
    assert [(s.job_id, s.state, s.message) for s in recorder.finished] == [
        (job.job_id, JobStatus.CANCELLED, "cancelled while running")
    ]
    assert runner.settled_jobs == [job.job_id]
    assert worker.running is None
    worker.stop()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running


async def test_failures_fail_the_job_not_the_worker(
    store: Database, background: Background
) -> None:
    runner, recorder = Runner(), Recorder()
    worker = JobWorker(runner, store, recorder, background, name="swap", limit=4)
    running = asyncio.create_task(worker.run())
    runner.finish_recover.set()
    runner.fail = JobFailure(ErrorCode.LOAD_FAILED, "it exited")
    first, _ = worker.submit(load("a"))
    await recorder.ended.wait()
    recorder.ended.clear()
    runner.fail = RuntimeError("a bug")
    second, _ = worker.submit(load("b"))
    await recorder.ended.wait()
    recorder.ended.clear()
    # The worker goes on: the next job runs and succeeds.
    runner.fail = None
    runner.release.set()
    third, _ = worker.submit(load("c"))
    await recorder.ended.wait()
    outcomes = [(s.job_id, s.state, s.error.code if s.error else None) for s in recorder.finished]
    assert outcomes == [
        (first.job_id, JobStatus.FAILED, ErrorCode.LOAD_FAILED),
        (second.job_id, JobStatus.FAILED, ErrorCode.INTERNAL),
        (third.job_id, JobStatus.SUCCEEDED, None),
    ]
    assert [name for _, name, _ in runner.recovered] == ["JobFailure", "RuntimeError"]
    assert [event.message for event in recorder.events] == [
        "load a failed: it exited",
        "load b failed: the agent failed while running the job: a bug",
    ]
    worker.stop()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running


async def test_a_shutdown_ends_the_running_job_and_undoes_nothing(
    store: Database, background: Background
) -> None:
    runner, recorder = Runner(), Recorder()
    worker = JobWorker(runner, store, recorder, background, name="swap", limit=4)
    running = asyncio.create_task(worker.run())
    job, _ = worker.submit(load("a"))
    await runner.started.wait()
    worker.stop()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    # The next agent finds it interrupted (saved as running); nothing was undone.
    assert runner.recovered == [] and recorder.finished == []
    assert job.state == JobStatus.RUNNING


class BrokenUndo(Runner):
    async def recover(self, job: Job[SwapRequest], failure: BaseException) -> None:
        raise RuntimeError("a bug while undoing")


async def test_a_failure_while_undoing_does_not_stop_the_worker(
    store: Database, background: Background
) -> None:
    runner, recorder = BrokenUndo(), Recorder()
    worker = JobWorker(runner, store, recorder, background, name="swap", limit=4)
    running = asyncio.create_task(worker.run())
    runner.fail = JobFailure(ErrorCode.LOAD_FAILED, "it exited")
    first, _ = worker.submit(load("a"))
    await recorder.ended.wait()
    recorder.ended.clear()
    runner.fail = None
    runner.release.set()
    second, _ = worker.submit(load("b"))
    await recorder.ended.wait()
    assert [(s.job_id, s.state) for s in recorder.finished] == [
        (first.job_id, JobStatus.FAILED),
        (second.job_id, JobStatus.SUCCEEDED),
    ]
    worker.stop()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running


async def test_a_hand_off_sees_its_job_end_before_the_next_job_starts(
    store: Database, background: Background
) -> None:
    """What a waiter claims when its job ends (the gateway: a slot on the model just
    loaded), no job queued behind it can take first; a job already ended hands off at once."""
    runner, recorder = Runner(), Recorder()
    worker = JobWorker(runner, store, recorder, background, name="swap", limit=4)
    running = asyncio.create_task(worker.run())
    first, _ = worker.submit(load("a"))
    second, _ = worker.submit(load("b"))
    seen: list[tuple[str, JobStatus, bool]] = []

    def hand_off(job: Job[SwapRequest]) -> None:
        seen.append((job.job_id, job.state, runner.started_jobs.count(second.job_id) > 0))

    await runner.started.wait()
    runner.release.set()
    await worker.finished(first, hand_off)
    assert seen == [(first.job_id, JobStatus.SUCCEEDED, False)]
    await worker.finished(second)
    await worker.finished(first, hand_off)
    assert seen[-1] == (first.job_id, JobStatus.SUCCEEDED, True)
    worker.stop()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
