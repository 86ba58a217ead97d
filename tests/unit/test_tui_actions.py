"""The TUI's pure decisions: plan summaries, when an unload needs force, reply sentences."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from shared.messages import (
    ErrorCode,
    ErrorInfo,
    JobPhase,
    JobState,
    JobStatus,
    ModelLifecycle,
    ModelState,
    Reply,
)
from shared.replies import PlanFits, PlanRefused
from tui.actions import (
    describe_cancel,
    describe_reply,
    force_reason,
    job_to_cancel,
    summarize_plan,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def model(name: str = "m", **fields: object) -> ModelState:
    values: dict[str, object] = {"name": name, "runtime": "process", "state": "ready", "ts": T0}
    values.update(fields)
    return ModelState.model_validate(values)


def job(state: JobStatus, model_name: str = "m", command: str = "load") -> JobState:
    return JobState(
        job_id="j1",
        command=command,
        model=model_name,
        state=state,
        phase=JobPhase.LOADING,
        created_at=T0,
        ts=T0,
    )


def test_plan_with_evictions_names_them_and_the_memory_freed() -> None:
    data = {
        "model": "wan2.1-14b",
        "fits": True,
        "already_loaded": False,
        "gpus": [0],
        "evict": ["qwen3-vl-30b"],
        "required_mb": 24576,
        "free_before_mb": {"0": 9169},
        "freed_mb": {"0": 17236},
        "free_after_mb": {"0": 1829},
    }
    summary = summarize_plan("wan2.1-14b", data)
    assert summary.fits and summary.needs_confirmation
    assert summary.evict == ("qwen3-vl-30b",)
    assert summary.freed_mb == 17236
    assert summary.message == (
        "Switching to wan2.1-14b stops qwen3-vl-30b, freeing 16.8G; 1.8G free afterwards."
    )


@pytest.mark.parametrize(
    ("sleep", "expected"),
    [
        (["a", "b"], "Switching to m puts a, b to sleep, freeing 2.0G; 3.0G free afterwards."),
        (["b"], "Switching to m stops a and puts b to sleep, freeing 2.0G; 3.0G free afterwards."),
    ],
)
def test_plan_summary_says_which_evicted_models_sleep(sleep: list[str], expected: str) -> None:
    data = fits(evict=["a", "b"], sleep=sleep, freed_mb={"0": 2048})
    assert summarize_plan("m", data).message == expected


def test_plan_that_does_not_fit_carries_the_agents_sentence() -> None:
    data = PlanRefused(
        model="big",
        code=ErrorCode.INSUFFICIENT_VRAM,
        message="needs 40 GiB, GPU 0 has 32 GiB",
        required_mb=40960,
        available_mb=32768,
        evictable_mb=0,
        gpus=[0],
    ).model_dump(mode="json")
    summary = summarize_plan("big", data)
    assert not summary.fits and not summary.needs_confirmation
    assert summary.message == "needs 40 GiB, GPU 0 has 32 GiB"


def fits(**fields: object) -> dict[str, object]:
    plan = PlanFits.model_validate(
        {
            "model": "m",
            "already_loaded": False,
            "gpus": [0],
            "evict": [],
            "required_mb": 1024,
            "free_before_mb": {"0": 4096},
            "freed_mb": {"0": 0},
            "free_after_mb": {"0": 3072},
            **fields,
        }
    )
    return plan.model_dump(mode="json")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (fits(already_loaded=True), "m is already loaded; nothing to do."),
        (fits(), "m fits next to what runs; nothing is stopped."),
    ],
)
def test_plan_summary_of_a_plan_that_stops_nothing(data: dict[str, object], expected: str) -> None:
    assert summarize_plan("m", data).message == expected


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (None, "field 'payload'"),
        ({"fits": True, "evict": []}, "missing field"),
        ({**fits(), "evict": "oops"}, "evict"),
    ],
)
def test_a_reply_that_is_not_a_plan_is_told_not_guessed(
    data: dict[str, object] | None, problem: str
) -> None:
    """An agent of another version: the operator is told the plan could not be read,
    and nothing is offered for confirmation."""
    summary = summarize_plan("m", data)
    assert not summary.fits and not summary.needs_confirmation
    assert summary.message.startswith("could not read the agent's plan for m: ")
    assert problem in summary.message


def test_force_reason_for_pinned_busy_and_job_bound_models() -> None:
    assert force_reason(model(pinned=True), []) == "m is pinned"
    assert force_reason(model(state=ModelLifecycle.LOADING), []) == "m is loading"
    assert force_reason(model(), [job(JobStatus.RUNNING)]) == "m has a running load job"
    assert force_reason(model(), [job(JobStatus.SUCCEEDED)]) is None
    assert force_reason(model(), [job(JobStatus.QUEUED, model_name="other")]) is None
    assert force_reason(model(state=ModelLifecycle.READY), []) is None


def test_error_reply_says_code_and_message() -> None:
    reply = Reply(
        request_id="r",
        command="install",
        status="error",
        error=ErrorInfo(code=ErrorCode.INVALID_PAYLOAD, message="repo ids may not contain '--'"),
    )
    assert describe_reply(reply) == (
        False,
        "install refused (invalid_payload): repo ids may not contain '--'",
    )


def test_job_reply_says_job_and_queue_position() -> None:
    reply = Reply(
        request_id="r",
        command="switch",
        status="ok",
        job_id="abc",
        data={"state": "queued", "joined": True, "queue_position": 2},
    )
    assert describe_reply(reply) == (
        True,
        "switch accepted as job abc (joined the same request), queue position 2",
    )
    plain = Reply(request_id="r", command="plan", status="ok", data={})
    assert describe_reply(plain) == (True, "plan: ok")
    # status and uninstall say what they found; a shape they cannot read, that they answered.
    garbled = Reply(request_id="r", command="status", status="ok", data={})
    assert describe_reply(garbled) == (True, "status: the agent answered")
    gone = Reply(
        request_id="r",
        command="uninstall",
        status="ok",
        data={"name": "qwen", "was": "installed", "freed_mb": 2048},
    )
    assert describe_reply(gone) == (True, "uninstalled qwen (installed): 2.0G freed")


def test_c_cancels_the_running_job_unless_the_jobs_table_picks_one() -> None:
    def one(job_id: str, state: JobStatus, **fields: object) -> JobState:
        return job(state).model_copy(update={"job_id": job_id, **fields})

    done = one("done", JobStatus.SUCCEEDED, finished_at=T0)
    later = one("later", JobStatus.QUEUED, queue_position=2)
    first = one("first", JobStatus.QUEUED, queue_position=1)
    running = one("run", JobStatus.RUNNING, progress=0.4)
    jobs = {j.job_id: j for j in (done, later, first, running)}
    assert job_to_cancel(jobs, "done", table_focused=False) == running  # not the selection
    assert job_to_cancel(jobs, "later", table_focused=True) == later
    assert job_to_cancel(jobs, "done", table_focused=True) is None  # finished: nothing
    assert job_to_cancel(jobs, None, table_focused=True) is None
    queued_only = {j.job_id: j for j in (done, later, first)}
    assert job_to_cancel(queued_only, None, table_focused=False) == first
    assert job_to_cancel({"done": done}, None, table_focused=False) is None
    assert describe_cancel(running) == "Cancel load m (job run, running, loading, 40%)?"
