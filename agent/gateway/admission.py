"""Which requests may reach a model now. A request for a model that is not ready waits
for the job that loads it (a switch through the swap queue, joined when one is already
loading it); one for a model being drained for a swap, or at its ``max_concurrent``,
waits for its turn; past ``max_queued`` waiting it is refused. An admitted request
counts as the model's use (LRU, ttl) and keeps it from being evicted until it ends."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable

from agent.background import Background, Throttled
from agent.catalog import ModelSpec
from agent.config import GatewayConfig
from agent.gateway import errors
from agent.gateway.switches import Switches
from agent.jobs import Job, SwapRequest
from agent.lifecycle import Lifecycle
from agent.model_registry import ModelPublisher, ModelRecord
from shared.commands import CommandError
from shared.messages import ErrorCode, JobStatus, ModelLifecycle

# What a client is told to wait when a model has never been measured loading.
DEFAULT_RETRY_AFTER_S = 30.0
# How often a waiting request looks again when nothing woke it.
RECHECK_S = 1.0
# The bus hears about a model's traffic at most this often.
TRAFFIC_PUBLISH_S = 1.0


class Admission:
    def __init__(
        self,
        lifecycle: Lifecycle,
        publisher: ModelPublisher,
        background: Background,
        *,
        queue_timeout_s: float,
        batching: GatewayConfig,
        admitted: Callable[[str, float], None] = lambda model, waited_s: None,
    ) -> None:
        self._lifecycle = lifecycle
        self._registry = lifecycle.registry
        self._publisher = publisher
        self._background = background
        self._queue_timeout_s = queue_timeout_s
        self._admitted = admitted  # (model, seconds waited), for the metrics
        self._waiting: Counter[str] = Counter()
        self._published: dict[str, Throttled] = {}
        self.switches = Switches(batching, lifecycle, self.waiting)

    def waiting(self, name: str) -> int:
        return self._waiting[name]

    @contextlib.asynccontextmanager
    async def admit(self, spec: ModelSpec) -> AsyncIterator[ModelRecord]:
        """Until the request may be forwarded; then the model stays busy until the body
        of the ``async with`` ends. Raises GatewayError when it will not be admitted."""
        name = spec.name
        if not self._admissible(spec) and self._waiting[name] >= spec.max_queued:
            raise errors.queue_full(name, self._waiting[name], self._retry_after_s(name))
        self._count_waiting(name, +1)
        arrived = time.time()
        try:
            async with asyncio.timeout(self._queue_timeout_s):
                record = await self._turn(spec, arrived)
        except TimeoutError:
            raise errors.timed_out(name, "waiting to be served", self._queue_timeout_s) from None
        finally:
            self._count_waiting(name, -1)
        # _turn counted the request as started: from here on it must end.
        self._admitted(name, time.time() - arrived)
        self._traffic(name)
        try:
            yield record
        finally:
            self._registry.request_ended(name)
            self._traffic(name)

    async def _turn(self, spec: ModelSpec, arrived: float) -> ModelRecord:
        """Until the request is admitted, counted as started on its model."""
        name = spec.name
        while True:
            record = self._registry.records.get(name)
            if record is None or name not in self._lifecycle.catalog:
                raise errors.unknown_model(name, self._lifecycle.catalog.names())
            if self._try_start(spec):
                return record
            if record.state == ModelLifecycle.READY:
                # Draining for a swap, or every slot taken: wait for a request (or the
                # drain) to end; a look every second also catches a model gone meanwhile.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RECHECK_S):
                        await self._registry.next_traffic_change()
                continue
            if await self._loaded(spec, arrived):
                return record

    def _try_start(self, spec: ModelSpec) -> bool:
        """Count a request as started on ``spec``'s model if it may be forwarded now."""
        if not self._admissible(spec):
            return False
        self._registry.request_started(spec.name)
        return True

    def _admissible(self, spec: ModelSpec) -> bool:
        record = self._registry.records.get(spec.name)
        if record is None or record.state != ModelLifecycle.READY or record.draining:
            return False
        return spec.max_concurrent is None or record.in_flight < spec.max_concurrent

    async def _loaded(self, spec: ModelSpec, arrived: float) -> bool:
        """Wait for the job that loads ``spec`` (a switch, once the batching policy lets
        one be queued, when none is loading it). True when the request was admitted as
        the job ended: a switch queued behind it cannot evict the model before the
        requests that waited for it got there."""
        try:
            job = self._lifecycle.loading_job(spec.name) or await self.switches.job_for(
                spec, arrived
            )
        except CommandError as exc:
            if exc.code == ErrorCode.QUEUE_FULL:
                raise errors.queue_full(
                    spec.name, self._waiting[spec.name], self._retry_after_s(spec.name)
                ) from None
            raise errors.load_failed(spec.name, "-", exc.message) from None
        if job is None:
            return False  # the model got loaded (or left the catalog) meanwhile
        claim = _Claim(
            lambda: self._try_start(spec), lambda: self._registry.request_ended(spec.name)
        )
        try:
            await self._lifecycle.finished(job, claim.hand_off)
        except BaseException:
            claim.give_up()
            raise
        if job.state != JobStatus.SUCCEEDED:
            reason = job.error.message if job.error else job.state.value
            raise errors.load_failed(spec.name, job.job_id, reason)
        return claim.admitted

    def _retry_after_s(self, name: str) -> float:
        record = self._registry.records.get(name)
        learned = record.last_load_s if record is not None else None
        return learned or DEFAULT_RETRY_AFTER_S

    def _count_waiting(self, name: str, change: int) -> None:
        """The queue of ``name``, here and on its record (``P/H/models/<name>.waiting``)."""
        self._waiting[name] += change
        record = self._registry.records.get(name)
        if record is not None:
            record.waiting = self._waiting[name]
            self._traffic(name)

    def _traffic(self, name: str) -> None:
        throttle = self._published.get(name)
        if throttle is None:

            async def publish() -> None:
                record = self._registry.records.get(name)
                if record is not None:
                    await self._publisher.model_changed(record.snapshot())

            throttle = self._published[name] = Throttled(
                self._background, publish, interval_s=TRAFFIC_PUBLISH_S, name=f"traffic-{name}"
            )
        throttle.trigger()


class _Claim:
    """One waiting request's place on the model its job loads: taken the moment the
    job ends (if the model is ready and has a slot), given back if the caller left."""

    def __init__(self, start: Callable[[], bool], end: Callable[[], None]) -> None:
        self._start = start
        self._end = end
        self.admitted = False
        self._gone = False

    def hand_off(self, job: Job[SwapRequest]) -> None:
        if not self._gone and job.state == JobStatus.SUCCEEDED:
            self.admitted = self._start()

    def give_up(self) -> None:
        self._gone = True
        if self.admitted:
            self.admitted = False
            self._end()
