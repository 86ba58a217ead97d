"""The switches that gateway requests ask for, queued when the batching policy says so
(``batching.decide``). Requests for a model that is not loaded, and that no job is
loading yet, wait here in one group per model; one task decides for all of them
whenever something changes (a request arrives or leaves, a request or a job ends) or
a deadline comes, and hands each released group the switch job it then queues."""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.catalog import ModelSpec
from agent.config import GatewayConfig
from agent.gateway.batching import Group, Use, decide
from agent.jobs import Job, SwapRequest
from agent.lifecycle import Lifecycle
from shared.messages import JobStatus, ModelLifecycle

log = logging.getLogger("modelbus.gateway")

# How often the policy looks again when nothing woke it (a missed wake-up costs this).
RECHECK_S = 1.0


@dataclass
class _Waiting:
    spec: ModelSpec
    arrivals: list[float] = field(default_factory=list)  # one per waiting request
    # The job its switch became; None: look again (the model got loaded meanwhile,
    # or left the catalog). A CommandError when the switch was refused.
    outcome: asyncio.Future[Job[SwapRequest] | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    evicts: frozenset[str] | None = None
    evicts_for: object = None  # the residency ``evicts`` was planned on


class Switches:
    def __init__(
        self, config: GatewayConfig, lifecycle: Lifecycle, waiting: Callable[[str], int]
    ) -> None:
        self._config = config
        self._lifecycle = lifecycle
        self._registry = lifecycle.registry
        # Requests waiting on a model (for its slots, its drain): a loaded one is busy.
        self._waiting_on = waiting
        self._groups: dict[str, _Waiting] = {}
        self._changed = asyncio.Event()
        # How long the switches released took, start to end, by model: a switch costs
        # more than its model's load (the drain, the stops), and the deadlines must know.
        self._released: list[Job[SwapRequest]] = []
        self._switch_s: dict[str, float] = {}

    async def job_for(self, spec: ModelSpec, arrived: float) -> Job[SwapRequest] | None:
        """The switch job that loads ``spec`` for a request that ``arrived`` then (it may
        have waited elsewhere first, for a drain), once the policy queued it; None when
        the caller should look again. Raises CommandError when the switch was refused.
        A caller that leaves (cancelled) leaves its group."""
        if self._config.max_wait_s <= 0:
            return self._lifecycle.switch_for_request(spec)  # arrival order: nothing to decide
        group = self._groups.get(spec.name)
        if group is None:
            group = self._groups[spec.name] = _Waiting(spec)
        bisect.insort(group.arrivals, arrived)
        self._changed.set()
        try:
            # Shielded: one caller leaving must not cancel the outcome for the others.
            return await asyncio.shield(group.outcome)
        finally:
            group.arrivals.remove(arrived)
            if not group.arrivals and self._groups.get(spec.name) is group:
                del self._groups[spec.name]
                self._changed.set()

    async def run(self) -> None:
        """Decide whenever something changed, until cancelled."""
        wake_at: float | None = None
        while True:
            if not self._groups:
                await self._changed.wait()  # traffic matters only while a group waits
            timeout = RECHECK_S if wake_at is None else max(0.0, wake_at - time.time())
            changed = asyncio.ensure_future(self._registry.next_traffic_change())
            mine = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait(
                    (changed, mine), timeout=min(timeout, RECHECK_S), return_when="FIRST_COMPLETED"
                )
            finally:
                changed.cancel()
                mine.cancel()
            self._changed.clear()
            try:
                wake_at = await self._decide()
            except Exception:  # one bad decision must not end the gateway's switches
                log.exception("the gateway's switch policy failed; it decides again")
                wake_at = None

    async def _decide(self) -> float | None:
        for name in list(self._groups):
            record = self._registry.records.get(name)
            loading = self._lifecycle.loading_job(name)
            gone = record is None or name not in self._lifecycle.catalog
            if gone or loading is not None or (record and record.state == ModelLifecycle.READY):
                self._settle(name, loading)
        self._learn_switch_times()
        if not self._groups:
            return None
        residency = self._residency()
        for group in list(self._groups.values()):
            if group.evicts_for != residency:
                group.evicts = await self._lifecycle.evictions(group.spec)
                group.evicts_for = residency
        # Built after every await: a group may have left meanwhile.
        groups = [
            Group(name, group.arrivals[0], self._expected_switch_s(name), group.evicts)
            for name, group in self._groups.items()
        ]
        decision = decide(
            groups,
            self._use(),
            now=time.time(),
            max_wait_s=self._config.max_wait_s,
            idle_after_s=self._config.idle_after_s,
            switching=bool(self._lifecycle.active_job or self._lifecycle.queue_length),
        )
        for name in decision.release:
            self._release(name)
        return decision.wake_at

    def _release(self, name: str) -> None:
        group = self._groups.pop(name, None)
        if group is None:
            return  # its last request left while the policy planned
        try:
            job = self._lifecycle.switch_for_request(group.spec)
        except Exception as exc:  # a refusal reaches every request of the group
            group.outcome.set_exception(exc)
            group.outcome.exception()  # retrieved: nobody waiting is not an error
            return
        self._released.append(job)
        group.outcome.set_result(job)

    def _settle(self, name: str, job: Job[SwapRequest] | None) -> None:
        group = self._groups.pop(name)
        group.outcome.set_result(job)

    def _learn_switch_times(self) -> None:
        for job in [job for job in self._released if job.finished]:
            self._released.remove(job)
            if job.state == JobStatus.SUCCEEDED and job.started_at and job.finished_at:
                took = (job.finished_at - job.started_at).total_seconds()
                self._switch_s[job.request.model] = took

    def _expected_switch_s(self, name: str) -> float:
        """The last switch to ``name``, else its learned load time, else the longest
        switch seen (a first load costs at least what others did)."""
        if name in self._switch_s:
            return self._switch_s[name]
        record = self._registry.records.get(name)
        learned = record.last_load_s if record is not None else None
        return learned or max(self._switch_s.values(), default=0.0)

    def _residency(self) -> object:
        return frozenset(
            (name, record.state, record.placed_on)
            for name, record in self._registry.records.items()
            if record.resident
        )

    def _use(self) -> dict[str, Use]:
        use = {}
        for name, record in self._registry.records.items():
            if record.resident:
                active = record.in_flight + self._waiting_on(name)
                use[name] = Use(active, record.last_request_at)
        return use
