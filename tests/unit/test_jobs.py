from __future__ import annotations

import pytest

from agent.jobs import Job, JobQueue, QueueFullError, SwapRequest
from shared.messages import ErrorCode, JobPhase, JobStatus


def job(model: str, command: str = "switch", priority: int = 0) -> Job:
    return Job(SwapRequest(command, model), priority=priority)


def test_priority_then_arrival() -> None:
    queue = JobQueue(limit=10)
    for j in (job("a"), job("b", priority=5), job("c"), job("d", priority=5)):
        queue.submit(j)
    assert [j.request.model for j in queue.queued()] == ["b", "d", "a", "c"]
    assert [j.queue_position for j in queue.queued()] == [1, 2, 3, 4]
    first = queue.take()
    assert first is not None and first.request.model == "b"
    assert first.state == JobStatus.RUNNING and first.queue_position is None
    assert queue.take() is None  # one at a time: the swap lock
    queue.done(first)
    nxt = queue.take()
    assert nxt is not None and nxt.request.model == "d"


def test_equal_requests_join_queued_and_running_jobs() -> None:
    queue = JobQueue(limit=10)
    original, joined = queue.submit(job("a"))
    assert not joined
    same, joined = queue.submit(job("a"))
    assert joined and same is original
    other, joined = queue.submit(Job(SwapRequest("switch", "a", exclusive=True)))
    assert not joined and other is not original
    running = queue.take()
    assert running is original
    again, joined = queue.submit(job("a"))
    assert joined and again is running
    queue.done(running)
    running.succeed()
    fresh, joined = queue.submit(job("a"))
    assert not joined and fresh is not running


def test_the_queue_is_bounded() -> None:
    queue = JobQueue(limit=2)
    queue.submit(job("a"))
    queue.submit(job("b"))
    with pytest.raises(QueueFullError, match="full"):
        queue.submit(job("c"))
    assert queue.submit(job("a"))[1]  # joining needs no room


def test_remove_renumbers() -> None:
    queue = JobQueue(limit=5)
    a, _ = queue.submit(job("a"))
    b, _ = queue.submit(job("b"))
    assert queue.remove(a.job_id) is a
    assert queue.remove(a.job_id) is None
    assert b.queue_position == 1
    assert queue.find(b.job_id) is b


def test_job_lifecycle_and_snapshot() -> None:
    j = job("a", command="load")
    j.start()
    j.advance(JobPhase.LOADING, 0.5, "loading")
    j.advance(JobPhase.LOADING, 0.2)  # progress never goes back
    assert j.progress == 0.5
    j.add_time("stop_s", 0.25)
    j.add_time("stop_s", 0.5)
    assert j.timings == {"stop_s": 0.75}
    j.fail(ErrorCode.LOAD_FAILED, "boom")
    state = j.snapshot()
    assert (state.state, state.phase, state.command, state.model) == ("failed", "done", "load", "a")
    assert state.error is not None and state.error.code == "load_failed"
    assert state.finished_at is not None and j.finished
