"""Jobs and their queue, pure: no I/O, no asyncio.

GPU-changing work (load, unload, switch) runs one job at a time per host, and so
do installs, in a queue of their own. A queue is bounded, ordered by priority then
arrival, and a request equal to one already queued or running joins it instead of
queueing a duplicate.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Generic, Literal, TypeVar

from shared.messages import (
    ErrorCode,
    ErrorInfo,
    JobCommand,
    JobOrigin,
    JobPhase,
    JobResult,
    JobState,
    JobStatus,
    utc_now,
)


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


@dataclass(frozen=True, slots=True)
class SwapRequest:
    """A GPU-changing job (load, unload, switch); two equal requests are the same job."""

    command: Literal[JobCommand.LOAD, JobCommand.UNLOAD, JobCommand.SWITCH]
    model: str
    gpu: int | None = None
    exclusive: bool = False
    force: bool = False

    @property
    def subject(self) -> str:
        return self.model


@dataclass(frozen=True, slots=True)
class InstallRequest:
    """Weights to download as ``name``; two equal requests are the same job."""

    name: str
    repo: str
    revision: str | None = None
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    command: ClassVar[JobCommand] = JobCommand.INSTALL

    @property
    def subject(self) -> str:
        return self.name


Request = TypeVar("Request", SwapRequest, InstallRequest)


class JobFailure(Exception):
    """Why a job failed, as its error says it."""

    def __init__(self, code: ErrorCode, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


@dataclass
class Job(Generic[Request]):
    request: Request
    request_id: str | None = None
    priority: int = 0
    origin: JobOrigin = JobOrigin.AGENT
    job_id: str = field(default_factory=new_job_id)
    state: JobStatus = JobStatus.QUEUED
    phase: JobPhase = JobPhase.QUEUED
    progress: float = 0.0
    eta_s: float | None = None
    message: str | None = None
    created_at: datetime = field(default_factory=utc_now)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: JobResult | None = None
    error: ErrorInfo | None = None
    queue_position: int | None = None
    bytes_done: int | None = None
    bytes_total: int | None = None
    # Seconds spent waiting on servers (stopping, starting), reported in the result so
    # the agent's own overhead can be told apart from the servers' time.
    timings: dict[str, float] = field(default_factory=dict)
    # What was last published, so that a tick that changed nothing is not published again.
    published: JobState | None = field(default=None, repr=False, compare=False)

    def add_time(self, name: str, seconds: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + seconds

    @property
    def finished(self) -> bool:
        return self.state in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)

    def start(self) -> None:
        self.state = JobStatus.RUNNING
        self.started_at = utc_now()
        self.queue_position = None

    def advance(self, phase: JobPhase, progress: float, message: str | None = None) -> None:
        self.phase = phase
        self.progress = max(self.progress, min(1.0, progress))
        if message is not None:
            self.message = message

    def succeed(self, result: JobResult | None = None, message: str | None = None) -> None:
        self._finish(JobStatus.SUCCEEDED, message)
        self.progress = 1.0
        self.result = result

    def fail(self, code: ErrorCode, message: str, details: dict[str, Any] | None = None) -> None:
        self._finish(JobStatus.FAILED, message)
        self.error = ErrorInfo(code=code, message=message, details=details)

    def cancel(self, message: str = "cancelled") -> None:
        self._finish(JobStatus.CANCELLED, message)
        self.error = ErrorInfo(code=ErrorCode.CANCELLED, message=message)

    def _finish(self, state: JobStatus, message: str | None) -> None:
        self.state = state
        self.phase = JobPhase.DONE
        self.finished_at = utc_now()
        self.eta_s = 0.0 if state == JobStatus.SUCCEEDED else None
        self.queue_position = None
        if message is not None:
            self.message = message

    def unchanged_since_published(self, snapshot: JobState) -> bool:
        """Whether ``snapshot`` says nothing the last published state did not (its time aside)."""
        last = self.published
        return last is not None and snapshot.model_copy(update={"ts": last.ts}) == last

    def snapshot(self) -> JobState:
        return JobState(
            job_id=self.job_id,
            command=self.request.command,
            origin=self.origin,
            # For an install, the weights' name (the job's subject), as the contract says.
            model=self.request.subject,
            repo=self.request.repo if isinstance(self.request, InstallRequest) else None,
            request_id=self.request_id,
            state=self.state,
            phase=self.phase,
            progress=round(self.progress, 4),
            eta_s=None if self.eta_s is None else round(self.eta_s, 2),
            bytes_done=self.bytes_done,
            bytes_total=self.bytes_total,
            queue_position=self.queue_position,
            message=self.message,
            created_at=self.created_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
            result=self.result,
            error=self.error,
            ts=utc_now(),
        )


class QueueFullError(Exception):
    pass


@dataclass
class JobQueue(Generic[Request]):
    """Queued jobs by (priority desc, arrival), plus the one running job. The swap
    worker has one; installs have their own, so a download never holds up a swap."""

    limit: int = 32
    name: str = "swap"
    running: Job[Request] | None = None
    _queued: list[tuple[int, int, Job[Request]]] = field(default_factory=list)
    _arrival: itertools.count[int] = field(default_factory=itertools.count)

    def __len__(self) -> int:
        return len(self._queued)

    def queued(self) -> list[Job[Request]]:
        return [job for _, _, job in self._queued]

    def find(self, job_id: str) -> Job[Request] | None:
        if self.running is not None and self.running.job_id == job_id:
            return self.running
        return next((job for job in self.queued() if job.job_id == job_id), None)

    def submit(self, job: Job[Request], *, over_limit: bool = False) -> tuple[Job[Request], bool]:
        """Queue ``job``, or return the equal job already queued or running
        (``joined=True``). Raises QueueFullError when the queue is at its limit, unless
        ``over_limit`` (the agent's own work, such as a rollback, is never refused)."""
        for existing in ([self.running] if self.running else []) + self.queued():
            if existing.request == job.request and not existing.finished:
                return existing, True
        if len(self._queued) >= self.limit and not over_limit:
            raise QueueFullError(
                f"the {self.name} queue is full ({self.limit} jobs); try again later"
            )
        self._queued.append((-job.priority, next(self._arrival), job))
        self._queued.sort(key=lambda entry: (entry[0], entry[1]))
        self._number()
        return job, False

    def take(self) -> Job[Request] | None:
        """The next job to run; it becomes ``running``."""
        if self.running is not None or not self._queued:
            return None
        _, _, job = self._queued.pop(0)
        self.running = job
        job.start()
        self._number()
        return job

    def done(self, job: Job[Request]) -> None:
        if self.running is job:
            self.running = None

    def remove(self, job_id: str) -> Job[Request] | None:
        """Take a queued job out (to cancel it); None if it is not queued."""
        for entry in self._queued:
            if entry[2].job_id == job_id:
                self._queued.remove(entry)
                self._number()
                return entry[2]
        return None

    def _number(self) -> None:
        for position, (_, _, job) in enumerate(self._queued, start=1):
            job.queue_position = position
