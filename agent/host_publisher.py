"""What the agent tells the bus about its models, jobs, weights and events, and the
mirror of what it keeps retained: republished on every connect (a watcher that sees
``online`` can trust the retained state beside it), and read by ``status``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from agent.alerts import AlertsConfig
from agent.background import Background
from bus.reconnecting import ReconnectingClient
from shared.messages import (
    Event,
    JobState,
    ModelState,
    Severity,
    WeightsState,
    encode,
)
from shared.topics import HostTopics

log = logging.getLogger("modelbus.agent")

# How many of the most recently finished jobs a status reply lists (besides all active ones).
STATUS_RECENT_JOBS = 20


class JobObserver(Protocol):
    """Sees every job state the agent publishes (the metrics)."""

    def job_changed(self, job: JobState) -> None: ...

    def job_finished(self, job: JobState) -> None: ...


class HostPublisher:
    """The lifecycle's and the installer's publisher (``ModelPublisher``,
    ``InstallPublisher``): every message goes through the client's one outbox, in order,
    and is kept until connected."""

    def __init__(
        self,
        topics: HostTopics,
        client: ReconnectingClient,
        background: Background,
        *,
        alerts: AlertsConfig,
        job_retention_s: float,
        job_ended: Callable[[JobState], Awaitable[None]],
        catalog_changed: Callable[[], Awaitable[None]],
        state_changed: Callable[[], None],
    ) -> None:
        self._topics = topics
        self._client = client
        self._background = background
        self._alerts = alerts
        self._job_retention_s = job_retention_s
        self._job_ended = job_ended
        self._catalog_changed = catalog_changed
        self._state_changed = state_changed
        # Kept until cleared, so a reconnect republishes finished jobs too.
        self.jobs: dict[str, JobState] = {}
        self.job_observers: list[JobObserver] = []
        self.weights: WeightsState | None = None

    def republish(self, models: list[ModelState]) -> None:
        """Every retained model, job and the weights, as on a fresh connection."""
        for model in models:
            self._client.publish(self._topics.model(model.name), encode(model), qos=1, retain=True)
        for job in list(self.jobs.values()):
            self._client.publish(self._topics.job(job.job_id), encode(job), qos=1, retain=True)
        if self.weights is not None:
            self._client.publish(self._topics.weights, encode(self.weights), qos=1, retain=True)

    def status_jobs(self) -> list[JobState]:
        """Every queued or running job and the most recent finished ones: all retained
        jobs could make the reply larger than the broker accepts after a burst."""
        active = [job for job in self.jobs.values() if job.finished_at is None]
        finished = sorted(
            (job for job in self.jobs.values() if job.finished_at is not None),
            key=lambda job: job.finished_at or job.ts,
        )
        return active + finished[-STATUS_RECENT_JOBS:]

    # ---- ModelPublisher ----------------------------------------------------

    async def model_changed(self, state: ModelState) -> None:
        self._client.publish(self._topics.model(state.name), encode(state), qos=1, retain=True)
        await self.state_changed()

    async def model_removed(self, name: str) -> None:
        """An empty retained payload removes the model's topic from the broker."""
        self._client.publish(self._topics.model(name), b"", qos=1, retain=True)
        # It was named (a select option in Home Assistant) while it ran after leaving
        # the catalog: not any more.
        await self._catalog_changed()

    async def state_changed(self) -> None:
        self._state_changed()

    # ---- JobPublisher ------------------------------------------------------

    async def job_changed(self, job: JobState) -> None:
        self.jobs[job.job_id] = job
        self._client.publish(self._topics.job(job.job_id), encode(job), qos=1, retain=True)
        self._observe(job, finished=False)

    async def job_finished(self, job: JobState) -> None:
        self._observe(job, finished=True)
        await self._job_ended(job)
        self._background.spawn(self._clear_job_later(job.job_id), name=f"clear-job-{job.job_id}")

    def _observe(self, job: JobState, *, finished: bool) -> None:
        for observer in self.job_observers:
            try:
                (observer.job_finished if finished else observer.job_changed)(job)
            except Exception:  # an observer's bug must not stop the job being published
                log.exception("a job observer failed on job %s", job.job_id)

    async def _clear_job_later(self, job_id: str) -> None:
        """Finished jobs stay visible for a while, then leave the retained store."""
        await asyncio.sleep(self._job_retention_s)
        self.jobs.pop(job_id, None)
        self._client.publish(self._topics.job(job_id), b"", qos=1, retain=True)

    async def event(self, event: Event) -> None:
        if not self._alerts.allows(event.event_type):
            return  # an alert the operator switched off
        log.log(
            logging.ERROR
            if event.severity in (Severity.ERROR, Severity.CRITICAL)
            else logging.INFO,
            "event %s: %s",
            event.event_type,
            event.message,
        )
        # Queued while offline: an event raised before the first connect still arrives.
        self._client.publish(self._topics.events, encode(event), qos=1)

    # ---- InstallPublisher --------------------------------------------------

    async def weights_changed(self, state: WeightsState) -> None:
        self.weights = state
        self._client.publish(self._topics.weights, encode(state), qos=1, retain=True)
