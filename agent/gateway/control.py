"""The control API's read side, pure: the host as its bus ``status`` reply tells it, and the
first orchestrator's ``GET /models/status`` in the shape its scripts read
(``../shared/HTTP-COMPAT.md``): totals over the GPUs and ``loaded_models``."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from agent.event_feed import EventFeed, FeedMessage
from agent.gateway import errors
from agent.intake import Intake
from shared.messages import HostState, JobState, Reply, WeightsState
from shared.replies import HostStatus


@dataclass(frozen=True)
class HostView:
    """What the HTTP server reads of the agent, and how it commands it."""

    host_id: str
    status: Callable[[], HostStatus]  # what the bus's status command answers
    state: Callable[[], HostState | None]  # its totals alone (P/H/state), cheaper to read
    job: Callable[[str], Awaitable[JobState | None]]  # retained, else from the history
    history: Callable[[int], Awaitable[list[JobState]]]  # the newest n jobs, newest first
    call: Callable[[Intake], Awaitable[Reply[Any]]]  # a command, as the bus runs it
    events: EventFeed  # what the agent publishes, as it does


async def job_or_404(view: HostView, job_id: str) -> JobState:
    """A job the bus retains or the history remembers; else a 404."""
    job = await view.job(job_id)
    if job is None:
        raise errors.not_found(f"job {job_id[:64]!r}")
    return job


def weights_or_busy(view: HostView) -> WeightsState:
    """The weights as ``P/H/weights`` says; a 503 before the agent's first read of them."""
    weights = view.status().weights
    if weights is None:
        raise errors.busy("the agent has not read its weights directory yet")
    return weights


def sse_message(event: str, data: bytes, *, event_id: int | None = None) -> bytes:
    """One server-sent event: ``event:``, ``id:``, and ``data:`` lines (one per line of
    ``data``, which the bus's compact JSON never splits)."""
    head = f"event: {event}\n" + (f"id: {event_id}\n" if event_id is not None else "")
    lines = b"".join(b"data: " + line + b"\n" for line in data.split(b"\n"))
    return head.encode() + lines + b"\n"


def sse_data(item: FeedMessage) -> bytes:
    """A published message's payload as JSON: ``status``'s bare ``online``/``offline`` a
    string, a cleared retained topic (an empty payload) ``null``."""
    if not item.payload:
        return b"null"
    if item.name == "status":
        return json.dumps(item.payload.decode("utf-8", "replace")).encode()
    return item.payload


def models_status(state: HostState | None) -> dict[str, Any]:
    """``GET /models/status``: ``total_mb``, ``used_mb``, ``free_mb``,
    ``utilization_percent`` and ``loaded_models`` ({name: {model, service, loaded_at,
    status}}), before the first GPU sample all zero and empty."""
    if state is None:
        return {
            "total_mb": 0,
            "used_mb": 0,
            "free_mb": 0,
            "utilization_percent": None,
            "loaded_models": {},
        }
    return state.model_dump(
        mode="json",
        include={"total_mb", "used_mb", "free_mb", "utilization_percent", "loaded_models"},
    )
