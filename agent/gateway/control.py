"""The control API's read side, pure: the host as its bus ``status`` reply tells it, and the
first orchestrator's ``GET /models/status`` in the shape its scripts read
(``../shared/HTTP-COMPAT.md``): totals over the GPUs and ``loaded_models``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from shared.messages import HostState, JobState
from shared.replies import HostStatus


@dataclass(frozen=True)
class HostView:
    """What the HTTP server reads of the agent."""

    status: Callable[[], HostStatus]  # what the bus's status command answers
    state: Callable[[], HostState | None]  # its totals alone (P/H/state), cheaper to read
    job: Callable[[str], Awaitable[JobState | None]]  # retained, else from the history


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
