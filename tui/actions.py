"""What the operator's keys mean, as plain data: the plan shown before a switch, the
reason an unload needs force, and the sentence a reply becomes. Pure: no Textual, no MQTT."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from shared.messages import JobState, JobStatus, ModelLifecycle, ModelState, Reply
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


def _mb_sum(values: Any) -> int:
    if not isinstance(values, Mapping):
        return 0
    return sum(v for v in values.values() if isinstance(v, int))


def summarize_plan(model: str, data: Mapping[str, Any] | None) -> PlanSummary:
    """Read a plan reply's ``data`` defensively: an agent of another version may
    leave fields out, and the operator must still get a sentence."""
    data = data or {}
    fits = data.get("fits") is True
    listed = data.get("evict")
    names = listed if isinstance(listed, list) else []
    evict = tuple(name for name in names if isinstance(name, str))
    freed = _mb_sum(data.get("freed_mb"))
    free_after = data.get("free_after_mb")
    after = _mb_sum(free_after) if isinstance(free_after, Mapping) else None
    already = data.get("already_loaded") is True
    if not fits:
        message = str(data.get("message") or f"{model} does not fit")
    elif already:
        message = f"{model} is already loaded; nothing to do."
    elif evict:
        message = f"Switching to {model} stops {', '.join(evict)}, freeing {gib(freed)}" + (
            f"; {gib(after)} free afterwards." if after is not None else "."
        )
    else:
        message = f"{model} fits next to what runs; nothing is stopped."
    return PlanSummary(model, fits, already, evict, freed, after, message)


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


def describe_reply(reply: Reply) -> tuple[bool, str]:
    """(ok, sentence) for a notification: an error says what was wrong."""
    if reply.status == "error":
        error = reply.error
        if error is None:
            return False, f"{reply.command} failed"
        return False, f"{reply.command} refused ({error.code.value}): {error.message}"
    if reply.job_id is not None:
        data = reply.data or {}
        position = data.get("queue_position")
        joined = " (joined the same request)" if data.get("joined") is True else ""
        where = f", queue position {position}" if isinstance(position, int) else ""
        return True, f"{reply.command} accepted as job {reply.job_id}{joined}{where}"
    return True, f"{reply.command}: ok"
