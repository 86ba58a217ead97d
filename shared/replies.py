"""What each command answers in ``Reply.data``: one model per shape, built by the agent
and read by every client through the same model (never by hand)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter

from shared.messages import (
    ErrorCode,
    GpuState,
    HostInfo,
    HostState,
    JobRef,
    JobState,
    JobStatus,
    ModelState,
    Published,
    WeightsState,
)
from shared.topics import CommandName


class JobAccepted(Published):
    """A job command without ``wait``: answered at once."""

    state: JobStatus = Field(description="queued, or running when it joined a running job")
    joined: bool = Field(description="an equal job was queued or running: this is that job")
    queue_position: int | None = None


class JobOutcome(Published):
    """A ``wait`` reply, and a cancel's: the job as it ended (or, for ``cancel`` with
    ``wait: false``, as it is)."""

    job: JobState


class JobsQueued(Published):
    """``unload`` with ``all: true``: one job per loaded model."""

    jobs: list[JobRef]


class PlanFits(Published):
    model: str
    fits: Literal[True] = True
    already_loaded: bool
    gpus: list[int]
    evict: list[str] = Field(description="in the order a switch would stop them")
    required_mb: int
    # Keyed by GPU index as a string (JSON object keys).
    free_before_mb: dict[str, int]
    freed_mb: dict[str, int]
    free_after_mb: dict[str, int]


class PlanRefused(Published):
    model: str
    fits: Literal[False] = False
    code: ErrorCode
    message: str
    required_mb: int
    available_mb: int
    evictable_mb: int
    gpus: list[int] = Field(description="the placement that came closest")


PlanResult = Annotated[PlanFits | PlanRefused, Field(discriminator="fits")]
PLAN_RESULT: TypeAdapter[PlanFits | PlanRefused] = TypeAdapter(PlanResult)


class HostStatus(Published):
    """``status``: what the host's retained topics hold, in one message."""

    info: HostInfo
    state: HostState | None = None
    gpus: list[GpuState] = Field(default_factory=list)
    models: list[ModelState] = Field(default_factory=list)
    jobs: list[JobState] = Field(
        default_factory=list, description="every queued or running job, then the 20 latest"
    )
    weights: WeightsState | None = None


class Uninstalled(Published):
    name: str
    was: Literal["installed", "partial"]
    freed_mb: int


# The ``data`` of each command's ``ok`` reply (job commands: JobAccepted, or with ``wait``
# JobOutcome; an error reply's ``data`` is JobOutcome when it names a job, else null).
REPLY_DATA: dict[CommandName, Any] = {
    CommandName.STATUS: HostStatus,
    CommandName.LOAD: JobAccepted | JobOutcome,
    CommandName.UNLOAD: JobAccepted | JobOutcome | JobsQueued,
    CommandName.SWITCH: JobAccepted | JobOutcome,
    CommandName.INSTALL: JobAccepted | JobOutcome,
    CommandName.PLAN: PlanResult,
    CommandName.CANCEL: JobOutcome,
    CommandName.UNINSTALL: Uninstalled,
}
