"""What the operator's keys mean, as plain data: the plan shown before a switch, the
reason an unload needs force, and the sentence a reply becomes. Pure: no Textual, no MQTT."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import ValidationError

from shared.commands import describe_validation_error
from shared.messages import JobState, JobStatus, ModelLifecycle, ModelState, Reply
from shared.replies import (
    PLAN_RESULT,
    CatalogChanged,
    HostStatus,
    JobAccepted,
    LoadHistory,
    LogLines,
    PlanRefused,
    Uninstalled,
)
from tui.format import gib

_BUSY_STATES = frozenset({ModelLifecycle.LOADING, ModelLifecycle.UNLOADING})
_ACTIVE_JOBS = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})


@dataclass(frozen=True, slots=True)
class PlanSummary:
    """A ``plan`` reply, ready to show before a switch is confirmed."""

    model: str
    fits: bool
    already_loaded: bool
    evict: tuple[str, ...]
    freed_mb: int
    free_after_mb: int | None
    message: str

    @property
    def needs_confirmation(self) -> bool:
        """Only a switch that stops something is worth a question."""
        return self.fits and bool(self.evict)


def summarize_plan(model: str, data: Mapping[str, Any] | None) -> PlanSummary:
    """A plan reply's ``data`` as the operator reads it; a reply that is not a plan (an
    agent of another protocol version) is told as such, not guessed at."""
    try:
        plan = PLAN_RESULT.validate_python(data)
    except ValidationError as exc:
        unreadable = (
            f"could not read the agent's plan for {model}: {describe_validation_error(exc)}"
        )
        return PlanSummary(model, False, False, (), 0, None, unreadable)
    if isinstance(plan, PlanRefused):
        return PlanSummary(model, False, False, (), 0, None, plan.message)
    freed = sum(plan.freed_mb.values())
    after = sum(plan.free_after_mb.values()) if plan.free_after_mb else None
    evict = tuple(plan.evict)
    if plan.already_loaded:
        message = f"{model} is already loaded; nothing to do."
    elif evict:
        stopped = [name for name in evict if name not in plan.sleep]
        what = " and ".join(
            part
            for part in (
                f"stops {', '.join(stopped)}" if stopped else "",
                f"puts {', '.join(plan.sleep)} to sleep" if plan.sleep else "",
            )
            if part
        )
        message = f"Switching to {model} {what}, freeing {gib(freed)}" + (
            f"; {gib(after)} free afterwards." if after is not None else "."
        )
    else:
        message = f"{model} fits next to what runs; nothing is stopped."
    return PlanSummary(model, True, plan.already_loaded, evict, freed, after, message)


def force_reason(model: ModelState, jobs: Iterable[JobState]) -> str | None:
    """Why unloading ``model`` needs ``force: true`` and a confirmation; None when it does not."""
    if model.pinned:
        return f"{model.name} is pinned"
    if model.state in _BUSY_STATES:
        return f"{model.name} is {model.state.value}"
    for job in jobs:
        if job.model == model.name and job.state in _ACTIVE_JOBS:
            return f"{model.name} has a {job.state.value} {job.command} job"
    return None


def describe_reply(reply: Reply[Any]) -> tuple[bool, str]:
    """(ok, sentence) for a notification: an error says what was wrong."""
    if reply.status == "error":
        error = reply.error
        if error is None:
            return False, f"{reply.command} failed"
        return False, f"{reply.command} refused ({error.code.value}): {error.message}"
    if reply.job_id is not None:
        try:
            accepted = JobAccepted.model_validate(reply.data)
        except ValidationError:  # a wait reply: the job as it ended
            return True, f"{reply.command} job {reply.job_id} done"
        joined = " (joined the same request)" if accepted.joined else ""
        position = accepted.queue_position
        where = f", queue position {position}" if position is not None else ""
        return True, f"{reply.command} accepted as job {reply.job_id}{joined}{where}"
    if reply.command == "status":
        return True, _describe_status(reply.data)
    if reply.command == "uninstall":
        try:
            gone = Uninstalled.model_validate(reply.data)
        except ValidationError:
            return True, "uninstall: ok"
        return True, f"uninstalled {gone.name} ({gone.was}): {gib(gone.freed_mb)} freed"
    if reply.command == "catalog":
        try:
            changed = CatalogChanged.model_validate(reply.data)
        except ValidationError:
            return True, "catalog: ok"
        return True, "catalog: " + ("; ".join(changed.changes) or f"{changed.name} unchanged")
    return True, f"{reply.command}: ok"


_Data = TypeVar("_Data", LogLines, LoadHistory)


def reply_data(reply: Reply[Any] | None, model: type[_Data]) -> _Data | str:
    """A ``logs`` or ``history`` reply's data, or the sentence that says why there is none
    (no connection, an error reply, data of another shape)."""
    if reply is None:
        return "not connected to a broker"
    if reply.status == "error":
        return describe_reply(reply)[1]
    try:
        return model.model_validate(reply.data)
    except ValidationError as exc:
        return f"could not read the agent's {reply.command} reply: {describe_validation_error(exc)}"


def _describe_status(data: Any) -> str:
    """The agent answered: what it is and what it runs, in a line."""
    try:
        status = HostStatus.model_validate(data)
    except ValidationError:
        return "status: the agent answered"
    info = status.info
    ready = sum(1 for m in status.models if m.state == ModelLifecycle.READY)
    active = sum(1 for j in status.jobs if j.finished_at is None)
    return (
        f"agent {info.agent_version} (protocol {info.protocol_version}, {info.gpu_backend}) "
        f"answers: {len(info.gpus)} GPU(s), {ready}/{len(status.models)} models ready, "
        f"{active} job(s) active"
    )


def job_to_cancel(
    jobs: Mapping[str, JobState], selected: str | None, *, table_focused: bool
) -> JobState | None:
    """What ``c`` cancels: the job selected in the jobs table when it has focus, else the
    host's running job (else the first queued one); None when nothing is active."""
    if table_focused:
        job = jobs.get(selected) if selected else None
        return job if job is not None and job.finished_at is None else None
    active = [job for job in jobs.values() if job.finished_at is None]
    running = [job for job in active if job.state == JobStatus.RUNNING]
    queued = sorted(
        (job for job in active if job.state == JobStatus.QUEUED),
        key=lambda job: job.queue_position if job.queue_position is not None else 1 << 30,
    )
    candidates = running or queued
    return candidates[0] if candidates else None


def describe_cancel(job: JobState) -> str:
    """The confirmation's question: which job, doing what."""
    target = job.model or job.repo or "?"
    doing = f"{job.state.value}, {job.phase.value}"
    if job.progress:
        doing += f", {job.progress:.0%}"
    return f"Cancel {job.command.value} {target} (job {job.job_id}, {doing})?"
