"""What each command answers in ``Reply.data``: one model per shape, built by the agent
and read by every client through the same model (never by hand)."""

from __future__ import annotations

from datetime import datetime
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
    sleep: list[str] = Field(
        default_factory=list, description="of evict, those a switch would put to sleep"
    )
    stop_sleeping: list[str] = Field(
        default_factory=list,
        description="sleeping models it would stop for the host RAM the new sleepers need",
    )


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


# A logs reply cuts longer lines there, and says so at the end of each line it cut.
LOG_LINE_MAX_BYTES = 8192
LOG_LINE_CUT = f" [line cut at {LOG_LINE_MAX_BYTES} bytes]"


class LogLines(Published):
    """``logs``: a model server's output, oldest line first. Follow it by passing
    ``cursor`` back as ``since``."""

    model: str
    lines: list[str] = Field(
        description=f"oldest first; a line longer than {LOG_LINE_MAX_BYTES} bytes is cut, "
        f"ending in {LOG_LINE_CUT!r}"
    )
    cursor: str = Field(description="pass it as since to get the lines after these")
    more: bool = Field(
        default=False, description="more lines after these are already there: ask again at once"
    )
    restarted: bool = Field(
        default=False,
        description="since came from an earlier run of the server: the log restarted, and "
        "these lines start at the beginning of the run now logged",
    )
    cut_lines: int = Field(default=0, description="how many of these lines were cut")


class LoadRecord(Published):
    """One load of a model, as the agent measured it."""

    loaded_at: datetime = Field(description="when the server became healthy")
    load_s: float = Field(description="start to healthy")
    vram_used_mb: int | None = Field(default=None, description="null when it was not measured")


class ModelLoads(Published):
    model: str
    loads: list[LoadRecord] = Field(description="newest first")


class LoadHistory(Published):
    """``history``: each model's last loads, from the agent's database."""

    models: list[ModelLoads]
    limit: int = Field(
        description="loads per model at most; less than asked where many models share one "
        "reply, whose size is bounded"
    )


# The ``data`` of each command's ``ok`` reply (job commands: JobAccepted, or with ``wait``
# JobOutcome; an error reply's ``data`` is JobOutcome when it names a job, else null).
class CatalogEntry(Published):
    """One model of the catalog as ``catalog show`` tells it."""

    name: str
    source: Literal["config", "bus"] = Field(
        description="config: the configuration file's models: (read-only over the bus); "
        "bus: added with catalog add, kept in the agent's state directory"
    )
    entry: dict[str, Any] | None = Field(
        default=None, description="as it was added (bus entries): the preset form"
    )
    spec: dict[str, Any] = Field(description="the full entry the agent runs it by")


class CatalogShown(Published):
    """``catalog`` with ``action: show``."""

    models: list[CatalogEntry]
    file: str = Field(description="where the agent keeps the entries added over the bus")


class CatalogChanged(Published):
    """``catalog`` add or remove: what changed, as a SIGHUP reload says it."""

    name: str
    changes: list[str]
    entry: CatalogEntry | None = Field(default=None, description="add: the entry as it is now")


REPLY_DATA: dict[CommandName, Any] = {
    CommandName.STATUS: HostStatus,
    CommandName.LOAD: JobAccepted | JobOutcome,
    CommandName.UNLOAD: JobAccepted | JobOutcome | JobsQueued,
    CommandName.SWITCH: JobAccepted | JobOutcome,
    CommandName.INSTALL: JobAccepted | JobOutcome,
    CommandName.PLAN: PlanResult,
    CommandName.CANCEL: JobOutcome,
    CommandName.UNINSTALL: Uninstalled,
    CommandName.LOGS: LogLines,
    CommandName.HISTORY: LoadHistory,
    CommandName.CATALOG: CatalogShown | CatalogChanged,
}
