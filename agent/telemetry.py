"""Pure telemetry: GPU samples in, contract payloads out, and what changed.

No I/O here: the service samples the backend and publishes; this module
decides what each payload says and whether it is worth publishing now.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from agent.gpu.base import GpuSample
from shared.messages import (
    EventType,
    GpuInfo,
    GpuProcess,
    GpuState,
    GpuSummary,
    HostState,
    LoadedModel,
)

GPU_LOST = EventType.GPU_LOST.value  # also the name of the alert it raises


@dataclass(frozen=True, slots=True)
class ProcessOwner:
    """Which catalog model (and container) a GPU process belongs to."""

    model: str | None = None
    container: str | None = None


OwnerLookup = Callable[[int], ProcessOwner | None]


def _no_owner(_pid: int) -> ProcessOwner | None:
    return None


def gpu_state(
    sample: GpuSample, ts: datetime, owner_of: OwnerLookup = _no_owner, alerts: Sequence[str] = ()
) -> GpuState:
    processes = []
    for process in sample.processes:
        owner = owner_of(process.pid) or ProcessOwner()
        processes.append(
            GpuProcess(
                pid=process.pid,
                used_mb=process.used_mb,
                name=process.name,
                model=owner.model,
                container=owner.container,
            )
        )
    all_alerts = list(alerts)
    if sample.lost and GPU_LOST not in all_alerts:
        all_alerts.insert(0, GPU_LOST)
    return GpuState(
        index=sample.index,
        uuid=sample.uuid,
        name=sample.name,
        memory_total_mb=sample.memory_total_mb,
        memory_used_mb=sample.memory_used_mb,
        memory_free_mb=sample.memory_free_mb,
        utilization_percent=sample.utilization_percent,
        memory_utilization_percent=sample.memory_utilization_percent,
        temperature_c=sample.temperature_c,
        power_w=sample.power_w,
        power_limit_w=sample.power_limit_w,
        processes=processes,
        alerts=all_alerts,
        ts=ts,
    )


def gpu_info(sample: GpuSample) -> GpuInfo:
    return GpuInfo(
        index=sample.index,
        uuid=sample.uuid,
        name=sample.name,
        memory_total_mb=sample.memory_total_mb,
    )


def host_state(
    gpus: Sequence[GpuState],
    ts: datetime,
    *,
    loaded_models: Mapping[str, LoadedModel] | None = None,
    queue_length: int = 0,
    active_job: str | None = None,
    active_job_progress: float | None = None,
) -> HostState:
    """The summary in the shape of the original ``/models/status``: totals over the
    GPUs that answer, plus per-GPU detail."""
    answering = [g for g in gpus if g.memory_total_mb is not None]
    utilizations = [g.utilization_percent for g in answering if g.utilization_percent is not None]
    return HostState(
        total_mb=sum(g.memory_total_mb or 0 for g in answering),
        used_mb=sum(g.memory_used_mb or 0 for g in answering),
        free_mb=sum(g.memory_free_mb or 0 for g in answering),
        utilization_percent=round(sum(utilizations) / len(utilizations)) if utilizations else None,
        loaded_models=dict(loaded_models or {}),
        gpus=[
            GpuSummary(
                index=g.index,
                name=g.name,
                memory_total_mb=g.memory_total_mb,
                memory_used_mb=g.memory_used_mb,
                memory_free_mb=g.memory_free_mb,
                utilization_percent=g.utilization_percent,
                alerts=list(g.alerts),
            )
            for g in gpus
        ],
        queue_length=queue_length,
        active_job=active_job,
        active_job_progress=active_job_progress,
        ts=ts,
    )


def _content(payload: GpuState | HostState) -> dict[str, Any]:
    """What a payload says, without its timestamp: equal content is not news."""
    return payload.model_dump(exclude={"ts"})


@dataclass
class ChangeFilter:
    """Remembers what was last published per topic and says whether a new payload
    differs; the periodic tick publishes regardless, so retained values stay fresh."""

    _last: dict[str, dict[str, Any]] = field(default_factory=dict)

    def changed(self, topic: str, payload: GpuState | HostState) -> bool:
        content = _content(payload)
        if self._last.get(topic) == content:
            return False
        self._last[topic] = content
        return True

    def remember(self, topic: str, payload: GpuState | HostState) -> None:
        self._last[topic] = _content(payload)

    def forget(self) -> None:
        self._last.clear()
